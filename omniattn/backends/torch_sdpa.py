"""PyTorch's fused CPU attention kernel: the fast path of ``backend="auto"`` for plain softmax on CPUs.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` is a flash-style kernel (O(N)
memory) computing ``softmax(scale * q.k^T [+ float mask]) v`` with causal top-left alignment and
returning the log-sum-exp: one fused op per call (one parallel region, no per-tile Python), so it
is the fastest exact path at every size, and barely slowed by a busy machine. Where it computes
exactly omniattn's maths, ``backend="auto"`` on a CPU uses it (:func:`eligible`); everything else,
and ``backend="torch"``, runs the tiled path. Eligible calls:

- CPU tensors in the dense (B, N, H, D) layout, score ``"softmax"``, head dim of v equal to q's;
- no softcap, ALiBi or dropout (its dropout draws other numbers than DESIGN.md's hash);
- no window; causal only with Nq == Nk, where its top-left alignment equals our bottom-right;
- no explicit mask, or a float mask of q's dtype without causal (rows it masks fully get lse
  -inf as ours: the kernel reports 0 there);
- at least one query and one key; finite q, k, v (DESIGN.md's rule for NaN/Inf is exact on the
  tiled path, while the fused kernel lets a masked pair's 0 multiply a NaN of v);
- q, k, v (and the mask) with unit stride along their last dim (:func:`channels_contiguous`).

The backward pass is the kernel's own, except with a gradient on lse (``return_lse=True`` feeding
a loss) or a non-finite upstream gradient, which take the tiled backward (it needs only q, k, v,
out and lse).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..spec import Call, Spec
from . import torch_threads, torch_tiled

FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # also the CPU decode path's (torch_decode)
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def channels_contiguous(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernel reads these right: it honours token and head strides but reads the
    last dim as contiguous whatever its stride (``x[..., ::2]`` gave output errors of 1.2)."""
    return all(t.stride(-1) == 1 for t in tensors)


def eligible(spec: Spec, call: Call) -> bool:
    """Whether the fused kernel computes exactly this call (see the module docstring)."""
    q, k, v = call.q, call.k, call.v
    if (
        q.device.type != "cpu"
        or not call.dense
        or spec.score != "softmax"
        or spec.precision != "exact"
        or spec.softcap > 0
        or spec.dropout_p > 0
        or call.alibi is not None
        or spec.hstu is not None
        or v.shape[-1] != q.shape[-1]
        or 0 in (q.shape[0], q.shape[1], k.shape[1])
        or not channels_contiguous(q, k, v)
    ):
        return False
    if spec.causal:
        if spec.window != (-1, 0) or q.shape[1] != k.shape[1]:
            return False
    elif spec.window != (-1, -1):
        return False
    mask = call.attn_mask
    if mask is not None and (spec.causal or mask.dtype != q.dtype or mask.dim() not in (2, 4) or not channels_contiguous(mask)):
        return False
    return True


def _mask_rows(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows the float mask disallows entirely, (B|1, H|1, Nq|1) bool; None when the mask holds
    NaN or +inf (non-finite inputs: the tiled path's exact rule applies)."""
    top = mask.amax(-1)  # NaN propagates through the max
    if not bool(torch.isfinite(top.masked_fill(top == -math.inf, 0.0)).all()):
        return None
    rows = top == -math.inf
    return rows if rows.dim() == 3 else rows.view(1, 1, -1)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: Spec, call: Call, mask, empty_rows):
        ctx.set_materialize_grads(False)
        causal = spec.causal
        out, lse = FORWARD(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal,
                            attn_mask=mask, scale=spec.scale)
        lse_ours = lse if empty_rows is None else lse.masked_fill(empty_rows, -math.inf)
        out = out.transpose(1, 2)  # (B, N, H, D): the kernel writes its output in this memory order
        # the outputs themselves are saved: a second derivative differentiates through them
        ctx.save_for_backward(q, k, v, out, lse, lse_ours)
        ctx.spec, ctx.call, ctx.mask = spec, call, mask
        return out, lse_ours

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, lse_ours = ctx.saved_tensors
        spec, call = ctx.spec, ctx.call
        if dout is None:
            dout = torch.zeros_like(out)
        with torch_threads.caller_on_one_thread(q.device):  # a small check: no OpenMP barrier for it
            finite = torch_tiled._all_finite(dout)
        if dlse is not None or not finite or torch.is_grad_enabled():
            # lse's own gradient, a NaN/Inf upstream or a second derivative: the tiled backward
            dq, dk, dv = torch_tiled.backward(spec, call, out, lse_ours, dout, dlse)
            return dq, dk, dv, None, None, None, None
        dq, dk, dv = _BACKWARD(dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               out.transpose(1, 2), lse, 0.0, spec.causal, attn_mask=ctx.mask, scale=spec.scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None, None


def attention(spec: Spec, call: Call) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(out (B, Nq, Hq, D), lse (B, Hq, Nq) float32 / float64) in the caller's layout, or None
    when this call must take the tiled path after all (non-finite inputs)."""
    mask, empty_rows = call.attn_mask, None
    with torch_threads.caller_on_one_thread(call.q.device):  # small checks: no OpenMP barrier for them
        if mask is not None:
            empty_rows = _mask_rows(mask)
            if empty_rows is None:
                return None
            if not bool(empty_rows.any()):
                empty_rows = None
        if not torch_tiled._all_finite(call.q, call.k, call.v):
            return None
    return _FusedAttention.apply(call.q, call.k, call.v, spec, call, mask, empty_rows)

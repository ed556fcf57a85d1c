"""The PyTorch backends (the tiled path, and PyTorch's fused CPU kernel where it is exact) as
torch.library custom ops, for dense calls while torch.compile traces.

Their eager code decides on the data (NaN/Inf inputs take DESIGN.md's exact rule, a float mask's
fully masked rows) and runs worker threads: dynamo cannot trace that, so a compiled model broke
its graph at every attention call. Here the whole call is one opaque op with a fake (shape-only)
implementation and an autograd formula, as the Triton kernels are (omniattn._ops), so
``torch.compile(fullgraph=True)`` traces forward and backward. Eager calls never come here: they
keep their own autograd Functions. The call travels as its tensors and the validated scalars of
its Spec; each op validates them again into the same (Spec, Call) (a few microseconds).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import spec as _spec
from .spec import Call, Spec


def _call(q, k, v, attn_mask, alibi, score, causal, window, scale, sigmoid_bias, silu_norm, softcap
          ) -> tuple[Spec, Call]:
    return _spec.dense_call(q, k, v, score=score, causal=causal, window=tuple(window), scale=scale,
                            sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=softcap, alibi_slopes=alibi,
                            attn_mask=attn_mask, precision="exact", backend="auto", return_lse=False)


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("omniattn::torch_attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], alibi: Optional[Tensor], score: str, causal: bool,
    window: list[int], scale: float, sigmoid_bias: Optional[float], silu_norm: Optional[float], softcap: float,
    backend: str, keep_wide: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, Nq, Hq, Dv) contiguous in q's dtype, lse (B, Hq, Nq) in the compute dtype (empty
    but for softmax), the output in the compute dtype for the backward's delta (``keep_wide``:
    softmax on 16-bit inputs, the tiled path; else empty))."""
    from .backends import torch_sdpa, torch_tiled

    spec, call = _call(q, k, v, attn_mask, alibi, score, causal, window, scale, sigmoid_bias, silu_norm, softcap)
    cd = _compute_dtype(q)
    if backend == "sdpa":
        fused = torch_sdpa.attention(spec, call)
        if fused is not None:  # its output is a transposed view: the fake promises contiguous
            return fused[0].contiguous(), fused[1].to(cd).contiguous(), q.new_empty(0, dtype=cd)
    out, lse, wide = torch_tiled.forward_without_autograd(spec, call, keep_wide)
    return (call.unpack(out), call.unpack_lse(lse).contiguous() if score == "softmax" else q.new_empty(0, dtype=cd),
            call.unpack(wide) if wide is not None else q.new_empty(0, dtype=cd))


@attention_fwd.register_fake
def _(q, k, v, attn_mask, alibi, score, causal, window, scale, sigmoid_bias, silu_norm, softcap, backend, keep_wide):
    cd = _compute_dtype(q)
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=cd) if score == "softmax" else q.new_empty(0, dtype=cd)
    wide = out.to(cd) if keep_wide and score == "softmax" and q.dtype != cd else q.new_empty(0, dtype=cd)
    return out, lse, wide


@torch.library.custom_op("omniattn::torch_attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, wide: Tensor,
    attn_mask: Optional[Tensor], alibi: Optional[Tensor], score: str, causal: bool, window: list[int], scale: float,
    sigmoid_bias: Optional[float], silu_norm: Optional[float], softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous: the tiled backward (DESIGN.md's rule for non-finite values
    included), from the float32 output where the forward kept it."""
    from .backends import torch_tiled

    spec, call = _call(q, k, v, attn_mask, alibi, score, causal, window, scale, sigmoid_bias, silu_norm, softcap)
    softmax = score == "softmax"
    grads = torch_tiled.backward(spec, call, wide if wide.numel() else out, lse if softmax else None, dout,
                                 dlse if softmax else None)
    return tuple(g.contiguous() for g in grads)


@attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, wide, attn_mask, alibi, score, causal, window, scale, sigmoid_bias, silu_norm,
      softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, alibi, *scalars, _backend, _keep_wide = inputs
    out, lse, wide = output
    ctx.save_for_backward(q, k, v, out, lse, wide, attn_mask, alibi)
    ctx.scalars = scalars


def _backward(ctx, dout, dlse, _dwide):
    q, k, v, out, lse, wide, attn_mask, alibi = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, dlse if dlse is not None and dlse.numel() else None, q, k, v, out, lse, wide,
                               attn_mask, alibi, *ctx.scalars)
    return (dq, dk, dv) + (None,) * 11


torch.library.register_autograd("omniattn::torch_attention_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("double backward through omniattn's attention inside torch.compile is not supported; "
                       "outside torch.compile the PyTorch backends differentiate twice (create_graph=True)")


# (a plain error instead of PyTorch's internal "no autograd formula" one, as omniattn._ops does)
torch.library.register_autograd("omniattn::torch_attention_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def attention(spec: Spec, call: Call, backend: str) -> tuple[Tensor, Optional[Tensor]]:
    """Output and (softmax) lse of a dense call on the PyTorch backend ``backend`` ("torch" or
    "sdpa"), through the custom op (torch.compile is tracing)."""
    # the tiled path's softmax backward takes delta = dO . O from the float32 O (torch_tiled); the
    # fused kernel's output is 16-bit, its own backward uses that (and the fake must know which)
    keep_wide = (backend == "torch" and torch.is_grad_enabled()
                 and any(t.requires_grad for t in (call.q, call.k, call.v)))
    out, lse, _ = attention_fwd(call.q, call.k, call.v, call.attn_mask, call.alibi, spec.score, spec.causal,
                                list(spec.window), spec.scale, spec.sigmoid_bias, spec.silu_norm, spec.softcap,
                                backend, keep_wide)
    return out, (lse if spec.score == "softmax" else None)

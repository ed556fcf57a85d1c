"""The Triton kernels as torch.library custom ops, with fake (meta) implementations and autograd.

torch.compile sees ``omniattn::attention_fwd`` / ``omniattn::attention_bwd`` as opaque ops with
known output shapes, so a compiled model traces forward and backward without graph breaks.
Scalars travel as two flat lists (see launch.Params for their order).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends.triton import launch

_OPTIONALS = ("cu_q", "cu_k", "alibi", "num_targets", "pos_w", "ts_w", "timestamps")


@torch.library.custom_op("omniattn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    cu_q: Optional[Tensor], cu_k: Optional[Tensor], alibi: Optional[Tensor], num_targets: Optional[Tensor],
    pos_w: Optional[Tensor], ts_w: Optional[Tensor], timestamps: Optional[Tensor],
    max_q: int, max_k: int, ints: list[int], floats: list[float],
) -> tuple[Tensor, Tensor]:
    p = launch.Params.from_lists(ints, floats)
    return launch.forward(q, k, v, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, timestamps, max_q, max_k, p)


@attention_fwd.register_fake
def _(q, k, v, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, timestamps, max_q, max_k, ints, floats):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    if ints[0] != 0:  # only softmax has an lse
        return out, q.new_empty(0, dtype=torch.float32)
    if q.dim() == 3:
        return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("omniattn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    cu_q: Optional[Tensor], cu_k: Optional[Tensor], alibi: Optional[Tensor], num_targets: Optional[Tensor],
    pos_w: Optional[Tensor], ts_w: Optional[Tensor], timestamps: Optional[Tensor],
    max_q: int, max_k: int, ints: list[int], floats: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    p = launch.Params.from_lists(ints, floats)
    dq, dk, dv, dpos, dts = launch.backward(dout, q, k, v, out, lse, dlse, cu_q, cu_k, alibi, num_targets, pos_w,
                                            ts_w, timestamps, max_q, max_k, p)
    return dq, dk, dv, q.new_empty(0) if dpos is None else dpos, q.new_empty(0) if dts is None else dts


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, timestamps, max_q, max_k, ints,
      floats):
    dpos = torch.empty_like(pos_w) if pos_w is not None else q.new_empty(0)
    dts = torch.empty_like(ts_w) if ts_w is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpos, dts


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, timestamps, max_q, max_k, ints, floats = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, timestamps)
    ctx.sizes = (max_q, max_k, ints, floats)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, timestamps = ctx.saved_tensors
    max_q, max_k, ints, floats = ctx.sizes
    if dlse is not None and (ints[0] != 0 or dlse.numel() == 0):
        dlse = None
    dq, dk, dv, dpos, dts = attention_bwd(dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse,
                                          dlse, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, timestamps, max_q,
                                          max_k, ints, floats)
    has_rab = pos_w is not None
    return (dq, dk, dv, None, None, None, None, dpos if has_rab else None, dts if has_rab else None, None, None,
            None, None, None)


torch.library.register_autograd("omniattn::attention_fwd", _backward, setup_context=_setup_context)

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

# The optional tensors travel as one flat list in launch.Extras' order, except the relative
# bias' weights: they take gradients, and custom ops differentiate named tensor arguments only.
_WEIGHTS = ("pos_w", "ts_w")
_OTHERS = tuple(f for f in launch.Extras._fields if f not in _WEIGHTS)


def split_extras(x: launch.Extras) -> tuple[Optional[Tensor], Optional[Tensor], list[Optional[Tensor]]]:
    return x.pos_w, x.ts_w, [getattr(x, f) for f in _OTHERS]


def forward_args(q, k, v, x: launch.Extras, max_q: int, max_k: int, p: launch.Params) -> tuple:
    """The arguments of omniattn::attention_fwd for one call."""
    pos_w, ts_w, others = split_extras(x)
    return q, k, v, pos_w, ts_w, others, max_q, max_k, p.ints(), p.floats()


def _join(pos_w, ts_w, others) -> launch.Extras:
    return launch.Extras(pos_w=pos_w, ts_w=ts_w, **dict(zip(_OTHERS, others)))


@torch.library.custom_op("omniattn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, pos_w: Optional[Tensor], ts_w: Optional[Tensor], others: list[Optional[Tensor]],
    max_q: int, max_k: int, ints: list[int], floats: list[float],
) -> tuple[Tensor, Tensor]:
    p = launch.Params.from_lists(ints, floats)
    return launch.forward(q, k, v, _join(pos_w, ts_w, others), max_q, max_k, p)


@attention_fwd.register_fake
def _(q, k, v, pos_w, ts_w, others, max_q, max_k, ints, floats):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    if ints[0] != 0:  # only softmax has an lse
        return out, q.new_empty(0, dtype=torch.float32)
    if q.dim() == 3:
        return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("omniattn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    pos_w: Optional[Tensor], ts_w: Optional[Tensor], others: list[Optional[Tensor]], max_q: int, max_k: int,
    ints: list[int], floats: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    p = launch.Params.from_lists(ints, floats)
    dq, dk, dv, dpos, dts = launch.backward(dout, q, k, v, out, lse, dlse, _join(pos_w, ts_w, others), max_q, max_k,
                                            p)
    return dq, dk, dv, q.new_empty(0) if dpos is None else dpos, q.new_empty(0) if dts is None else dts


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, pos_w, ts_w, others, max_q, max_k, ints, floats):
    dpos = torch.empty_like(pos_w) if pos_w is not None else q.new_empty(0)
    dts = torch.empty_like(ts_w) if ts_w is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpos, dts


def _setup_context(ctx, inputs, output):
    q, k, v, pos_w, ts_w, others, max_q, max_k, ints, floats = inputs
    out, lse = output
    ctx.n_others = len(others)
    # only softmax's backward reads the output (its row term out . dout): sigmoid and SiLU keep the
    # (empty) lse in its place, so an output nothing else holds is freed after the forward
    ctx.save_for_backward(q, k, v, out if ints[0] == 0 else lse, lse, pos_w, ts_w, *others)
    ctx.sizes = (max_q, max_k, ints, floats)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, pos_w, ts_w, *others = ctx.saved_tensors
    max_q, max_k, ints, floats = ctx.sizes
    if dlse is not None and (ints[0] != 0 or dlse.numel() == 0):
        dlse = None
    dq, dk, dv, dpos, dts = attention_bwd(dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse,
                                          dlse, pos_w, ts_w, others, max_q, max_k, ints, floats)
    has_rab = pos_w is not None
    return dq, dk, dv, dpos if has_rab else None, dts if has_rab else None, None, None, None, None, None


torch.library.register_autograd("omniattn::attention_fwd", _backward, setup_context=_setup_context)


class EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager calls: the custom op's dispatch
    (autograd wrapper, redispatch, dynamo guard) costs ~90 us of host time per call, as much as a
    short sequence's kernel; torch.compile still traces the custom op (backends/triton.attention)."""

    @staticmethod
    def forward(ctx, q, k, v, pos_w, ts_w, others, max_q, max_k, ints, floats):
        p = launch.Params.from_lists(ints, floats)
        out, lse = launch.forward(q, k, v, _join(pos_w, ts_w, others), max_q, max_k, p)
        _setup_context(ctx, (q, k, v, pos_w, ts_w, others, max_q, max_k, ints, floats), (out, lse))
        if ints[0] != 0:
            ctx.mark_non_differentiable(lse)
        # an output the loss does not use arrives as None, not as zeros: the lse's gradient is
        # almost always unused, and checking zeros for it would wait for the GPU (a sync per backward)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, pos_w, ts_w, *others = ctx.saved_tensors
        max_q, max_k, ints, floats = ctx.sizes
        if dlse is not None and (ints[0] != 0 or dlse.numel() == 0):
            dlse = None
        if dout is None:  # only the lse was used (softmax: ``out`` is the output)
            dout = torch.zeros_like(out)
        p = launch.Params.from_lists(ints, floats)
        dq, dk, dv, dpos, dts = launch.backward(dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse,
                                                dlse, _join(pos_w, ts_w, others), max_q, max_k, p)
        if torch.is_grad_enabled():  # create_graph=True: a gradient of these gradients must say why it cannot be
            dq, dk, dv = (_NoDoubleBackward.apply(g, q, k, v) for g in (dq, dk, dv))
        return dq, dk, dv, dpos, dts, None, None, None, None, None


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a gradient, tied to the inputs it depends on (q, k, v), whose backward raises
    DOUBLE_BACKWARD (the eager twin of the registration on attention_bwd below)."""

    @staticmethod
    def forward(ctx, g, q, k, v):
        return g.view_as(g)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(DOUBLE_BACKWARD)


def attention(*args):
    """omniattn::attention_fwd's result: through the custom op while torch.compile traces, else the
    eager autograd.Function (no graph needed: a plain call)."""
    if torch.compiler.is_compiling():
        return torch.ops.omniattn.attention_fwd(*args)
    q, k, v, pos_w = args[0], args[1], args[2], args[3]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, pos_w, args[4])):
        return EagerAttention.apply(*args)
    p = launch.Params.from_lists(args[8], args[9])
    return launch.forward(q, k, v, _join(args[3], args[4], args[5]), args[6], args[7], p)

DOUBLE_BACKWARD = (
    "double backward through omniattn's Triton kernels is not supported; for higher-order gradients "
    "use backend='torch' (the tiled PyTorch path) or backend='reference'"
)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD)


# The backward op has no derivative. Registering one that raises turns PyTorch's internal "no
# autograd formula" error, which names neither omniattn nor a way out, into a plain one; it is only
# reached when a gradient of the gradient is asked for (create_graph=True, then backward again).
torch.library.register_autograd("omniattn::attention_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)

"""Ring strategy: the key/value blocks travel around the ranks; each rank keeps its queries.

Forward, at step s rank r holds the K/V block of rank o = r - s (mod P). It first issues the send
of that block to rank r+1 and the receive of block r-s-1 from rank r-1 (one batch_isend_irecv),
then computes its queries against the block it holds (the calls of :mod:`.plan`), folds the
partial results into float32 accumulators (softmax: the exact LSE merge; sigmoid/SiLU: a sum),
and only then waits for the transfer: communication runs under the block's compute.

Backward, the same ring of K/V blocks, plus each block's dK/dV accumulator travelling one step
behind it: at step s rank r adds its contribution for block o to the accumulator it received,
and sends it on while it computes step s+1; after P steps every accumulator is back home. Each
block's gradient uses the primitive ``backends.backward`` with the WHOLE attention's out/lse
(exact: DESIGN.md, "Block primitives").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import blocks
from .comm import Group, Ring
from .layout import Layout
from .plan import plan_block


@dataclass(frozen=True)
class RingPlan:
    g: Group
    layout: Layout
    scores: blocks.Scores
    window: tuple[int, int]
    bias_lengths: Optional[tuple[int, ...]]

    def origin(self, step: int) -> int:
        return (self.g.rank - step) % self.g.size

    def calls(self, step: int):
        lay = self.layout
        return plan_block(lay.segments[self.g.rank], lay.segments[self.origin(step)], self.window, lay.dense,
                          self.bias_lengths)

    def shape(self, like: torch.Tensor, origin: int) -> tuple:
        """Shape of rank ``origin``'s block of a tensor laid out like ``like``."""
        td = blocks.token_dim(self.layout.dense)
        s = list(like.shape)
        s[td] = self.layout.rows[origin]
        return tuple(s)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ring_forward(rp: RingPlan, q, k, v):
    """(out in q's dtype, lse in the accumulation dtype or None) of this rank's queries."""
    dense, sc = rp.layout.dense, rp.scores
    cd = _accum_dtype(q.dtype)
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=cd, device=q.device)
    acc_lse = None
    if sc.score == "softmax":
        lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if dense else (q.shape[1], q.shape[0])
        acc_lse = torch.full(lse_shape, float("-inf"), dtype=cd, device=q.device)
    ring = Ring(rp.g)
    kb, vb = k, v
    for step in range(rp.g.size):
        pending = None
        if step + 1 < rp.g.size:  # start moving the next block before computing on this one
            src = rp.origin(step + 1)
            pending = ring.start([kb, vb], [rp.shape(k, src), rp.shape(v, src)], [k.dtype, v.dtype], k.device)
        for call in rp.calls(step):
            rows, out, lse = blocks.forward(sc, call, q, kb, vb, dense)
            blocks.merge_into(acc, acc_lse, rows, out, lse, dense)
        if pending is not None:
            kb, vb = pending.wait()
    return acc.to(q.dtype), acc_lse


def ring_backward(rp: RingPlan, q, k, v, out, lse, dout):
    dense, sc = rp.layout.dense, rp.scores
    td = blocks.token_dim(dense)
    cd = _accum_dtype(q.dtype)
    ring = Ring(rp.g)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    kb, vb = k, v
    pending_grads = None
    for step in range(rp.g.size):
        pending_kv = None
        if step + 1 < rp.g.size:
            src = rp.origin(step + 1)
            pending_kv = ring.start([kb, vb], [rp.shape(k, src), rp.shape(v, src)], [k.dtype, v.dtype], k.device)
        dkb = torch.zeros(kb.shape, dtype=cd, device=kb.device)
        dvb = torch.zeros(vb.shape, dtype=cd, device=vb.device)
        for call in rp.calls(step):
            qr, kr, dq_c, dk_c, dv_c = blocks.backward(sc, call, q, kb, vb, out, lse, dout, dense)
            blocks.add_into(dq, qr, dq_c, td)
            blocks.add_into(dkb, kr, dk_c, td)
            blocks.add_into(dvb, kr, dv_c, td)
        if pending_grads is not None:  # what the ranks before us accumulated for this block
            rdk, rdv = pending_grads.wait()
            dkb += rdk
            dvb += rdv
        if pending_kv is not None:
            kb, vb = pending_kv.wait()
        if rp.g.size > 1:  # pass this block's gradient on; receive the next block's (ours, at the last step)
            src = rp.origin(step + 1)
            pending_grads = ring.start([dkb, dvb], [rp.shape(k, src), rp.shape(v, src)], [cd, cd], k.device)
        else:
            dk, dv = dkb, dvb
    if pending_grads is not None:
        dk, dv = pending_grads.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Ring context-parallel attention: (q, k, v) shards -> this rank's output rows."""

    @staticmethod
    def forward(ctx, q, k, v, rp: RingPlan):
        k, v = k.contiguous(), v.contiguous()  # point-to-point sends need dense buffers
        out, lse = ring_forward(rp, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rp = rp
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.rp, q, k, v, out, lse, dout)
        return dq, dk, dv, None

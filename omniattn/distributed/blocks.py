"""Running one planned :class:`~omniattn.distributed.plan.BlockCall` on the backend primitives,
and folding its partial result into a rank's accumulators.

A call reads query rows of the rank's buffer and key rows of a key buffer (a ring block, or the
gathered keys). Rows are taken as a view where they are consecutive (always for dense inputs) and
by an index where they are not (zigzag halves of packed sequences, gathered key prefixes).
Every call is validated by :mod:`omniattn.spec` like any public call, with the scalars that make
the split attention equal the unsplit one: the window of the plan, sigmoid's bias -ln(L) of the
WHOLE sequence, SiLU's norm of the whole call (DESIGN.md, wave 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import backends
from .. import spec as _spec
from .layout import _cached, ranges_index
from .plan import BlockCall


@dataclass(frozen=True)
class Scores:
    """The score settings shared by every block call of one context-parallel call."""

    score: str
    scale: float
    softcap: float
    sigmoid_bias: Optional[float]  # explicit; None: -ln(L) of each call's sequences (BlockCall.bias_length)
    silu_norm: Optional[float]  # the unsplit call's norm (set for silu)
    backend: str

    def bias(self, call: BlockCall) -> Optional[float]:
        if self.score != "sigmoid":
            return None
        if self.sigmoid_bias is not None:
            return self.sigmoid_bias
        return -math.log(max(call.bias_length or 1, 1))


class Rows:
    """Rows of a buffer along its token axis: ``slice(start, stop)`` (a view) or an int64 index."""

    def __init__(self, start: int = 0, stop: int = 0, index: Optional[torch.Tensor] = None):
        self.start, self.stop, self.index = start, stop, index

    def take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.index is None:
            return x.narrow(dim, self.start, self.stop - self.start)
        return x.index_select(dim, self.index)


def _rows(ranges: list[tuple[int, int]], device, key, row_map: Optional[torch.Tensor] = None) -> Rows:
    consecutive = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if consecutive and row_map is None:
        return Rows(ranges[0][0], ranges[-1][1]) if ranges else Rows()
    idx = _cached(("rows", key, str(device)), lambda: ranges_index([a for a, _ in ranges], [b - a for a, b in ranges], device))
    return Rows(index=idx if row_map is None else row_map.index_select(0, idx))


@torch.compiler.disable  # host-side index lookups: eager under torch.compile
def select(call: BlockCall, dense: bool, device, row_map: Optional[torch.Tensor] = None) -> tuple[Rows, Rows]:
    """Query rows and key rows of ``call``; ``row_map`` maps key rows to the rows of the buffer
    that holds them (gathered keys in rank order)."""
    qr = _rows([(p.q0, p.q1) for p in call.pieces], device, ("q", call))
    kr = _rows([(p.k0, p.k1) for p in call.pieces], device, ("k", call), row_map)
    return qr, kr


def spec_call(sc: Scores, call: BlockCall, q, k, v, dense: bool):
    """(Spec, Call) of one block call on already selected rows: q (B, m, H, D) / (Tm, H, D)."""
    scalars = dict(score=sc.score, causal=False, window=call.window, scale=sc.scale, sigmoid_bias=sc.bias(call),
                   silu_norm=sc.silu_norm if sc.score == "silu" else None, softcap=sc.softcap, precision="exact",
                   backend=sc.backend, return_lse=False)
    if dense:
        return _spec.dense_call(q, k, v, **scalars)
    lens_q = [p.q1 - p.q0 for p in call.pieces]
    lens_k = [p.k1 - p.k0 for p in call.pieces]

    def offsets():
        cu_q, cu_k = [0], [0]
        for a, b in zip(lens_q, lens_k):
            cu_q.append(cu_q[-1] + a)
            cu_k.append(cu_k[-1] + b)
        return (torch.tensor(cu_q, dtype=torch.int32, device=q.device),
                torch.tensor(cu_k, dtype=torch.int32, device=q.device))

    cu_q, cu_k = _cached(("cu", call, str(q.device)), offsets)  # one tensor per call: spec's host check is cached too
    return _spec.varlen_call(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **scalars)


def token_dim(dense: bool) -> int:
    return 1 if dense else 0


def lse_dim(dense: bool) -> int:
    return 2 if dense else 1


def forward(sc: Scores, call: BlockCall, q, k, v, dense: bool, row_map=None):
    """(query Rows, out, lse) of one call without autograd; lse is None for sigmoid/SiLU."""
    qr, kr = select(call, dense, q.device, row_map)
    td = token_dim(dense)
    spec, c = spec_call(sc, call, qr.take(q, td), kr.take(k, td), kr.take(v, td), dense)
    out, lse = backends.forward(spec, c, sc.backend)
    return qr, out, lse


def backward(sc: Scores, call: BlockCall, q, k, v, out, lse, dout, dense: bool):
    """(query Rows, key Rows, dq, dk, dv) of one call given the WHOLE attention's out/lse/dout."""
    qr, kr = select(call, dense, q.device)
    td = token_dim(dense)
    spec, c = spec_call(sc, call, qr.take(q, td), kr.take(k, td), kr.take(v, td), dense)
    lse_rows = qr.take(lse, lse_dim(dense)) if lse is not None else None
    dq, dk, dv = backends.backward(spec, c, qr.take(out, td), lse_rows, qr.take(dout, td), sc.backend)
    return qr, kr, dq, dk, dv


def with_autograd(sc: Scores, call: BlockCall, q, k, v, dense: bool, row_map=None):
    """(query Rows, out) of one call, recorded by autograd (the all-gather strategy)."""
    qr, kr = select(call, dense, q.device, row_map)
    td = token_dim(dense)
    spec, c = spec_call(sc, call, qr.take(q, td), kr.take(k, td), kr.take(v, td), dense)
    out, _ = backends.run(spec, c, sc.backend)
    return qr, out


# ------------------------------------------------------------------------------------------------
# accumulators (float32, float64 for float64 inputs)


def _lse_as_out(w: torch.Tensor, dense: bool) -> torch.Tensor:
    """A per-(row, head) weight in lse layout, (B, H, N) or (H, T), broadcastable to the output."""
    return (w.transpose(1, 2) if dense else w.transpose(0, 1)).unsqueeze(-1)


def _merge_softmax(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dense: bool) -> None:
    """acc, acc_lse <- the exact softmax merge of (acc, acc_lse) and (out, lse), in place.
    Rows empty in both stay 0 / -inf; a NaN stays NaN (it is never masked as 'empty')."""
    new = torch.logaddexp(acc_lse, lse.to(acc_lse.dtype))
    empty = new == -math.inf
    safe = new.masked_fill(empty, 0.0)
    wa = torch.exp(acc_lse - safe).masked_fill_(empty, 0.0)
    wb = torch.exp(lse.to(acc_lse.dtype) - safe).masked_fill_(empty, 0.0)
    acc.mul_(_lse_as_out(wa, dense)).addcmul_(out, _lse_as_out(wb, dense))
    acc_lse.copy_(new)


def merge_into(acc, acc_lse, rows: Rows, out, lse, dense: bool) -> None:
    """Fold one call's partial output for ``rows`` into the accumulators: the softmax merge when
    ``acc_lse`` is given, else a sum (sigmoid and SiLU partial results add)."""
    td, ld = token_dim(dense), lse_dim(dense)
    if rows.index is None:
        a = acc.narrow(td, rows.start, rows.stop - rows.start)
        if acc_lse is None:
            a.add_(out)
        else:
            _merge_softmax(a, acc_lse.narrow(ld, rows.start, rows.stop - rows.start), out, lse, dense)
        return
    if acc_lse is None:
        acc.index_add_(td, rows.index, out.to(acc.dtype))
        return
    a, al = acc.index_select(td, rows.index), acc_lse.index_select(ld, rows.index)
    _merge_softmax(a, al, out, lse, dense)
    acc.index_copy_(td, rows.index, a)
    acc_lse.index_copy_(ld, rows.index, al)


def add_into(acc: torch.Tensor, rows: Rows, part: torch.Tensor, dim: int) -> None:
    """acc[rows] += part along ``dim`` (gradients of overlapping calls add)."""
    if rows.index is None:
        acc.narrow(dim, rows.start, rows.stop - rows.start).add_(part)
    else:
        acc.index_add_(dim, rows.index, part.to(acc.dtype))

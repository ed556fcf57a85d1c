"""Which kernel calls compute the attention of a block of query rows against a block of key rows.

The kernels align every call's mask bottom-right: with ``nq`` queries, ``nk`` keys and window
(left, right), local query I sees local key J iff ``-left <= (J - I) - (nk - nq) <= right``. A
context-parallel rank instead holds tokens at arbitrary global positions. For a query segment
(positions [a, b)) and a key segment (positions [s, e)) of one sequence, the true rule is
``-left <= j - i <= right`` (causal: right = 0). Trimming the keys to those some query sees and
the queries to those that see some kept key puts the rectangle's bottom-right corner inside the
band, so one kernel call with a *shifted* window computes the pair exactly::

    rectangle rows: queries [a', b'), keys [s', e');  D = s' - a'  (j - i = (J - I) + D)
    kernel window:  left' = (nk - nq) + left + D,  right' = right - D - (nk - nq)   (-1 stays -1)

A pair whose band covers the whole rectangle runs unmasked (window (-1, -1)); a pair that sees
nothing is skipped. Then the pieces of one sequence are merged into their bounding rectangle when
one window computes every pair inside it exactly (checked pair by pair on the achievable range of
J - I), e.g. the zigzag diagonal step [chunk r, chunk 2P-1-r] x the same is one causal call.

Everything here is host arithmetic on a few segments per sequence, cached per layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from .layout import Segment

INF = float("inf")


@dataclass(frozen=True)
class Piece:
    """Query buffer rows [q0, q1) against key buffer rows [k0, k1) of sequence ``seq``, computed
    by the kernel with ``window`` (its bottom-right-aligned (left, right), -1 unbounded)."""

    seq: int
    q0: int
    q1: int
    k0: int
    k1: int
    window: tuple[int, int]


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: pieces with disjoint query rows (dense inputs: exactly one piece) sharing
    a window and, for sigmoid's default bias -ln(L), the sequence length L (``bias_length``)."""

    pieces: tuple[Piece, ...]
    window: tuple[int, int]
    bias_length: Optional[int] = None


def band(window: tuple[int, int]) -> tuple[float, float]:
    """The allowed range of j - i of a (left, right) window."""
    left, right = window
    return (-left if left >= 0 else -INF), (right if right >= 0 else INF)


def _kernel_band(window: tuple[int, int], nq: int, nk: int) -> tuple[float, float]:
    """The range of J - I (rectangle-local) a kernel call with ``window`` allows."""
    lo, hi = band(window)
    return lo + (nk - nq), hi + (nk - nq)


def _clip(lo: float, hi: float, dmin: int, dmax: int) -> Optional[tuple[float, float]]:
    lo, hi = max(lo, dmin), min(hi, dmax)
    return (lo, hi) if lo <= hi else None


def _window_for(tlo: float, thi: float, nq: int, nk: int) -> Optional[tuple[int, int]]:
    """The kernel window that allows exactly J - I in [tlo, thi] on an (nq, nk) rectangle, or None."""
    dmin, dmax, delta = -(nq - 1), nk - 1, nk - nq
    left = -1 if tlo <= dmin else delta - tlo
    right = -1 if thi >= dmax else thi - delta
    if (left != -1 and left < 0) or (right != -1 and right < 0):
        return None
    return int(left), int(right)


def pair_piece(qs: Segment, ks: Segment, window: tuple[int, int]) -> Optional[Piece]:
    """The rectangle and kernel window of one (query segment, key segment) pair; None if no query
    of ``qs`` sees a key of ``ks``."""
    lo, hi = band(window)
    a, b = qs.start, qs.stop
    s, e = max(ks.start, a + lo), min(ks.stop, b + hi)  # keys some query sees: j in [a + lo, b - 1 + hi]
    if s >= e:
        return None
    a2, b2 = max(a, s - hi), min(b, e - lo)  # queries that see a kept key: i in [s - hi, e - 1 - lo]
    if a2 >= b2:
        return None
    s, e, a2, b2 = int(s), int(e), int(a2), int(b2)
    d = s - a2
    w = _window_for(lo - d, hi - d, b2 - a2, e - s)
    if w is None:  # impossible after the trims above: the bottom-right corner lies in the band
        raise RuntimeError(f"omniattn.distributed: no kernel window for pair {qs} x {ks} with window {window}")
    return Piece(qs.seq, qs.row + a2 - qs.start, qs.row + b2 - qs.start, ks.row + s - ks.start, ks.row + e - ks.start, w)


def _overlap(seg: Segment, lo: int, hi: int) -> tuple[int, int]:
    return max(seg.row, lo), min(seg.row + seg.size, hi)


def _covers(segs: list[Segment], lo: int, hi: int) -> bool:
    return sum(max(0, b - a) for a, b in (_overlap(s, lo, hi) for s in segs)) == hi - lo


def _exact(w: tuple[int, int], qsegs, ksegs, q0, q1, k0, k1, window) -> bool:
    """Whether one call on rows [q0, q1) x [k0, k1) with kernel window ``w`` gives every pair of
    segments inside it exactly its true mask."""
    lo, hi = band(window)
    klo, khi = _kernel_band(w, q1 - q0, k1 - k0)
    for qs in qsegs:
        i0, i1 = _overlap(qs, q0, q1)
        if i0 >= i1:
            continue
        for ks in ksegs:
            j0, j1 = _overlap(ks, k0, k1)
            if j0 >= j1:
                continue
            d = (ks.start - ks.row + k0) - (qs.start - qs.row + q0)  # j - i = (J - I) + d
            dmin, dmax = (j0 - k0) - (i1 - 1 - q0), (j1 - 1 - k0) - (i0 - q0)
            if _clip(lo - d, hi - d, dmin, dmax) != _clip(klo, khi, dmin, dmax):
                return False
    return True


def _merge(pieces: list[Piece], qsegs: list[Segment], ksegs: list[Segment], window) -> list[Piece]:
    """The pieces of one sequence as one call over their bounding rectangle, if that is exact."""
    if len(pieces) < 2:
        return pieces
    q0, q1 = min(p.q0 for p in pieces), max(p.q1 for p in pieces)
    k0, k1 = min(p.k0 for p in pieces), max(p.k1 for p in pieces)
    if not (_covers(qsegs, q0, q1) and _covers(ksegs, k0, k1)):
        return pieces
    lo, hi = band(window)
    candidates = [(-1, -1)]
    for qs in qsegs:
        for ks in ksegs:
            d = (ks.start - ks.row + k0) - (qs.start - qs.row + q0)
            delta = (k1 - k0) - (q1 - q0)
            lefts = {-1} | ({delta - (lo - d)} if lo > -INF else set())
            rights = {-1} | ({(hi - d) - delta} if hi < INF else set())
            candidates += [(int(a), int(b)) for a in lefts for b in rights if a >= -1 and b >= -1]
    for w in dict.fromkeys(candidates):  # unmasked first
        if _exact(w, qsegs, ksegs, q0, q1, k0, k1, window):
            return [Piece(pieces[0].seq, q0, q1, k0, k1, w)]
    return pieces


@lru_cache(maxsize=512)
def plan_block(qsegs: tuple[Segment, ...], ksegs: tuple[Segment, ...], window: tuple[int, int], dense: bool,
               bias_lengths: Optional[tuple[int, ...]] = None) -> tuple[BlockCall, ...]:
    """The kernel calls computing queries ``qsegs`` against keys ``ksegs`` exactly.

    ``bias_lengths``: the sequence lengths when sigmoid's default bias -ln(L) is in use (calls
    then hold sequences of one length only, since a call takes one bias).
    """
    by_seq_q: dict[int, list[Segment]] = {}
    by_seq_k: dict[int, list[Segment]] = {}
    for s in qsegs:
        by_seq_q.setdefault(s.seq, []).append(s)
    for s in ksegs:
        by_seq_k.setdefault(s.seq, []).append(s)
    pieces: list[Piece] = []
    for seq, qs_list in by_seq_q.items():
        ks_list = by_seq_k.get(seq, [])
        found = [p for qs in qs_list for ks in ks_list if (p := pair_piece(qs, ks, window)) is not None]
        pieces += _merge(found, qs_list, ks_list, window)
    if dense:
        return tuple(BlockCall((p,), p.window, bias_lengths[p.seq] if bias_lengths else None) for p in pieces)
    calls: list[tuple[tuple, list[Piece]]] = []
    for p in pieces:
        key = (p.window, bias_lengths[p.seq] if bias_lengths else None)
        for k, members in calls:  # a call's pieces must have disjoint query rows (partials merge per row)
            if k == key and (p.q0 >= members[-1].q1 or all(p.q1 <= m.q0 or m.q1 <= p.q0 for m in members)):
                members.append(p)
                break
        else:
            calls.append((key, [p]))
    return tuple(BlockCall(tuple(members), key[0], key[1]) for key, members in calls)

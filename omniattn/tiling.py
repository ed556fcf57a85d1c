"""FastAttention's tiling-mask for the PyTorch backend: which tiles to visit and each tile's mask.

Masks are never materialised for a whole sequence. For a block of query rows we work out, from
the mask's rules, the range of keys any row may see (tiles outside it are skipped without being
computed), split that range into key chunks, and label each chunk FULL (every pair allowed: no
mask at all) or PARTIAL (a (rows, keys) boolean mask built for that chunk only).

Short sequences are packed together into one query block so a jagged batch of tiny sequences
costs a few large matrix products instead of thousands of small ones; such blocks are PARTIAL and
their mask also requires the query and key to belong to the same sequence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .spec import Call, Spec

FULL, PARTIAL = "full", "partial"
INF = 1 << 62


@dataclass(frozen=True)
class QueryBlock:
    """Packed query rows [q0, q1) of sequences [b0, b1) and the packed keys [k0, k1) they may see."""

    q0: int
    q1: int
    b0: int
    b1: int
    k0: int
    k1: int
    r0: int = 0  # position of row q0 in its sequence (single-sequence blocks)

    @property
    def single(self) -> bool:
        return self.b1 - self.b0 == 1


@dataclass
class TokenMeta:
    """Per-token facts (O(T) memory) from which any tile's mask and bias are generated."""

    q_seq: torch.Tensor  # (Tq,) sequence of each query row
    q_pos: torch.Tensor  # (Tq,) position in its sequence, shifted by Lk - Lq (bottom-right alignment)
    k_seq: torch.Tensor
    k_pos: torch.Tensor
    q_id: Optional[torch.Tensor] = None  # HSTU ids
    k_id: Optional[torch.Tensor] = None
    q_max_id: Optional[torch.Tensor] = None
    q_raw_pos: Optional[torch.Tensor] = None  # unshifted positions (HSTU diagonal)
    rab_pos: Optional[torch.Tensor] = None  # positions in the relative bias: targets share the first target's


def _positions(cu: torch.Tensor, lens: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    cu = cu.long()
    total = int(sum(lens))
    seq = torch.repeat_interleave(
        torch.arange(len(lens), device=cu.device), torch.tensor(lens, device=cu.device, dtype=torch.long), output_size=total
    )
    pos = torch.arange(total, device=cu.device) - cu[seq]
    return seq, pos


def hstu_id_of(p: int, length: int, targets: int, contextual: int) -> int:
    """HSTU id of position p (scalar twin of reference.hstu_ids)."""
    i = max(p - contextual + 1, 0) if contextual > 0 else p
    return min(i, hstu_max_id(length, targets, contextual))


def hstu_max_id(length: int, targets: int, contextual: int) -> int:
    return (length - contextual + 1 if contextual > 0 else length) - targets


def _first_pos_with_id(x: int, contextual: int) -> int:
    """Smallest position whose (unclamped) id is >= x."""
    if x <= 0:
        return 0
    return x + contextual - 1 if contextual > 0 else x


def token_meta(spec: Spec, call: Call) -> TokenMeta:
    cu_q, cu_k = call.offsets()
    q_seq, q_raw = _positions(cu_q, call.lens_q)
    k_seq, k_pos = _positions(cu_k, call.lens_k)
    dev = q_seq.device
    shift = torch.tensor(call.lens_k, device=dev, dtype=torch.long) - torch.tensor(call.lens_q, device=dev, dtype=torch.long)
    meta = TokenMeta(q_seq, q_raw + shift[q_seq], k_seq, k_pos, q_raw_pos=q_raw)
    if spec.hstu is not None:
        c = spec.hstu.contextual_seq_len
        lens = torch.tensor(call.lens_q, device=dev, dtype=torch.long)
        tgt = torch.tensor(call.targets_host or (0,) * call.batch, device=dev, dtype=torch.long)
        max_id = ((lens - c + 1) if c > 0 else lens) - tgt
        ids = (q_raw - c + 1).clamp(min=0) if c > 0 else q_raw
        meta.q_max_id = max_id[q_seq]
        meta.q_id = meta.k_id = torch.minimum(ids, meta.q_max_id)
        meta.rab_pos = torch.minimum(q_raw, (lens - tgt)[q_seq])
    return meta


def query_blocks(call: Call, block_q: int) -> list[QueryBlock]:
    """Cover every query row once: long sequences in blocks of ``block_q`` rows, runs of short
    sequences packed into one block while their rows fit."""
    blocks = []
    cu_q = [0]
    cu_k = [0]
    for lq, lk in zip(call.lens_q, call.lens_k):
        cu_q.append(cu_q[-1] + lq)
        cu_k.append(cu_k[-1] + lk)
    b, nb = 0, call.batch
    while b < nb:
        lq = call.lens_q[b]
        if lq == 0:
            b += 1
            continue
        if lq > block_q // 2:
            for r in range(0, lq, block_q):
                blocks.append(QueryBlock(cu_q[b] + r, cu_q[b] + min(r + block_q, lq), b, b + 1, cu_k[b], cu_k[b + 1], r))
            b += 1
            continue
        e = b + 1
        while e < nb and call.lens_q[e] <= block_q // 2 and cu_q[e + 1] - cu_q[b] <= block_q:
            e += 1
        blocks.append(QueryBlock(cu_q[b], cu_q[e], b, e, cu_k[b], cu_k[e]))
        b = e
    return blocks


def key_chunks(spec: Spec, call: Call, blk: QueryBlock, block_k: int, aligned: bool = False
               ) -> Iterator[tuple[int, int, int, int]]:
    """Packed key chunks (c0, c1, p0, p1) the block must visit: keys [c0, c1), of which only
    [p0, p1) may hold disallowed pairs (p0 == p1: a FULL chunk, no mask at all; else PARTIAL).
    Skipped chunks never appear. ``aligned``: chunks on the grid of block_k keys from the
    sequence start (the Triton kernel's key tiles), every one masked.

    A causal block's keys before its diagonal are FULL: only the diagonal square needs a mask.
    Where a sequence's visible keys fit one chunk they stay one chunk (a separate diagonal tile
    would only add ops) and the mask covers the diagonal columns only."""
    if not blk.single:
        for c0 in range(blk.k0, blk.k1, block_k):
            c1 = min(c0 + block_k, blk.k1)
            yield c0, c1, c0, c1
        return
    b, k0 = blk.b0, blk.k0
    lq, lk = call.lens_q[b], call.lens_k[b]
    row0, row1 = blk.r0, blk.r0 + (blk.q1 - blk.q0) - 1
    if aligned:
        if spec.hstu is not None:
            lo, hi, _ = _hstu_bounds(spec, call, b, row0, row1)
        else:
            lo, hi = _window_bounds(spec, lq, lk, row0, row1)[:2]
        lo, hi = max(lo, 0), min(hi, lk - 1)
        for j0 in range((lo // block_k) * block_k, hi + 1, block_k):
            j1 = min(j0 + block_k, lk)
            yield k0 + j0, k0 + j1, k0 + j0, k0 + j1
        return
    if spec.hstu is not None:
        lo, hi, classify = _hstu_bounds(spec, call, b, row0, row1)
        lo, hi = max(lo, 0), min(hi, lk - 1)
        cut = row0 if spec.hstu.causal and lo < row0 <= hi else hi + 1  # the diagonal starts a chunk
        for a, z in ((lo, cut - 1), (cut, hi)):
            for j0 in range(a, z + 1, block_k):
                j1 = min(j0 + block_k, z + 1)
                full = classify(j0, j1 - 1) == FULL
                yield k0 + j0, k0 + j1, (k0 + j1 if full else k0 + j0), k0 + j1
        return
    lo, hi, full_lo, full_hi = _window_bounds(spec, lq, lk, row0, row1)
    lo, hi = max(lo, 0), min(hi, lk - 1)
    if lo > hi:
        return
    f0, f1 = max(full_lo, lo), min(full_hi, hi)
    if f0 > f1:  # no key every row sees
        for j0 in range(lo, hi + 1, block_k):
            j1 = min(j0 + block_k, hi + 1)
            yield k0 + j0, k0 + j1, k0 + j0, k0 + j1
    elif hi - lo < block_k:  # one chunk: masked columns are the edges [lo, f0) and (f1, hi]
        p0 = lo if lo < f0 else f1 + 1
        p1 = hi + 1 if f1 < hi else f0
        if p1 <= p0:  # both edges empty: every pair allowed
            p0 = p1 = hi + 1
        yield k0 + lo, k0 + hi + 1, k0 + p0, k0 + p1
    else:
        for a, z, full in ((lo, f0 - 1, False), (f0, f1, True), (f1 + 1, hi, False)):
            for j0 in range(a, z + 1, block_k):
                j1 = min(j0 + block_k, z + 1)
                yield k0 + j0, k0 + j1, (k0 + j1 if full else k0 + j0), k0 + j1


def _window_bounds(spec: Spec, lq: int, lk: int, row0: int, row1: int) -> tuple[int, int, int, int]:
    """Rows row0..row1 see keys in [lo(row), hi(row)], both bounds increasing with the row: the
    keys some row sees, [lo(row0), hi(row1)], and the keys every row sees, [lo(row1), hi(row0)]."""
    left, right = spec.window
    shift = lk - lq

    def lo(i):
        return i + shift - left if left >= 0 else -INF

    def hi(i):
        return i + shift + right if right >= 0 else INF

    return lo(row0), hi(row1), lo(row1), hi(row0)


@functools.lru_cache(maxsize=64)
def window_tile_mask(left: int, right: int, m: int, n: int, offset: int, device: torch.device) -> torch.Tensor:
    """(m, n) bool mask of a one-sequence tile of a causal/window mask whose key 0 sits ``offset``
    positions after its query row 0 (bottom-right aligned positions). Tiles of a call mostly share
    a few offsets, so the masks are cached; callers must not modify them."""
    d = torch.arange(n, device=device).view(1, -1) - torch.arange(m, device=device).view(-1, 1) + offset
    ok = torch.ones(m, n, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= d >= -left
    if right >= 0:
        ok &= d <= right
    return ok


def _hstu_bounds(spec: Spec, call: Call, b: int, row0: int, row1: int):
    """Key range and chunk classes of HSTU's id mask; ids are non-decreasing in position."""
    h = spec.hstu
    length = call.lens_q[b]
    t = call.targets_host[b] if call.targets_host is not None else 0
    c, w = h.contextual_seq_len, h.max_attn_len
    max_id = hstu_max_id(length, t, c)

    def ident(p):
        return hstu_id_of(p, length, t, c)

    if c > 0 and ident(row0) == 0:  # contextual rows see every non-target token
        return 0, length - 1, lambda j0, j1: PARTIAL
    lo = _first_pos_with_id(ident(row0) - w, c) if w > 0 else 0
    if h.causal:
        hi = row1
    elif w > 0 and ident(row1) + w < max_id:
        hi = _first_pos_with_id(ident(row1) + w + 1, c) - 1
    else:
        hi = length - 1

    def classify(j0, j1):
        if h.causal:
            d_min, d_max = ident(row0) - ident(j1), ident(row1) - ident(j0)
        elif ident(row0) > ident(j1):
            d_min, d_max = ident(row0) - ident(j1), ident(row1) - ident(j0)
        elif ident(j0) > ident(row1):
            d_min, d_max = ident(j0) - ident(row1), ident(j1) - ident(row0)
        else:
            return PARTIAL
        if d_min > 0 and (w == 0 or d_max <= w):
            return FULL
        return PARTIAL

    return lo, hi, classify


def chunk_mask(spec: Spec, meta: TokenMeta, q0: int, q1: int, c0: int, c1: int, single: bool) -> torch.Tensor:
    """(q1 - q0, c1 - c0) bool: which (query, key) pairs of this tile are allowed."""
    kp = meta.k_pos[c0:c1].view(1, -1)
    if spec.hstu is not None:
        h = spec.hstu
        qi, kj = meta.q_id[q0:q1].view(-1, 1), meta.k_id[c0:c1].view(1, -1)
        d = qi - kj
        if not h.causal:
            d = d.abs()
        ok = (meta.q_raw_pos[q0:q1].view(-1, 1) == kp) | (d > 0)
        if h.max_attn_len > 0:
            ok &= d <= h.max_attn_len
        if h.contextual_seq_len > 0:
            ok |= (qi == 0) & (kj < meta.q_max_id[q0:q1].view(-1, 1))
    else:
        left, right = spec.window
        qp = meta.q_pos[q0:q1].view(-1, 1)
        ok = torch.ones(q1 - q0, c1 - c0, dtype=torch.bool, device=kp.device)
        if left >= 0:
            ok &= kp >= qp - left
        if right >= 0:
            ok &= kp <= qp + right
    if not single:
        ok &= meta.q_seq[q0:q1].view(-1, 1) == meta.k_seq[c0:c1].view(1, -1)
    return ok

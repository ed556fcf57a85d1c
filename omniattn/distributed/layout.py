"""Which tokens of the global sequence(s) each rank holds: the shard layout of context parallelism.

A rank's shard is a buffer of rows (tokens). Each run of consecutive rows that are consecutive
tokens of one sequence is a :class:`Segment`. Two layouts:

* ``"zigzag"`` (load balanced for causal masks): every sequence of length L is cut into 2P equal
  chunks of L / (2P) tokens; rank r holds chunks r and 2P-1-r of every sequence, in that order::

      P = 2, one sequence of 8 tokens:   chunks  [t0 t1 | t2 t3 | t4 t5 | t6 t7]
      rank 0 holds chunks 0 and 3:       [t0 t1 t6 t7]
      rank 1 holds chunks 1 and 2:       [t2 t3 t4 t5]

  Packed (varlen) batches: rank r's buffer is, sequence after sequence, [chunk r, chunk 2P-1-r],
  so it is itself a packed batch with offsets ``cu_seqlens // P``. Every sequence length must be
  a multiple of 2P.
* ``None`` (contiguous): rank r holds rows [T_r, T_{r+1}) of the global token axis (dense: the
  sequence axis; varlen: the packed axis, sequences may straddle ranks). Any sizes, also 0.

Dense batches (B, N, ...) are described by one "template" sequence of length N (sequence 0):
every batch entry is split the same way along dim 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

LOAD_BALANCES = ("zigzag", None)


@dataclass(frozen=True)
class Segment:
    """Tokens [start, stop) of sequence ``seq`` stored at buffer rows [row, row + stop - start)."""

    seq: int
    start: int
    stop: int
    row: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Layout:
    """Sequence lengths (dense: the one template length N) and every rank's segments."""

    lengths: tuple[int, ...]
    dense: bool
    load_balance: Optional[str]
    segments: tuple[tuple[Segment, ...], ...]  # [rank] -> segments in buffer order
    rows: tuple[int, ...]  # [rank] -> buffer rows

    @property
    def world(self) -> int:
        return len(self.rows)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of every sequence on the global packed token axis (dense: (0,))."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def max_rows(self) -> int:
        return max(self.rows) if self.rows else 0

    def even(self) -> bool:
        return len(set(self.rows)) <= 1


def zigzag(lengths: Sequence[int], world: int, dense: bool, name: str = "q") -> Layout:
    """Every sequence in 2P chunks; rank r holds chunks r and 2P-1-r (see the module docstring)."""
    lengths = tuple(int(n) for n in lengths)
    bad = [(b, n) for b, n in enumerate(lengths) if n % (2 * world)]
    if bad:
        b, n = bad[0]
        what = f"the sequence length {n}" if dense else f"sequence {b} has {n} tokens, which"
        raise ValueError(
            f"{name}: load_balance='zigzag' cuts every sequence into 2 x world_size = {2 * world} equal chunks, "
            f"but {what} is not a multiple of {2 * world}; pad every sequence to a multiple of {2 * world} "
            "(padding keys must then be masked out by the caller), or pass load_balance=None (contiguous shards "
            "of any size, causal work is then unbalanced)"
        )
    segments, rows = [], []
    for r in range(world):
        segs, row = [], 0
        for b, n in enumerate(lengths):
            c = n // (2 * world)
            if c == 0:
                continue
            for chunk in (r, 2 * world - 1 - r):
                segs.append(Segment(b, chunk * c, (chunk + 1) * c, row))
                row += c
        segments.append(tuple(segs))
        rows.append(row)
    return Layout(lengths, dense, "zigzag", tuple(segments), tuple(rows))


def contiguous(lengths: Sequence[int], rows_per_rank: Sequence[int], dense: bool) -> Layout:
    """Rank r holds rows [T_r, T_{r+1}) of the global token axis; sizes may differ (and be 0)."""
    lengths = tuple(int(n) for n in lengths)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    segments, start = [], 0
    for n_rows in rows_per_rank:
        stop = start + n_rows
        segs = []
        for b, n in enumerate(lengths):
            lo, hi = max(start, offsets[b]), min(stop, offsets[b + 1])
            if lo < hi:
                segs.append(Segment(b, lo - offsets[b], hi - offsets[b], lo - start))
        segments.append(tuple(segs))
        start = stop
    return Layout(lengths, dense, None, tuple(segments), tuple(int(n) for n in rows_per_rank))


def even_split(total: int, world: int) -> tuple[int, ...]:
    """torch.tensor_split's sizes: the first ``total % world`` ranks get one row more."""
    base, extra = divmod(total, world)
    return tuple(base + (1 if r < extra else 0) for r in range(world))


def build(lengths: Sequence[int], world: int, dense: bool, load_balance: Optional[str],
          rows_per_rank: Optional[Sequence[int]] = None) -> Layout:
    """The layout for ``load_balance``; contiguous layouts take the ranks' row counts (default even)."""
    if load_balance == "zigzag":
        return zigzag(lengths, world, dense)
    total = sum(lengths)
    return contiguous(lengths, rows_per_rank if rows_per_rank is not None else even_split(total, world), dense)


# Index tensors are rebuilt from a layout on every call of a model's every layer: cache them per
# (layout, device). Layouts are small frozen dataclasses, so they key the cache directly.
_INDEX_CACHE: dict = {}


def _cached(key, build_fn) -> torch.Tensor:
    if key not in _INDEX_CACHE:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = build_fn()
    return _INDEX_CACHE[key]


def ranges_index(starts: Sequence[int], sizes: Sequence[int], device=None) -> torch.Tensor:
    """Concatenation of arange(start, start + size) for every range, int64, built without a Python
    loop over tokens."""
    sizes_t = torch.tensor(list(sizes), dtype=torch.long)
    total = int(sizes_t.sum()) if len(sizes) else 0
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    starts_t = torch.tensor(list(starts), dtype=torch.long)
    firsts = torch.cumsum(sizes_t, 0) - sizes_t  # position of each range in the output
    idx = torch.arange(total) + torch.repeat_interleave(starts_t - firsts, sizes_t, output_size=total)
    return idx.to(device)


def global_rows(layout: Layout, rank: int, device=None) -> torch.Tensor:
    """(rows_rank,) int64: the global packed token index (dense: the position) of each local row."""
    offsets = layout.offsets
    segs = layout.segments[rank]
    return _cached(("global_rows", layout, rank, str(device)),
                   lambda: ranges_index([offsets[s.seq] + s.start for s in segs], [s.size for s in segs], device))


def positions(layout: Layout, rank: int, device=None) -> torch.Tensor:
    """(rows_rank,) int64: the position of each local row within its own sequence (for RoPE)."""
    segs = layout.segments[rank]
    return _cached(("positions", layout, rank, str(device)),
                   lambda: ranges_index([s.start for s in segs], [s.size for s in segs], device))


def _build_gathered_index(layout: Layout, stride: int, device) -> Optional[torch.Tensor]:
    offsets = layout.offsets
    idx = torch.empty(offsets[-1], dtype=torch.long)
    identity = True
    for o, segs in enumerate(layout.segments):
        for s in segs:
            base = offsets[s.seq] + s.start
            src = o * stride + s.row
            identity &= src == base
            idx[base : base + s.size] = torch.arange(src, src + s.size)
    return None if identity else idx.to(device)


@torch.compiler.disable  # host-side: eager under torch.compile
def gathered_index(layout: Layout, stride: int, device=None) -> Optional[torch.Tensor]:
    """Rows of the rank-ordered gathered buffer in global token order (rank o's buffer starting at
    row o * stride, stride >= every rank's rows: padded gathers); None when that is the identity
    (contiguous shards of equal size: the gather is already in global order)."""
    return _cached(("gathered", layout, stride, str(device)), lambda: _build_gathered_index(layout, stride, device))

"""Grids over the real tiles of a varlen batch (host side).

A packed batch of sequences of different lengths, launched on a (tiles of the longest sequence)
x (sequences) grid, spends programs on padding and runs the heaviest tiles last. Here the grid
is a list of the real (sequence, head, tile) triples: the longest sequences first, and within a
sequence and head its tiles heaviest first (with causal-like masks a later query tile sees more
keys, and an earlier key tile is seen by more queries). The tiles of one (sequence, head) stay
together, so the programs running at once share that head's K and V in L2: ordering every tile
of the batch by weight alone measured 11x slower at 32 x 4096 (each program streamed K/V from DRAM).
"""

from __future__ import annotations

from typing import Optional

import torch

_CACHE: dict = {}
_CACHE_SIZE = 64


def tile_list(tiled: tuple[int, ...], other: tuple[int, ...], block: int, causal: bool, queries: bool, heads: int,
              device: torch.device, windows: Optional[tuple] = None) -> torch.Tensor:
    """(programs, 3) int32 (sequence, head, tile) over ``tiled`` lengths split into ``block``-sized
    tiles. ``other``: the lengths of the other side; ``queries``: tiles are query tiles (else key
    tiles); ``windows`` (query tiles only): per sequence, the (start, stop) ranges whose rows are
    wanted; tiles that meet none of them are left out."""
    return _cached((tiled, other, block, causal, queries, heads, str(device), windows),
                   lambda: _tile_list(tiled, other, block, causal, queries, heads, device, windows))


def _tile_list(tiled, other, block, causal, queries, heads, device, windows) -> torch.Tensor:
    lens = torch.tensor(tiled, dtype=torch.int64)
    others = torch.tensor(other, dtype=torch.int64)
    counts = (lens + block - 1) // block
    seqs = torch.argsort(-(lens * others), stable=True)  # heaviest sequences first
    seqs = seqs[counts[seqs] > 0]
    per_seq = counts[seqs]
    seq = torch.repeat_interleave(seqs, per_seq * heads)
    first = torch.repeat_interleave(torch.cumsum(per_seq * heads, 0) - per_seq * heads, per_seq * heads)
    idx = torch.arange(int((per_seq * heads).sum())) - first  # position within the sequence's block
    n = counts[seq]
    head = idx // n
    rank = idx % n  # 0 = the heaviest tile
    if causal:
        tile = (n - 1 - rank) if queries else rank
    else:
        tile = rank
    out = torch.stack([seq, head, tile], 1).to(torch.int32).contiguous()
    if windows is not None:
        w = max((len(r) for r in windows), default=0)
        bounds = torch.zeros(len(windows), max(w, 1), 2, dtype=torch.int64)  # padding: empty (0, 0) ranges
        for s, ranges in enumerate(windows):
            if ranges:
                bounds[s, : len(ranges)] = torch.tensor(ranges, dtype=torch.int64)
        a, b = bounds[seq, :, 0], bounds[seq, :, 1]
        wanted = ((a < ((tile + 1) * block)[:, None]) & ((tile * block)[:, None] < b)).any(1)
        out = out[wanted].contiguous()
    return _to(out, device)


def _to(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    return table if device.type == "cpu" else table.pin_memory().to(device, non_blocking=True)


def _cached(key, build):
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        hit = _CACHE[key] = build()
    return hit


def query_windows(windows: tuple, block: int, device: torch.device) -> torch.Tensor:
    """(W, sequences, 2) int32: per sequence, W ranges [lo, hi) of query rows, each widened to
    whole ``block`` tiles and merged with any it then meets (so no tile is in two of them),
    padded with empty (0, 0) ranges. One dK/dV launch visits one range per sequence."""
    return _cached(("windows", windows, block, str(device)), lambda: _query_windows(windows, block, device))


def _query_windows(windows: tuple, block: int, device: torch.device) -> torch.Tensor:
    merged = []
    for ranges in windows:
        out: list = []
        for a, b in sorted((a // block * block, -(-b // block) * block) for a, b in ranges if b > a):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        merged.append(out)
    w = max((len(r) for r in merged), default=0)
    table = torch.zeros(max(w, 1), len(merged), 2, dtype=torch.int32)
    for s, ranges in enumerate(merged):
        for i, (a, b) in enumerate(ranges):
            table[i, s] = torch.tensor([a, b], dtype=torch.int32)
    return _to(table, device)

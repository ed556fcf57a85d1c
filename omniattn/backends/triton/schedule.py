"""Grids over the real tiles of a varlen batch (host side).

A packed batch of sequences of different lengths, launched on a (tiles of the longest sequence)
x (sequences) grid, spends programs on padding and runs the heaviest tiles last. Here the grid
is a list of the real (sequence, tile) pairs, heaviest first: with causal-like masks a later
query tile sees more keys (and a key tile is seen by more queries the earlier it is), else
every tile of a sequence costs that sequence's length in the other dimension.
"""

from __future__ import annotations

import torch

_CACHE: dict = {}
_CACHE_SIZE = 64


def tile_list(tiled: tuple[int, ...], other: tuple[int, ...], block: int, causal: bool, queries: bool,
              device: torch.device) -> torch.Tensor:
    """(tiles, 2) int32 (sequence, tile index) over ``tiled`` lengths split into ``block``-sized
    tiles, heaviest first. ``other``: the lengths of the other side; ``queries``: tiles are query
    tiles (else key tiles)."""
    key = (tiled, other, block, causal, queries, str(device))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    lens = torch.tensor(tiled, dtype=torch.int64)
    others = torch.tensor(other, dtype=torch.int64)
    counts = (lens + block - 1) // block
    seq = torch.repeat_interleave(torch.arange(len(tiled)), counts)
    first = torch.cumsum(counts, 0) - counts
    tile = torch.arange(int(counts.sum())) - first[seq]
    if causal:  # query tile t sees ~ (t+1) blocks of keys; key tile t is seen by ~ (count - t) query blocks
        work = (tile + 1) * block if queries else (counts[seq] - tile) * block
    else:
        work = others[seq]
    order = torch.argsort(-work, stable=True)
    out = torch.stack([seq[order], tile[order]], 1).to(torch.int32).contiguous().to(device)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = out
    return out

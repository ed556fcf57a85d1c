"""All-gather strategy (Llama 3's context parallelism): every rank gathers all keys and values,
then computes its own queries against them; the backward reduce-scatters dK/dV.

The gather is PyTorch's functional collective (``all_gather_tensor_autograd``: its backward is a
reduce-scatter), so the whole strategy is plain autograd and traceable where functional
collectives are. K and V travel as one tensor: one collective forward and one backward, so no two
collectives can be issued in different orders on different ranks. Shards of different sizes are
padded to the largest before the gather.

A query segment at global positions [a, b) needs keys up to b (+ the right window): the planner
cuts the keys so that the kernel's bottom-right alignment is exact (see :mod:`.plan`), e.g. with a
causal mask query chunk x of a zigzag shard sees keys [0, (x+1) c): one unmasked-prefix call per
chunk, no merge of partial results.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import blocks
from .comm import Group
from .layout import Layout, Segment, gathered_index
from .plan import plan_block


def _functional_all_gather(differentiable: bool):
    """PyTorch's functional all-gather along dim 0 (its newer name where it has one)."""
    from torch.distributed import _functional_collectives as funcol

    if differentiable:
        return getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def gather_tokens(x: torch.Tensor, g: Group, layout: Layout, dim: int, differentiable: bool = True):
    """Every rank's buffer of ``x`` along ``dim``, rank after rank, each padded to the largest
    buffer; returns (gathered, row_map) where row_map lists the gathered rows in global token
    order (None: already in order)."""
    stride = layout.max_rows
    if x.shape[dim] < stride:
        pad = list(x.shape)
        pad[dim] = stride - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    if g.size > 1:  # gathered along dim 0 (what the functional collective supports), then moved back
        x = _functional_all_gather(differentiable)(x.movedim(dim, 0).contiguous(), 0, g.pg).movedim(0, dim)
    return x, gathered_index(layout, stride, x.device)


def global_key_segments(layout: Layout) -> tuple[Segment, ...]:
    """Every sequence whole, at its global packed rows (dense: positions of the template)."""
    offsets = layout.offsets
    return tuple(Segment(b, 0, n, offsets[b]) for b, n in enumerate(layout.lengths) if n > 0)


def gather_kv(k, v, g: Group, layout: Layout):
    """(K, V, row_map): all keys and values; dense ones in global order (row = position), packed
    ones in rank order with ``row_map`` from global packed rows to gathered rows."""
    td = blocks.token_dim(layout.dense)
    d = k.shape[-1]
    kv, row_map = gather_tokens(torch.cat([k, v], -1), g, layout, td)
    if layout.dense and row_map is not None:  # one reorder makes every key range a view
        kv, row_map = kv.index_select(td, row_map), None
    return kv[..., :d], kv[..., d:], row_map


def assemble(parts, like: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """The rank's output from the calls' (Rows, out) parts (each row written by exactly one call)."""
    shape = list(like.shape)
    shape[dim] = rows
    if not parts:
        return like.new_zeros(shape)
    spans = sorted((r.start, r.stop, o) for r, o in parts if r.index is None) if all(r.index is None for r, _ in parts) else None
    if spans is not None and spans[0][0] == 0 and spans[-1][1] == rows and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return spans[0][2] if len(spans) == 1 else torch.cat([o for _, _, o in spans], dim)
    out = like.new_zeros(shape)
    for r, o in parts:
        idx = r.index if r.index is not None else torch.arange(r.start, r.stop, device=o.device)
        out = out.index_copy(dim, idx, o)
    return out


@torch.compiler.disable  # host-side planning: eager under torch.compile
def _plan(layout: Layout, rank: int, window, bias_lengths):
    return plan_block(layout.segments[rank], global_key_segments(layout), window, layout.dense, bias_lengths)


def allgather_attention(q, k, v, g: Group, layout: Layout, scores: blocks.Scores, window: tuple[int, int],
                        bias_lengths: Optional[tuple[int, ...]]) -> torch.Tensor:
    """This rank's output rows, recorded by autograd (dK/dV reduce-scattered in the backward)."""
    dense = layout.dense
    td = blocks.token_dim(dense)
    kg, vg, row_map = gather_kv(k, v, g, layout)
    calls = _plan(layout, g.rank, window, bias_lengths)
    parts = [blocks.with_autograd(scores, call, q, kg, vg, dense, row_map) for call in calls]
    out = assemble(parts, q.new_empty(q.shape[:-1] + (v.shape[-1],)), layout.rows[g.rank], td)
    if not parts:
        # No query here (an empty shard): still connect the output to q and the gathered K/V, so
        # this rank's backward runs the reduce-scatter the other ranks wait for.
        out = out + (q.sum() + kg.sum() + vg.sum()).to(out.dtype) * 0
    return out

"""Context-parallel HSTU attention (jagged user histories split across ranks).

Without targets, contextual prefix or relative bias, HSTU attention is SiLU attention, causal or
not, with max_attn_len as a window (DESIGN.md), and runs as :func:`context_parallel_attention`
with ``score="silu"``: the ring or all-gather strategy, whose kernel calls are plain query chunks
against cut key ranges, on the fastest kernels (the Hopper ones included; the path below asks the
kernels to skip other ranks' rows, which only the generic template can: 0.89 of one GPU's
per-GPU speed at 256K tokens on 2 H100s where this path reached 0.96: NOTES.md, session 17).

Otherwise HSTU's ids, targets, contextual prefix and relative bias depend on GLOBAL positions, and
the HSTU kernels take no position offset, so this uses the all-gather strategy on the whole packed
batch:
gather K, V (one differentiable collective) and the timestamps; place the rank's query rows into
a zero-filled full-length query buffer (a differentiable scatter); run ``hstu_attention`` over the
whole batch; read back the rank's rows. Gradients: dQ is read back from the buffer, dK/dV are
reduce-scattered by the gather's backward, and the relative bias weights' gradient is summed over
the group (``reduce_rab_grads``).

Cost: the call tells the kernels which rows the rank reads (``Call.query_windows``); the Triton
kernels skip the other rows' query tiles in the forward and dQ, and visit only the rank's rows
from each key tile in dK/dV, so a rank does its share of the work (with ``load_balance="zigzag"``
an equal share under causal masks). With the relative bias or a contextual prefix, and on the
other backends, every row is computed (correct, the whole batch's work on each rank).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from .. import backends
from .. import spec as _spec
from . import layout as _layout
from .allgather import gather_tokens
from .api import (STRATEGIES, _check_choice, _check_same, _dtype_code, _global_lengths, _layout_for,
                  context_parallel_attention)
from .comm import agree, digest, resolve_group

Tensor = torch.Tensor
# strategy="auto" without targets, prefix or bias: 2 x H100, one 256K-token sequence, 32 heads,
# forward + backward scaling efficiency 0.96-0.97 all-gather, 0.83-0.84 ring in two runs (NOTES.md, session 17)
PLAIN_AUTO = "allgather"


class _SumGradsOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the weights' gradients over the group (one all-reduce)."""

    @staticmethod
    def forward(ctx, pg, *weights):
        ctx.pg = pg
        return tuple(w.clone() for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ctx.pg)
        out, at = [], 0
        for g in grads:
            out.append(flat[at : at + g.numel()].view_as(g))
            at += g.numel()
        return (None, *out)


def _windows(lay: _layout.Layout, rank: int) -> tuple:
    """Per sequence, the (start, stop) positions of this rank's rows (Call.query_windows)."""
    out: list = [[] for _ in lay.lengths]
    for s in lay.segments[rank]:
        out[s.seq].append((s.start, s.stop))
    return tuple(tuple(r) for r in out)


def context_parallel_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    group=None,
    load_balance: Optional[str] = "zigzag",
    alpha: Optional[float] = None,
    causal: bool = True,
    num_targets: Optional[Tensor] = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    rab=None,
    timestamps: Optional[Tensor] = None,
    silu_norm: Optional[float] = None,
    reduce_rab_grads: bool = True,
    strategy: str = "auto",
    backend: str = "auto",
) -> Tensor:
    """:func:`omniattn.hstu_attention` over a jagged batch whose tokens are split across ranks.

    Args:
        q, k: this rank's shard (T_local, H, Dqk); v: (T_local, H, Dv); laid out as
            :func:`context_parallel_attention`'s packed shards (``load_balance="zigzag"``: every
            sequence length a multiple of 2P; ``None``: contiguous runs of the packed tokens, any
            sizes, also empty).
        seq_offsets: (B+1,) offsets of the GLOBAL jagged batch, the same on every rank.
        max_seq_len, alpha, causal, num_targets (global, (B,)), contextual_seq_len, max_attn_len,
            rab, silu_norm: as :func:`omniattn.hstu_attention` on the whole batch.
        timestamps: with ``rab``, this rank's shard of the timestamps, (T_local,).
        reduce_rab_grads: sum the gradients of ``rab``'s weights over the group in the backward, so
            every rank holds the whole batch's gradient. Pass False when gradients of all
            parameters are reduced over the context-parallel ranks anyway (FSDP/DDP over a mesh
            that includes them): the weights' gradient is then summed once, like every other
            parameter's.
        strategy: without targets, contextual prefix or rab (plain causal/windowed SiLU
            attention): ``"ring"``, ``"allgather"`` or ``"auto"`` (all-gather: measured faster
            for HSTU's shapes), as :func:`context_parallel_attention`. With any of them only the
            whole-batch all-gather path exists: ``"auto"`` or ``"allgather"``.
        backend: as :func:`omniattn.hstu_attention`.

    Returns:
        (T_local, H, Dv): this rank's rows of the output.

    The Triton kernels compute only this rank's rows (see the module docstring).
    """
    what = "context_parallel_hstu_attention"
    q, k, v = _spec.autocast_qkv(q, k, v)  # as omniattn.hstu_attention (DESIGN.md)
    g = resolve_group(group)
    error, lengths = None, ()
    try:
        _check_choice("load_balance", load_balance, _layout.LOAD_BALANCES)
        _check_choice("strategy", strategy, STRATEGIES)
        for name, t in (("q", q), ("k", k), ("v", v)):
            _spec._require_tensor(name, t, 3, "(total_local, heads, dim)")
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            raise ValueError(f"k/v: a shard holds its own tokens: expected {q.shape[0]} rows (as q), got {k.shape[0]}, {v.shape[0]}")
        _spec.dense_call(q[None], k[None], v[None], score="silu", causal=False, window=(-1, -1), scale=alpha,
                         sigmoid_bias=None, silu_norm=None, softcap=0.0, precision="exact", backend=backend,
                         return_lse=False)
        lengths = _global_lengths(seq_offsets, q.device)
        if (rab is None) != (timestamps is None):
            raise ValueError("timestamps: pass this rank's timestamps (T_local,) with rab, and neither without it")
        if timestamps is not None:
            if not isinstance(timestamps, Tensor) or tuple(timestamps.shape) != (q.shape[0],):
                raise ValueError(f"timestamps: expected this rank's shard of shape ({q.shape[0]},), got "
                                 f"{getattr(timestamps, 'shape', type(timestamps).__name__)}")
    except (ValueError, TypeError) as e:
        error = e
    ok = error is None
    targets = tuple(num_targets.tolist()) if isinstance(num_targets, Tensor) else num_targets
    plain = ok and rab is None and not contextual_seq_len and not any(targets or ())
    if ok and not plain and strategy == "ring":
        error = ValueError("strategy: 'ring' needs an HSTU call without targets, contextual prefix or rab; with them "
                           "use 'allgather' or 'auto' (the whole-batch all-gather path)")
        ok = False
    args = digest(max_seq_len, alpha, causal, targets, contextual_seq_len, max_attn_len, rab is not None,
                  silu_norm, reduce_rab_grads, load_balance, strategy, lengths)
    local = [q.shape[0] if ok else 0, *((q.shape[1], k.shape[1], q.shape[2], v.shape[2]) if ok else (0,) * 4),
             _dtype_code(q.dtype) if ok else 0, timestamps.dtype.itemsize if ok and timestamps is not None else 0, args]
    ranks = agree(g, q.device if isinstance(q, Tensor) else torch.device("cpu"), local, error, what)
    _check_same([r[1:] for r in ranks], ("heads", "key/value heads", "head dim", "value head dim", "dtype",
                                         "timestamps dtype", "arguments (seq_offsets, num_targets, max_seq_len, "
                                         "alpha, causal, contextual_seq_len, max_attn_len, rab, silu_norm, load_balance, "
                                         "strategy)"),
                what)
    rows = [r[0] for r in ranks]
    if sum(rows) != sum(lengths):
        raise ValueError(f"{what}: the ranks' shards hold {rows} tokens, {sum(rows)} in all, but seq_offsets describes {sum(lengths)}")
    if plain:  # SiLU attention (DESIGN.md): keys j <= i (causal), |i - j| <= max_attn_len where given
        window = (max_attn_len, max_attn_len) if max_attn_len > 0 else (-1, -1)
        return context_parallel_attention(
            q, k, v, group=g.pg, score="silu", causal=causal, window=window, scale=alpha,
            silu_norm=float(max_seq_len) if silu_norm is None else silu_norm,
            strategy=PLAIN_AUTO if strategy == "auto" else strategy,
            load_balance=load_balance, cu_seqlens=seq_offsets, max_seqlen=max_seq_len, backend=backend)
    lay = _layout_for(lengths, g, False, load_balance, rows, what)
    d = k.shape[-1]
    kv, row_map = gather_tokens(torch.cat([k, v], -1), g, lay, 0)
    if row_map is not None:
        kv = kv.index_select(0, row_map)
    kv = kv[: sum(lengths)]
    ts = None
    if timestamps is not None:
        ts, ts_map = gather_tokens(timestamps, g, lay, 0, differentiable=False)
        ts = (ts.index_select(0, ts_map) if ts_map is not None else ts)[: sum(lengths)]
    rows_idx = _layout.global_rows(lay, g.rank, q.device)
    q_full = q.new_zeros((sum(lengths),) + tuple(q.shape[1:])).index_copy(0, rows_idx, q)
    # one split, not two slices: its backward writes dK and dV into one gathered-size buffer
    # (two slices' backwards made a zero-padded full-size gradient each, then summed them)
    k_full, v_full = kv.split([d, kv.shape[-1] - d], -1)
    spec, call = _spec.hstu_call(
        q_full, k_full, v_full, seq_offsets, max_seq_len, alpha=alpha, causal=causal,
        num_targets=num_targets, contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, rab=rab,
        timestamps=ts, silu_norm=silu_norm, precision="exact", backend=backend,
    )
    if call.rab is not None and reduce_rab_grads and g.size > 1 and torch.is_grad_enabled():
        pos_w, ts_w = _SumGradsOverGroup.apply(g.pg, call.rab.pos_w, call.rab.ts_w)
        call.rab = dataclasses.replace(call.rab, pos_w=pos_w, ts_w=ts_w)
    # the other ranks' rows are zero queries whose outputs are dropped (zero gradients): the Triton
    # kernels skip their tiles
    call = dataclasses.replace(call, query_windows=_windows(lay, g.rank))
    return backends.run(spec, call, backend)[0].index_select(0, rows_idx)

"""Public context-parallel functions: validate, agree across ranks, lay out, pick a strategy, run."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .. import spec as _spec
from . import blocks, layout as _layout
from .allgather import allgather_attention
from .comm import Group, agree, digest, exchange_metadata, resolve_group
from .ring import RingAttention, RingPlan

STRATEGIES = ("ring", "allgather", "auto")
# GQA/MQA with at least this many query heads per key/value head: the gathered K/V of the whole
# sequence costs at most a quarter of the queries' memory and traffic, and one large kernel call
# per query chunk beats P smaller ones with merges (Llama 3's choice). Refine from measurements.
ALLGATHER_MIN_GROUP = 4

Tensor = torch.Tensor


def choose_strategy(heads_q: int, heads_kv: int) -> str:
    """``strategy="auto"``: "allgather" when Hq >= 4 * Hkv, else "ring" (whose K/V memory per
    rank stays O(N / P) however many key/value heads there are)."""
    return "allgather" if heads_q >= ALLGATHER_MIN_GROUP * heads_kv else "ring"


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


_HOST_LENGTHS: dict = {}


def _global_lengths(cu_seqlens, device) -> tuple[int, ...]:
    """Host lengths of the global packed batch (checks: 1-D int tensor, from 0, non-decreasing).
    A model calls every layer with the same offsets tensor: the host copy is remembered per
    tensor (and its version), so only the first call waits for the GPU."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens: expected a 1-D int32/int64 tensor of global sequence offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor of B+1 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    hit = _HOST_LENGTHS.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    lengths = _spec._host_lengths("cu_seqlens", cu_seqlens, int(cu_seqlens[-1]),
                                  cu_seqlens.device if device is None else device)
    if len(_HOST_LENGTHS) > 64:
        _HOST_LENGTHS.clear()
    _HOST_LENGTHS[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, lengths)
    return lengths


def _dtype_code(dtype) -> int:
    return _spec.FLOAT_DTYPES.index(dtype) if dtype in _spec.FLOAT_DTYPES else -1


def _check_same(rows: list[list[int]], names: tuple[str, ...], what: str) -> None:
    for col, name in enumerate(names):
        values = [row[col] for row in rows]
        if len(set(values)) > 1:
            raise ValueError(
                f"{what}: every rank must pass shards of the same {name}; got {name} = {values} on ranks 0..{len(values) - 1}"
            )


def _layout_for(lengths, g: Group, dense: bool, load_balance, rows_per_rank, what: str) -> _layout.Layout:
    lay = _layout.build(lengths, g.size, dense, load_balance, rows_per_rank)
    if tuple(rows_per_rank) != lay.rows:
        unit = "rows along dim 1" if dense else "tokens"
        raise ValueError(
            f"{what}: load_balance='zigzag' shards hold {lay.rows[0] if lay.rows else 0} {unit} on every rank "
            f"(chunks r and 2P-1-r of every sequence), got {list(rows_per_rank)}; build shards with "
            "omniattn.distributed.shard(x, group, load_balance)"
        )
    return lay


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    score: str = "softmax",
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    scale: Optional[float] = None,
    sigmoid_bias: Optional[float] = None,
    silu_norm: Optional[float] = None,
    softcap: float = 0.0,
    strategy: str = "auto",
    load_balance: Optional[str] = "zigzag",
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Attention over a sequence split across the ranks of ``group`` (context parallelism).

    Every rank passes its shard of the sequence and gets the attention output of its own rows;
    the result equals :func:`omniattn.attention` on the whole sequence (self-attention: queries,
    keys and values are the same tokens), forward and backward.

    Args:
        q: this rank's shard, (B, n, Hq, D); packed with ``cu_seqlens``: (T_local, Hq, D).
        k, v: the shard's keys and values, (B, n, Hkv, D) / (B, n, Hkv, Dv) (GQA/MQA: Hq % Hkv == 0).
        group: ``None`` (the default group), a ProcessGroup or a 1-D DeviceMesh (``mesh["cp"]``).
            A group of one rank gives plain attention on the (whole) sequence it holds.
        score, causal, window, scale, sigmoid_bias, silu_norm, softcap: as :func:`omniattn.attention`,
            over the WHOLE sequence: sigmoid's default bias is -ln(N) of the whole sequence and
            SiLU's default norm is N (packed: ``max_seqlen``), also though every rank holds N / P keys.
        strategy: ``"ring"`` (K/V blocks travel around the ranks, overlapped with compute; memory
            O(N/P)), ``"allgather"`` (gather all K/V, compute local queries; dK/dV reduce-scattered)
            or ``"auto"`` (:func:`choose_strategy`: all-gather for Hq >= 4 Hkv, else ring).
        load_balance: the shard layout. ``"zigzag"``: every sequence is cut into 2P equal chunks
            and rank r holds chunks r and 2P-1-r (in that order), which balances causal work;
            every sequence length must be a multiple of 2P. ``None``: rank r holds the r-th
            contiguous run of tokens; shards of any size, also empty. Use :func:`shard` to cut a
            full tensor.
        cu_seqlens: (B+1,) offsets of the GLOBAL packed batch, the same on every rank, on any
            device (read on the host, once per tensor); q, k, v are then (T_local, H, D). With zigzag, a rank's shard is, sequence after sequence,
            [chunk r, chunk 2P-1-r]: itself a packed batch with offsets ``cu_seqlens // P``.
        max_seqlen: packed batches: the longest sequence (SiLU's default norm); default its length.
        backend: the kernels' backend, as :func:`omniattn.attention`.

    Returns:
        This rank's output rows, (B, n, Hq, Dv) or (T_local, Hq, Dv), in q's dtype.

    Every rank of the group must call with shards of the same batch, heads, head dims and dtype
    and the same other arguments (checked: a mismatch raises ValueError on every rank), and must
    backpropagate through the output if any rank does (the backward communicates).

    Example (2 ranks, torchrun)::

        q_local = omniattn.distributed.shard(q, group, "zigzag")   # (B, N/2, H, D)
        out_local = omniattn.distributed.context_parallel_attention(
            q_local, k_local, v_local, group=group, causal=True)
    """
    q, k, v = _spec.autocast_qkv(q, k, v)  # as omniattn.attention (DESIGN.md)
    prep = _prepare(q, k, v, group, score, causal, window, scale, sigmoid_bias, silu_norm, softcap, strategy,
                    load_balance, cu_seqlens, max_seqlen, backend)
    if prep.strategy == "allgather":
        return allgather_attention(q, k, v, prep.g, prep.layout, prep.scores, prep.window, prep.bias_lengths)
    return _ring(q, k, v, RingPlan(prep.g, prep.layout, prep.scores, prep.window, prep.bias_lengths))


@dataclass(frozen=True)
class Prepared:
    """Everything decided on the host before any tensor work: the group, the layout, the
    strategy and the score settings of the unsplit call."""

    strategy: str
    g: Group
    layout: _layout.Layout
    scores: blocks.Scores
    window: tuple[int, int]
    bias_lengths: Optional[tuple[int, ...]]


_PREPARED: dict = {}


@torch.compiler.disable
def _prepare(q, k, v, group, score, causal, window, scale, sigmoid_bias, silu_norm, softcap, strategy, load_balance,
             cu_seqlens, max_seqlen, backend) -> Prepared:
    """Validate locally, agree with every rank (one small all-gather and a host sync), lay out.
    Host work only: under torch.compile it runs eagerly (a graph break); the result is interned,
    so a compiled caller sees the same object on every call of the same shapes."""
    what = "context_parallel_attention"
    g = resolve_group(group)
    dense = cu_seqlens is None
    error, spec0, lengths = None, None, ()
    try:  # local checks first; their outcome is shared below, so a bad rank never hangs the others
        _check_choice("strategy", strategy, STRATEGIES)
        _check_choice("load_balance", load_balance, _layout.LOAD_BALANCES)
        if dense:
            spec0, _ = _spec.dense_call(q, k, v, score=score, causal=causal, window=window, scale=scale,
                                        sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=softcap,
                                        precision="exact", backend=backend, return_lse=False)
            if k.shape[1] != q.shape[1]:
                raise ValueError(f"k: a shard holds the keys of its own tokens: expected {q.shape[1]} rows (as q), got {k.shape[1]}")
        else:
            for name, t in (("q", q), ("k", k), ("v", v)):
                _spec._require_tensor(name, t, 3, "(total_local, heads, head_dim) with cu_seqlens")
            if k.shape[0] != q.shape[0]:
                raise ValueError(f"k: a shard holds the keys of its own tokens: expected {q.shape[0]} rows (as q), got {k.shape[0]}")
            spec0, _ = _spec.dense_call(q[None], k[None], v[None], score=score, causal=causal, window=window,
                                        scale=scale, sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=softcap,
                                        precision="exact", backend=backend, return_lse=False)
            lengths = _global_lengths(cu_seqlens, None)  # read on the host only: any device
            if max_seqlen is not None:
                _spec._require_int("max_seqlen", max_seqlen, max(lengths, default=0))
    except (ValueError, TypeError) as e:
        error = e
    td = blocks.token_dim(dense)
    heads = (q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]) if error is None else (0, 0, 0, 0)
    window_key = tuple(window) if isinstance(window, (list, tuple)) else window
    args = digest(score, causal, window_key, scale, sigmoid_bias, silu_norm, softcap, strategy, load_balance,
                  max_seqlen, lengths)
    local = [q.shape[0] if dense and error is None else 0, q.shape[td] if error is None else 0, *heads,
             _dtype_code(q.dtype) if error is None else 0, args]
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    ranks = agree(g, device, local, error, what)
    _check_same([r[2:] for r in ranks], ("query heads", "key/value heads", "head dim", "value head dim", "dtype"), what)
    if dense:
        _check_same([r[:1] for r in ranks], ("batch size",), what)
    _check_same([r[-1:] for r in ranks], ("arguments (score, causal, window, scale, bias, norm, softcap, strategy, "
                                          "load_balance, max_seqlen, cu_seqlens)",), what)
    rows = [r[1] for r in ranks]
    if dense:
        lengths = (sum(rows),)
    elif sum(rows) != sum(lengths):
        raise ValueError(f"{what}: the ranks' shards hold {rows} tokens, {sum(rows)} in all, but cu_seqlens describes {sum(lengths)}")
    lay = _layout_for(lengths, g, dense, load_balance, rows, what)
    if strategy == "auto":
        strategy = choose_strategy(q.shape[-2], k.shape[-2])
    norm = None
    if score == "silu":
        norm = spec0.silu_norm if spec0.silu_norm is not None else float(max(max_seqlen or max(lengths, default=0), 1))
    scores = blocks.Scores(score, spec0.scale, spec0.softcap, spec0.sigmoid_bias, norm, backend)
    bias_lengths = lay.lengths if score == "sigmoid" and sigmoid_bias is None else None
    prep = Prepared(strategy, g, lay, scores, spec0.window, bias_lengths)
    if len(_PREPARED) > 256:
        _PREPARED.clear()
    return _PREPARED.setdefault(prep, prep)


@torch.compiler.disable
def _ring(q, k, v, rp: RingPlan) -> Tensor:
    # Point-to-point sends are not traceable: under torch.compile the ring runs eagerly (a graph break).
    return RingAttention.apply(q, k, v, rp)


# ------------------------------------------------------------------------------------------------
# cutting full tensors into shards and back


def _helper_layout(x: Tensor, g: Group, load_balance, cu_seqlens, dim: Optional[int], rows_per_rank=None):
    """The layout of a full tensor ``x`` (``rows_per_rank`` given: ``x`` is a shard, the ranks'
    row counts say how long the whole is) and the token dimension."""
    _check_choice("load_balance", load_balance, _layout.LOAD_BALANCES)
    dense = cu_seqlens is None
    dim = (1 if dense else 0) if dim is None else dim
    if not isinstance(x, Tensor) or x.dim() <= dim:
        raise ValueError(f"x: expected a tensor with a token dimension {dim}, got {getattr(x, 'shape', type(x).__name__)}")
    if dense:
        lengths = (x.shape[dim] if rows_per_rank is None else sum(rows_per_rank),)
    else:
        lengths = _global_lengths(cu_seqlens, None)
    contiguous_rows = rows_per_rank if load_balance is None else None
    return _layout.build(lengths, g.size, dense, load_balance, contiguous_rows), dim


def shard(x: Tensor, group=None, load_balance: Optional[str] = "zigzag", *, cu_seqlens: Optional[Tensor] = None,
          dim: Optional[int] = None) -> Tensor:
    """This rank's shard of a full tensor, as :func:`context_parallel_attention` expects it.

    Dense ``x`` (B, N, ...) is cut along dim 1; a packed ``x`` (T, ...) with ``cu_seqlens`` along
    dim 0 (``dim`` overrides, e.g. 0 for a (N,) tensor of positions). ``load_balance=None`` splits
    evenly (the first N % P ranks get one more row). Returns a new tensor (never a view of ``x``).
    """
    g = resolve_group(group)
    lay, dim = _helper_layout(x, g, load_balance, cu_seqlens, dim)
    return x.index_select(dim, _layout.global_rows(lay, g.rank, x.device))


def shard_positions(seqlen_or_cu_seqlens, group=None, load_balance: Optional[str] = "zigzag",
                    device=None) -> Tensor:
    """(rows,) int64 positions of this rank's rows within their own sequences (e.g. for RoPE),
    for a dense length N or a packed batch's ``cu_seqlens``, with :func:`shard`'s even split."""
    g = resolve_group(group)
    if isinstance(seqlen_or_cu_seqlens, Tensor):
        lengths, dense = _global_lengths(seqlen_or_cu_seqlens, None), False
        device = device or seqlen_or_cu_seqlens.device
    else:
        lengths, dense = (_spec._require_int("seqlen", seqlen_or_cu_seqlens, 0),), True
    _check_choice("load_balance", load_balance, _layout.LOAD_BALANCES)
    return _layout.positions(_layout.build(lengths, g.size, dense, load_balance), g.rank, device)


def unshard(x: Tensor, group=None, load_balance: Optional[str] = "zigzag", *, cu_seqlens: Optional[Tensor] = None,
            dim: Optional[int] = None) -> Tensor:
    """The full tensor from every rank's shard ``x`` (the inverse of :func:`shard`; contiguous
    shards may have any sizes). Every rank gets the whole tensor. Not differentiable: for
    inspection, tests and checkpoints."""
    g = resolve_group(group)
    d = (1 if cu_seqlens is None else 0) if dim is None else dim
    if not isinstance(x, Tensor) or x.dim() <= d:
        raise ValueError(f"x: expected a tensor with a token dimension {d}, got {getattr(x, 'shape', type(x).__name__)}")
    rows = [r[0] for r in exchange_metadata(g, [x.shape[d]], x.device)]
    lay, d = _helper_layout(x, g, load_balance, cu_seqlens, d, rows)
    if tuple(rows) != lay.rows:
        raise ValueError(f"x: the ranks' shards hold {rows} rows along dim {d}, the layout expects {list(lay.rows)}")
    from .allgather import gather_tokens

    with torch.no_grad():
        full, row_map = gather_tokens(x.detach(), g, lay, d, differentiable=False)
        return full.index_select(d, row_map) if row_map is not None else full.narrow(d, 0, sum(rows)).clone()

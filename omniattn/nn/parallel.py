"""Tensor-parallel attention with FastAttention's tiling-AllReduce (Lin et al. 2024, section 3.3).

The heads are split over a tensor-parallel (TP) group, Megatron style: the fused Q/K/V projection
is column-parallel (each rank computes its heads from the replicated input) and the output
projection is row-parallel (each rank multiplies its heads' slice; an all-reduce sums the
partial outputs). Plainly that all-reduce waits for the whole attention and projection, and the
GPUs idle while it runs. Tiling-AllReduce cuts the query rows into tiles along the sequence::

    for tile i:  attention(queries of tile i, the keys they see) -> out-projection -> all-reduce (async)
                 ^ the all-reduce of tile i runs while tile i+1 computes

so only the last tile's all-reduce is exposed. Each tile is the same maths as the rows of the
plain layer (the keys are cut so the kernel's bottom-right alignment is exact), so the result
equals the plain layer's. Backward: the row-parallel all-reduce is an identity; the input
gradient of the column-parallel projection is all-reduced asynchronously while the weight
gradient is computed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import spec as _spec
from ..api import attention
from ..distributed.comm import resolve_group
from ..distributed.layout import Segment
from ..distributed.plan import pair_piece


# Under autocast the projections run in the autocast dtype while the weights (and the layer's
# input) may be float32: the backward products are taken in dy's dtype, as autocast took the
# forward's, and each gradient is returned in its input's dtype.


class _ColumnParallelLinear(torch.autograd.Function):
    """y = x W^T + b on this rank's output columns; backward all-reduces dx over the group while
    it computes dW (Megatron's asynchronous tensor-parallel all-reduce)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pg, size: int):
        ctx.save_for_backward(x, weight)
        ctx.pg, ctx.size, ctx.bias_dtype = pg, size, None if bias is None else bias.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy.matmul(weight.to(dy.dtype))
        work = dist.all_reduce(dx, group=ctx.pg, async_op=True) if ctx.size > 1 else None
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = dy2.t().matmul(x.reshape(-1, x.shape[-1]).to(dy.dtype))
        db = dy2.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        if work is not None:
            work.wait()
        return dx.to(x.dtype), dw.to(weight.dtype), db, None, None


def _projection_grads(dy_rows, a, weight):
    """Gradients of a partial output projection y = a W^T (its all-reduce's gradient is the
    identity: every rank holds the whole dy)."""
    da = dy_rows.matmul(weight.to(dy_rows.dtype))
    dw = dy_rows.reshape(-1, dy_rows.shape[-1]).t().matmul(a.reshape(-1, a.shape[-1]).to(dy_rows.dtype))
    return da.to(a.dtype), dw.to(weight.dtype)


class _RowParallelTile(torch.autograd.Function):
    """The partial output projection of one tile, y = a W^T, whose all-reduce over the group is
    started here and waited for by the caller (``works``)."""

    @staticmethod
    def forward(ctx, a, weight, pg, size: int, works: list):
        ctx.save_for_backward(a, weight)
        y = F.linear(a, weight)
        if size > 1:
            works.append(dist.all_reduce(y, group=pg, async_op=True))
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_projection_grads(dy, *ctx.saved_tensors), None, None, None)


class _RowParallelRowsInto(torch.autograd.Function):
    """One sequence (batch 1): the tile's partial projection written straight into its rows
    [r0, r1) of the layer's output ``y`` (returned, marked dirty), whose all-reduce is started
    there: no torch.cat of the tiles afterwards, a copy of the whole output (0.19 ms of an 11 ms
    layer at 1 x 32K on an H100, a fifth of the all-reduce the tiles hide). Rows of several
    sequences are not contiguous, which NCCL needs: per-sequence all-reduces measured slower than
    the copy (4 x 8K), so batches keep _RowParallelTile. Backward: each call reads its own rows
    of dy and passes dy on to the calls that wrote the other rows."""

    @staticmethod
    def forward(ctx, y, a, weight, r0: int, pg, size: int, works: list):
        ctx.save_for_backward(a, weight)
        ctx.r0 = r0
        rows = y[0, r0 : r0 + a.shape[1]]
        torch.mm(a[0].to(y.dtype), weight.t().to(y.dtype), out=rows)  # (autocast has no out= variants)
        if size > 1:
            works.append(dist.all_reduce(rows, group=pg, async_op=True))
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, weight = ctx.saved_tensors
        da, dw = _projection_grads(dy[:, ctx.r0 : ctx.r0 + a.shape[1]], a, weight)
        return dy, da, dw, None, None, None, None


TILE_ALIGN = 128  # tile boundaries on the kernels' query-block grid: no tile starts or ends mid-block


def tile_rows(n: int, tiles: int) -> tuple[int, ...]:
    """Rows per query tile: even shares, boundaries on multiples of TILE_ALIGN where n allows.
    (A last tile of half the rows, so that less of the one all-reduce nothing overlaps is left
    exposed, measured worse: the uneven tiles cost more than the exposure saved, NOTES.md.)"""
    align = TILE_ALIGN if n >= TILE_ALIGN * tiles else 1
    cuts = [round(n * t / tiles / align) * align for t in range(1, tiles)] + [n]
    return tuple(b - a for a, b in zip([0] + cuts[:-1], cuts))


LAST_TILE_MIN_PIECE = 512  # rows: a smaller projection piece's all-reduce is all latency


def last_tile_pieces(rows: int) -> tuple[int, ...]:
    """The last tile's projection in halving pieces (8192 rows: 4096, 2048, 1024, 1024): each
    piece's all-reduce overlaps the next pieces' projection, so only the smallest is exposed."""
    pieces = []
    while rows >= 4 * LAST_TILE_MIN_PIECE:
        align = TILE_ALIGN if rows >= 4 * TILE_ALIGN else 1
        half = rows // 2 // align * align
        pieces.append(half)
        rows -= half
    return tuple(pieces) + (rows,)


class ParallelAttention(nn.Module):
    """Multi-head attention with its heads split over a tensor-parallel group.

    Args:
        dim: model width; input and output (B, N, dim), replicated on every rank of the group.
        num_heads: query heads in all; each rank computes num_heads / TP of them.
        num_kv_heads: key/value heads in all (GQA/MQA), default num_heads; must be a multiple of TP.
        group: ``None`` (the default group), a ProcessGroup or a 1-D DeviceMesh (``mesh["tp"]``).
        head_dim: default dim // num_heads.
        score, causal, window, scale, sigmoid_bias, silu_norm, softcap: as :func:`omniattn.attention`
            on the whole sequence (sigmoid's default bias -ln(N), SiLU's default norm N).
        bias: biases on the projections (the output bias is added once, after the all-reduce).
        tiles: query tiles of tiling-AllReduce (FastAttention section 3.3), on the kernels' block grid (tile_rows).
        overlap: True: the tiles' all-reduces overlap the next tiles' attention and projection;
            False: the plain layer (one attention call, one projection, one all-reduce). Equal results.
            Measured on H100s (README): with the persistent Hopper forward, which holds every SM
            until it ends, an NCCL all-reduce runs mostly in the tiles' tails, and each extra tile
            costs a tail of its own: 2 tiles hide the most at TP=2 (a fraction of the all-reduce);
            at TP=4 the overlap loses time (each rank's attention is short, each tile's
            all-reduce latency-bound): pass ``overlap=False`` there.
        backend: the kernels' backend.

    Weights are this rank's shards: ``qkv_weight`` ((Hq/TP + 2 Hkv/TP) * head_dim, dim), rows
    [q heads, k heads, v heads] of this rank; ``out_weight`` (dim, Hq/TP * head_dim). Use
    :meth:`load_dense_weights` to cut them from an unsplit layer's weights.

    Example (torchrun, 2 GPUs)::

        layer = ParallelAttention(4096, 32, 8, causal=True, tiles=2).cuda()
        y = layer(x)            # x: (B, N, 4096) on every rank
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *, group=None,
                 head_dim: Optional[int] = None, score: str = "softmax", causal: bool = True,
                 window: tuple[int, int] = (-1, -1), scale: Optional[float] = None,
                 sigmoid_bias: Optional[float] = None, silu_norm: Optional[float] = None, softcap: float = 0.0,
                 bias: bool = False, tiles: int = 2, overlap: bool = True, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        g = resolve_group(group)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("tiles", tiles)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: {num_kv_heads} must divide num_heads ({num_heads})")
        if num_kv_heads % g.size:
            raise ValueError(
                f"num_kv_heads: {num_kv_heads} key/value heads cannot be split over a tensor-parallel group of {g.size} "
                "ranks; use a group whose size divides num_kv_heads"
            )
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap: expected a bool, got {type(overlap).__name__}")
        head_dim = head_dim or dim // num_heads
        # the attention's scalars, checked once here as omniattn.attention checks them (no data: meta tensors)
        meta_q = torch.empty(1, 1, num_heads, max(head_dim, 1), device="meta")
        meta_kv = torch.empty(1, 1, num_kv_heads, max(head_dim, 1), device="meta")
        _spec.dense_call(meta_q, meta_kv, meta_kv, score=score, causal=causal, window=window, scale=scale,
                         sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=softcap, precision="exact",
                         backend=backend, return_lse=False)
        self.pg, self.tp_rank, self.tp_size = g.pg, g.rank, g.size
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = head_dim
        if self.head_dim < 1:
            raise ValueError(f"head_dim: expected an int >= 1, got {self.head_dim}")
        self.local_heads, self.local_kv_heads = num_heads // g.size, num_kv_heads // g.size
        self.attn_kwargs = dict(score=score, causal=causal, window=window, scale=scale, sigmoid_bias=sigmoid_bias,
                                silu_norm=silu_norm, softcap=softcap, backend=backend)
        self.tiles, self.overlap = tiles, overlap
        self._sync_tiles = False  # benchmark only: tiles without overlap, to time the overlap alone
        factory = dict(device=device, dtype=dtype)
        rows = (self.local_heads + 2 * self.local_kv_heads) * self.head_dim
        self.qkv_weight = nn.Parameter(torch.empty(rows, dim, **factory))
        self.qkv_bias = nn.Parameter(torch.empty(rows, **factory)) if bias else None
        self.out_weight = nn.Parameter(torch.empty(dim, self.local_heads * self.head_dim, **factory))
        self.out_bias = nn.Parameter(torch.empty(dim, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation with the fan-in of the unsplit layer
        bound_in = 1 / math.sqrt(self.dim)
        bound_out = 1 / math.sqrt(self.num_heads * self.head_dim)
        nn.init.uniform_(self.qkv_weight, -bound_in, bound_in)
        nn.init.uniform_(self.out_weight, -bound_out, bound_out)
        if self.qkv_bias is not None:
            nn.init.uniform_(self.qkv_bias, -bound_in, bound_in)
            nn.init.uniform_(self.out_bias, -bound_out, bound_out)

    @torch.no_grad()
    def load_dense_weights(self, q_weight, k_weight, v_weight, out_weight, q_bias=None, k_bias=None, v_bias=None,
                           out_bias=None) -> "ParallelAttention":
        """Copy this rank's shards from an unsplit layer's weights: q_weight (Hq*hd, dim),
        k_weight/v_weight (Hkv*hd, dim), out_weight (dim, Hq*hd), optional biases."""
        hd, r = self.head_dim, self.tp_rank
        qs = slice(r * self.local_heads * hd, (r + 1) * self.local_heads * hd)
        ks = slice(r * self.local_kv_heads * hd, (r + 1) * self.local_kv_heads * hd)
        self.qkv_weight.copy_(torch.cat([q_weight[qs], k_weight[ks], v_weight[ks]], 0))
        self.out_weight.copy_(out_weight[:, qs])
        if self.qkv_bias is not None:
            self.qkv_bias.copy_(torch.cat([q_bias[qs], k_bias[ks], v_bias[ks]], 0))
            self.out_bias.copy_(out_bias)
        return self

    def _tile_bounds(self, n: int) -> list[tuple[int, int]]:
        if not (self.overlap or self._sync_tiles) or self.tiles == 1:
            return [(0, n)]
        bounds, start = [], 0
        for size in tile_rows(n, self.tiles):
            if size:
                bounds.append((start, start + size))
                start += size
        return bounds

    def _attend(self, q, k, v, t0: int, t1: int) -> torch.Tensor:
        """Attention of query rows [t0, t1) on the keys they see, (B, t1 - t0, H_local, hd)."""
        n = k.shape[1]
        kw = dict(self.attn_kwargs)
        causal = kw.pop("causal")
        window = (kw.pop("window")[0], 0) if causal else kw.pop("window")
        piece = pair_piece(Segment(0, t0, t1, t0), Segment(0, 0, n, 0), tuple(window))
        if piece is None:
            return q.new_zeros(q.shape[0], t1 - t0, q.shape[2], v.shape[-1])
        # the defaults that depend on the key count are those of the whole sequence
        if kw["score"] == "sigmoid" and kw["sigmoid_bias"] is None:
            kw["sigmoid_bias"] = -math.log(max(n, 1))
        if kw["score"] == "silu" and kw["silu_norm"] is None:
            kw["silu_norm"] = float(max(n, 1))
        rows = slice(piece.q0, piece.q1)
        out = attention(q[:, rows], k[:, piece.k0 : piece.k1], v[:, piece.k0 : piece.k1], window=piece.window, **kw)
        if (piece.q0, piece.q1) != (t0, t1):  # rows that see no key
            full = q.new_zeros(q.shape[0], t1 - t0, q.shape[2], v.shape[-1])
            out = torch.cat([full[:, : piece.q0 - t0], out, full[:, piece.q1 - t0 :]], 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), the same on every rank of the group -> (B, N, dim), the same on every rank."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (batch, seqlen, {self.dim}), got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        hd, hq, hkv = self.head_dim, self.local_heads, self.local_kv_heads
        qkv = _ColumnParallelLinear.apply(x, self.qkv_weight, self.qkv_bias, self.pg, self.tp_size)
        q, k, v = qkv.split([hq * hd, hkv * hd, hkv * hd], -1)
        q, k, v = q.view(b, n, hq, hd), k.view(b, n, hkv, hd), v.view(b, n, hkv, hd)
        works: list = []
        y = qkv.new_empty(1, n, self.dim) if b == 1 else None  # batch 1: tiles write into y, else concatenated
        parts = []
        bounds = self._tile_bounds(n)
        for i, (t0, t1) in enumerate(bounds):
            a = self._attend(q, k, v, t0, t1).reshape(b, t1 - t0, hq * hd)
            # the last tile's all-reduce has no attention after it to hide under: its projection
            # goes in shrinking pieces, each piece's all-reduce under the next piece's projection
            pieces = last_tile_pieces(t1 - t0) if len(bounds) > 1 and i == len(bounds) - 1 else (t1 - t0,)
            r0 = 0
            for rows in pieces:
                if y is not None:
                    y = _RowParallelRowsInto.apply(y, a[:, r0 : r0 + rows], self.out_weight, t0 + r0, self.pg,
                                                   self.tp_size, works)
                else:
                    parts.append(_RowParallelTile.apply(a[:, r0 : r0 + rows], self.out_weight, self.pg,
                                                        self.tp_size, works))
                r0 += rows
            if not self.overlap:  # plain layer, or tiles timed without overlap
                while works:
                    works.pop().wait()
        for w in works:
            w.wait()
        if y is None:
            y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return y + self.out_bias.to(y.dtype) if self.out_bias is not None else y

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, tp={self.tp_size}, "
                f"tiles={self.tiles}, overlap={self.overlap}")

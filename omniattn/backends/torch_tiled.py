"""Tiled attention in plain PyTorch: O(N) memory in forward and backward, any device.

This is FlashAttention-2's algorithm written with tensor ops: a block of query rows walks the key
chunks it may see (:mod:`omniattn.tiling` decides which, and which need a mask), keeping an online
softmax (running max and sum) or, for sigmoid and SiLU, a plain running sum. The backward pass
recomputes each tile's scores from Q and K instead of storing them. Nothing of size
(queries x keys) is ever allocated: the largest temporaries are (heads, block_q, block_k) tiles.

- Threads (CPU): query blocks are independent, so they are the parallel work; they go to worker
  threads that run every op on one intra-op thread (:mod:`.torch_threads` says why: no OpenMP
  barrier per op, so a busy machine slows this path by its share of the cores, not 10-25x).
- Explicit masks (``Call.attn_mask``, dense calls): each tile reads its slice of the mask (a view
  of the caller's tensor, never expanded or copied); dropout (``Spec.dropout_p``): each tile
  regenerates its keep mask from the counter-based hash of :func:`omniattn.reference.dropout_keep`.
- Non-finite inputs (DESIGN.md): the computation runs on inputs whose NaN/Inf are replaced by 0,
  so a disallowed pair (another sequence of a packed block, a masked pair of a tile) never
  multiplies a non-finite value; then NaN is written exactly where the reference's rule says
  (see ``reference._NonFinite``), tile by tile from per-token flags. Finite inputs pay one sum
  per tensor for the check.

It is the backend for CPUs, older GPUs and other accelerators, and the CPU implementation CI runs.
Arithmetic is float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..hstu.relative_bias import bucketize
from ..spec import Call, Spec
from ..tiling import QueryBlock, chunk_mask, key_chunks, query_blocks, token_meta, window_tile_mask
from . import torch_threads

# Tiles of BLOCK_Q query rows (times the G query heads of a KV head, times the KV heads computed
# together) by up to 2048 keys, about TILE_ELEMS floats (8 MiB). Measured on a 2-core Xeon
# (N=1024, H=8, D=64, sigmoid forward on one core): 8-head tiles 22 ms, 1-head tiles 27 ms.
# Smaller tiles run each op faster from cache, but every op also costs Python dispatch and, with
# two worker threads, a turn at the GIL; big tiles make each of the ~5 ops per tile large.
BLOCK_Q = 256
TILE_ELEMS = 1 << 21
MIN_BLOCK_K = 64
_empty = torch.empty  # allocation of outputs every row of which the kernel writes


def _block_k(rows: int) -> int:
    """Key chunk length for tiles of ``rows`` (query rows x query heads) rows."""
    bk = MIN_BLOCK_K
    while bk < 2048 and rows * bk * 2 <= TILE_ELEMS:
        bk *= 2
    return bk


class _Scratch:
    """One thread's tile buffers, reused from tile to tile: a fresh tile-sized tensor per op costs
    more than the op (the allocator returns big blocks to the OS, and their pages fault in again)."""

    def __init__(self):
        self.flat: dict = {}

    def get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.flat.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            buf = self.flat[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


def _nan(t: torch.Tensor) -> torch.Tensor:
    return torch.full((), math.nan, dtype=t.dtype, device=t.device)


def _all_finite(*tensors: Optional[torch.Tensor]) -> bool:
    """One reduction per tensor: a NaN or Inf anywhere makes the sum non-finite. (A sum that
    overflows says "non-finite" too; the exact path it then takes is only slower.)"""
    total = None
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        s = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        total = s if total is None else total + s
    return total is None or bool(torch.isfinite(total))


def _zero_nonfinite(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


@dataclass
class _Plan:
    """Everything derived from (spec, call) once per call and reused by the backward pass."""

    spec: Spec
    call: Call
    cdtype: torch.dtype
    blocks: list
    chunks: list
    order: list  # block indices, most work first (the threads take them in this order)
    work: list  # pairs each block visits
    heads_per_tile: int  # KV heads computed together
    meta: object
    row_bias: Optional[torch.Tensor]  # sigmoid bias per query row
    row_slope: Optional[torch.Tensor]  # (Tq, Hq) ALiBi slopes per query row
    t_next: Optional[torch.Tensor]  # rab: timestamp of the next token, per query row
    silu_scale: float
    mask4: Optional[torch.Tensor] = None  # attn_mask as a 4-D view (B|1, Hq|1, Nq|1, Nk|1)
    mask_has_bad: bool = False  # a float mask holding NaN or +inf (non-finite inputs)
    # quantized emulation (omniattn.quant.emulate): P of each tile as the FP8 product sees it, applied
    # where the kernel converts P (softmax P relative to the running max; SiLU's P before its 1/n)
    p_round: Optional[object] = None

    @classmethod
    def build(cls, spec: Spec, call: Call, key_tiles: Optional[int] = None) -> "_Plan":
        """``key_tiles``: visit keys in chunks on the grid of that many keys from each sequence's
        start, the Triton kernel's key tiles (the quantized emulation needs the kernel's running
        maxima); by default chunks follow the mask (FULL/PARTIAL) and TILE_ELEMS."""
        if call.attn_mask is not None and not call.dense:
            raise ValueError("attn_mask: only dense (batch, seqlen, heads, dim) calls take an explicit mask; "
                             "for packed sequences express the mask through cu_seqlens, causal and window")
        cdtype = torch.float64 if call.q.dtype == torch.float64 else torch.float32
        meta = token_meta(spec, call)
        blocks = query_blocks(call, BLOCK_Q)
        g = call.heads_q // call.k.shape[-2]
        rows = g * min(BLOCK_Q, max(call.max_q, 1))
        bk = _block_k(rows) if key_tiles is None else key_tiles
        chunks = [list(key_chunks(spec, call, blk, bk, aligned=key_tiles is not None)) for blk in blocks]
        work = [(blk.q1 - blk.q0) * sum(c[1] - c[0] for c in ch) for blk, ch in zip(blocks, chunks)]
        order = sorted(range(len(blocks)), key=lambda i: -work[i])
        # KV heads per forward tile: as many as fit TILE_ELEMS (all of them for short sequences)
        heads_per_tile = max(1, min(call.k.shape[-2], TILE_ELEMS // (rows * min(bk, max(call.max_k, 1)))))
        dev = call.q.device
        row_bias = None
        if spec.score == "sigmoid":
            if spec.sigmoid_bias is not None:
                per_seq = torch.full((call.batch,), spec.sigmoid_bias, dtype=cdtype, device=dev)
            else:  # -ln(Nk) of each sequence (0 for empty ones, whose rows see nothing anyway)
                per_seq = -torch.tensor(call.lens_k, dtype=cdtype, device=dev).clamp(min=1).log()
            row_bias = per_seq[meta.q_seq]
        row_slope = call.alibi.to(cdtype)[meta.q_seq] if call.alibi is not None else None
        t_next = None
        if call.rab is not None:
            ts = call.rab.timestamps
            last = torch.zeros(ts.shape[0], dtype=torch.bool, device=dev)
            ends = call.offsets()[0][1:].long() - 1
            last[ends[ends >= 0]] = True
            t_next = torch.where(last, ts, torch.roll(ts, -1))
        norm = spec.silu_norm if spec.silu_norm is not None else float(max(call.max_k, 1))
        mask4, mask_has_bad = None, False
        if call.attn_mask is not None:
            mask4 = call.attn_mask
            while mask4.dim() < 4:
                mask4 = mask4.unsqueeze(0)
            mask_has_bad = not reference._float_mask_is_finite(mask4)
        return cls(spec, call, cdtype, blocks, chunks, order, work, heads_per_tile, meta, row_bias, row_slope, t_next,
                   1.0 / norm, mask4, mask_has_bad)


# ------------------------------------------------------------------------------ tile layout


@dataclass(frozen=True)
class _Heads:
    """The key/value heads [h0, h1) of hkv that one piece of work computes (g query heads each)."""

    h0: int
    h1: int
    hkv: int
    g: int

    @property
    def n(self) -> int:
        return self.h1 - self.h0

    @property
    def q(self) -> slice:
        """The query heads of these kv heads."""
        return slice(self.h0 * self.g, self.h1 * self.g)


def _head_ranges(hkv: int, g: int, parts: int) -> list:
    parts = max(1, min(parts, hkv))
    cuts = [hkv * i // parts for i in range(parts + 1)]
    return [_Heads(a, b, hkv, g) for a, b in zip(cuts[:-1], cuts[1:])]


def _q_tile(x: torch.Tensor, blk: QueryBlock, hd: _Heads) -> torch.Tensor:
    """Rows [q0, q1) of a (T, Hq, D) tensor, heads hd, as (nh, G * m, D): the G query heads sharing
    a KV head stacked along the rows, so each tile is one batched matmul per KV head (GQA without
    copies of K)."""
    t = x[blk.q0 : blk.q1]
    m, _, d = t.shape
    return t.reshape(m, hd.hkv, hd.g, d)[:, hd.h0 : hd.h1].permute(1, 2, 0, 3).reshape(hd.n, hd.g * m, d)


def _q_untile(t: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of _q_tile: (nh, G * m, D) -> (m, nh * G, D)."""
    nh, gm, d = t.shape
    return t.view(nh, gm // m, m, d).permute(2, 0, 1, 3).reshape(m, gm // m * nh, d)


def _rows_to_tile(x: torch.Tensor, blk: QueryBlock, hd: _Heads) -> torch.Tensor:
    """A per-(row, head) quantity (Tq, Hq) -> (nh, G * m, 1) in tile order."""
    return _q_tile(x.unsqueeze(-1), blk, hd)


@dataclass
class _Tile:
    """What a tile's scores need besides Q.K: which pairs are allowed, as a bool broadcastable to
    (nh, G, m, b - a) for the key columns [a, b) of the chunk that may hold disallowed pairs
    (None: all pairs allowed), the float mask added to the scores, and (non-finite mode) the
    pairs whose mask entry is NaN or +inf."""

    c0: int
    c1: int
    allowed: Optional[torch.Tensor]
    a: int = 0
    b: int = 0
    bias: Optional[torch.Tensor] = None
    bad: Optional[torch.Tensor] = None

    def fill(self, x: torch.Tensor, value: float, inplace: bool) -> torch.Tensor:
        """x (nh, G, m, n) with the disallowed pairs set to value (only columns [a, b) are read)."""
        if self.allowed is None:
            return x
        if inplace:
            x[..., self.a : self.b].masked_fill_(~self.allowed, value)
            return x
        return x.masked_fill(~self.full(x.shape), value)

    def full(self, shape, device=None) -> torch.Tensor:
        """The allowed pairs of the whole chunk, expanded to ``shape`` (nh, G, m, n)."""
        if self.allowed is None:
            return torch.ones((), dtype=torch.bool, device=device).expand(shape)
        if (self.a, self.b) == (0, shape[-1]):
            return self.allowed.expand(shape)
        out = torch.ones(shape, dtype=torch.bool, device=self.allowed.device)
        out[..., self.a : self.b] = self.allowed
        return out


def _mask_tile(p: _Plan, blk: QueryBlock, c0: int, c1: int) -> torch.Tensor:
    """The attention mask's entries for this tile, (Hm, m|1, n|1), Hm in {1, Hq}: a view of the
    caller's mask for one-sequence blocks, a gather of (m, n) entries for packed ones."""
    m4 = p.mask4
    if blk.single:
        b = blk.b0 if m4.shape[0] > 1 else 0
        j0 = c0 - blk.k0
        rows = slice(blk.r0, blk.r0 + blk.q1 - blk.q0) if m4.shape[2] > 1 else slice(None)
        cols = slice(j0, j0 + c1 - c0) if m4.shape[3] > 1 else slice(None)
        return m4[b, :, rows, cols]
    meta = p.meta
    seq = meta.q_seq[blk.q0 : blk.q1] if m4.shape[0] > 1 else torch.zeros_like(meta.q_seq[blk.q0 : blk.q1])
    rows = meta.q_raw_pos[blk.q0 : blk.q1] if m4.shape[2] > 1 else torch.zeros_like(seq)
    cols = meta.k_pos[c0:c1] if m4.shape[3] > 1 else torch.zeros_like(meta.k_pos[c0:c1])
    # pairs of different sequences read some entry of the query's sequence: they are disallowed anyway
    return m4[seq.view(-1, 1), :, rows.view(-1, 1), cols.view(1, -1)].permute(2, 0, 1)


def _tile(p: _Plan, blk: QueryBlock, chunk: tuple, hd: _Heads) -> _Tile:
    c0, c1, p0, p1 = chunk
    if p.mask4 is not None and p1 > p0:  # the explicit mask covers the whole chunk: so does its structure
        p0, p1 = c0, c1
    allowed = None
    if p1 > p0:
        if blk.single and p.spec.hstu is None:  # a causal/window tile: one of a few cached masks
            b = blk.b0
            offset = (p0 - blk.k0) - (blk.r0 + p.call.lens_k[b] - p.call.lens_q[b])
            allowed = window_tile_mask(*p.spec.window, blk.q1 - blk.q0, p1 - p0, offset, p.call.q.device)
        else:
            allowed = chunk_mask(p.spec, p.meta, blk.q0, blk.q1, p0, p1, blk.single)
    if p.mask4 is None:
        return _Tile(c0, c1, allowed, p0 - c0, p1 - c0)
    mt = _mask_tile(p, blk, c0, c1)
    if mt.shape[0] > 1:  # per head: (nh, G, m|1, n|1)
        mt = mt.view(hd.hkv, hd.g, *mt.shape[1:])[hd.h0 : hd.h1]
    else:
        mt = mt.unsqueeze(0)
    if mt.dtype == torch.bool:
        return _Tile(c0, c1, mt if allowed is None else allowed & mt, 0, c1 - c0)
    ok = mt != -math.inf  # a -inf entry is a disallowed pair
    bias, bad = mt.to(p.cdtype), None
    if p.mask_has_bad:
        bad = bias.isnan() | (bias == math.inf)
        bias = bias.masked_fill(bad, 0.0)
    return _Tile(c0, c1, ok if allowed is None else allowed & ok, 0, c1 - c0, bias, bad)


def _scores(p: _Plan, qt, kt, blk: QueryBlock, tile: _Tile, hd: _Heads, pos_w, ts_w, out=None, tanh_out=None):
    """Scores of one tile as (nh, G, m, n), and with softcap tanh(s/c) (its gradient needs it).

    ``qt`` is (nh, G*m, D) already scaled, ``kt`` (nh, D, n); ``out``/``tanh_out``: buffers to
    write into (None: allocate; the autograd-recorded backward needs fresh tensors)."""
    spec, meta = p.spec, p.meta
    m, n = blk.q1 - blk.q0, tile.c1 - tile.c0
    s = torch.bmm(qt, kt, out=out)
    tanh = None
    if spec.softcap > 0:
        tanh = torch.div(s, spec.softcap, out=tanh_out).tanh_()
        s = torch.mul(tanh, spec.softcap, out=out)
    s = s.view(hd.n, hd.g, m, n)
    if p.row_slope is not None:
        dist = (meta.q_pos[blk.q0 : blk.q1].view(-1, 1) - meta.k_pos[tile.c0 : tile.c1].view(1, -1)).abs().to(p.cdtype)
        slope = p.row_slope[blk.q0 : blk.q1, hd.q].t().reshape(hd.n, hd.g, m, 1)
        s = s.sub_(slope * dist)
    if pos_w is not None:
        bias = _rab_tile(p, blk, tile.c0, tile.c1, pos_w, ts_w)[0]  # (Hr, m, n), Hr in {1, Hq}
        s = s.add_(bias.view(1, 1, m, n) if bias.shape[0] == 1 else bias[hd.q].view(hd.n, hd.g, m, n))
    if tile.bias is not None:
        s = s.add_(tile.bias)
    return s, tanh


def _rab_tile(p: _Plan, blk: QueryBlock, c0: int, c1: int, pos_w, ts_w):
    """(Hr, m, n) bias of one tile, with the position and bucket indices it gathered."""
    rel, bucket = _rab_indices(p, blk, c0, c1)
    return pos_w.to(p.cdtype)[:, rel] + ts_w.to(p.cdtype)[:, bucket], rel, bucket


def _rab_indices(p: _Plan, blk: QueryBlock, c0: int, c1: int):
    """(m, n) indices into the position and time-bucket weights of one tile."""
    r = p.call.rab
    pos = p.meta.rab_pos  # HSTU is self-attention: queries and keys are the same tokens
    rel = (r.max_seq_len - 1) + pos[c0:c1].view(1, -1) - pos[blk.q0 : blk.q1].view(-1, 1)
    dt = p.t_next[blk.q0 : blk.q1].view(-1, 1) - r.timestamps[c0:c1].view(1, -1)
    return rel, bucketize(dt, r.num_buckets, r.bucketization)


def _dropout_rows(p: _Plan, blk: QueryBlock, hd: _Heads) -> Optional[torch.Tensor]:
    """(nh, G, m, 1) per-row part of the dropout hash of a block (None without dropout)."""
    if p.spec.dropout_p <= 0:
        return None
    hq = p.call.heads_q
    b = p.meta.q_seq[blk.q0 : blk.q1].view(1, 1, -1, 1)
    i = p.meta.q_raw_pos[blk.q0 : blk.q1].view(1, 1, -1, 1)
    h = torch.arange(hd.q.start, hd.q.stop, device=b.device).view(hd.n, hd.g, 1, 1)
    return reference.dropout_row_hash(p.call.dropout_seed, b, h, i, hq)


def _dropped(p: _Plan, rows: torch.Tensor, tile: _Tile) -> torch.Tensor:
    """(nh, G, m, n) bool: the pairs of this tile that dropout removes."""
    j = p.meta.k_pos[tile.c0 : tile.c1].view(1, 1, 1, -1)
    return ~reference.dropout_keep_from_rows(rows, j, p.spec.dropout_p)


# exp of inputs below about -88 (where it underflows) or of -inf takes a slow path in PyTorch's
# vectorised CPU exp, 15-60x slower than other inputs; masked tiles and packed blocks are full of
# -inf. Inputs are floored first (exp(-87) = 1.6e-38, below any rounding of a sum of terms <= 1);
# disallowed pairs are then set to exact zeros by their mask.
_EXP_FLOOR = -87.0


def _exp_(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(min=_EXP_FLOOR).exp_()


def _activate(p: _Plan, s: torch.Tensor) -> torch.Tensor:
    """Pointwise score function of a (nh, G, m, n) tile in place, without SiLU's 1/n (applied to
    the block's sum) and with sigmoid's bias already in the scores."""
    return s.sigmoid_() if p.spec.score == "sigmoid" else F.silu(s, inplace=True)


def _activate_with_grad(p: _Plan, s: torch.Tensor, dp: torch.Tensor, scr: Optional[_Scratch]):
    """(P, dS) of a pointwise tile: P = f(s) (without SiLU's 1/n, folded into dO) and
    dS = dP * f'(s), each one fused op; in place in the buffers when ``scr`` is given."""
    if p.spec.score == "sigmoid":
        pt = s.sigmoid_() if scr is not None else s.sigmoid()
        return pt, torch.ops.aten.sigmoid_backward(dp, pt) if scr is None else \
            torch.ops.aten.sigmoid_backward.grad_input(dp, pt, grad_input=dp)
    if scr is None:  # recorded by autograd: silu_backward has no derivative, so spelled out
        sig = torch.sigmoid(s)
        act = s * sig
        return act, dp * (sig + act * (1 - sig))  # silu'(s) = sig + s sig (1 - sig)
    pt = torch.ops.aten.silu.out(s, out=scr.get("p", s.shape, s))
    return pt, torch.ops.aten.silu_backward.grad_input(dp, s, grad_input=dp)


# ------------------------------------------------------------------------------ forward


def _forward(p: _Plan, q, k, v, pos_w, ts_w, out_dtype: Optional[torch.dtype] = None):
    """Packed output (Tq, Hq, Dv) in ``out_dtype`` (default q's dtype) and lse (Hq, Tq) (empty for
    sigmoid/SiLU). q, k, v in the compute dtype."""
    spec, cd = p.spec, p.cdtype
    tq, hq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    softmax = spec.score == "softmax"
    out = _empty(tq, hq, dv, dtype=out_dtype or p.call.q.dtype, device=q.device)
    lse = _empty(hq, tq, dtype=cd, device=q.device) if softmax else q.new_empty(0, dtype=cd)
    # views: a transposing copy of K costs more than the matmuls gain from contiguous panels
    kt_all = k.permute(1, 2, 0)  # (Hkv, D, Tk)
    vt_all = v.transpose(0, 1)  # (Hkv, Tk, Dv)
    # SiLU's 1/n and dropout's 1/(1-p) scale every term of a row alike: applied once to its sum
    post = (p.silu_scale if spec.score == "silu" else 1.0) / (1.0 - spec.dropout_p)
    heads = _head_ranges(hkv, hq // hkv, -(-hkv // p.heads_per_tile))
    row_bias = p.row_bias.view(-1, 1).expand(-1, hq) if p.row_bias is not None else None

    def block(scr: _Scratch, task):
        bi, hd = task
        blk, chunks = p.blocks[bi], p.chunks[bi]
        m = blk.q1 - blk.q0
        qt = _q_tile(q, blk, hd) * spec.scale  # (nh, G*m, D); never in place: it may be a view of q
        gm = qt.shape[1]
        acc = torch.zeros(hd.n, gm, dv, dtype=cd, device=q.device)
        rows = _dropout_rows(p, blk, hd)
        bias_t = _rows_to_tile(row_bias, blk, hd).view(hd.n, hd.g, m, 1) if row_bias is not None else None
        if softmax:
            m_i = torch.full((hd.n, gm, 1), -math.inf, dtype=cd, device=q.device)
            l_i = torch.zeros_like(m_i)
        for chunk in chunks:
            c0, c1 = chunk[0], chunk[1]
            n = c1 - c0
            tile = _tile(p, blk, chunk, hd)
            s, _ = _scores(p, qt, kt_all[hd.h0 : hd.h1, :, c0:c1], blk, tile, hd, pos_w, ts_w,
                           out=scr.get("s", (hd.n, gm, n), qt))
            if softmax:
                s = tile.fill(s, -math.inf, True).view(hd.n, gm, n)
                m_new = torch.maximum(m_i, s.amax(-1, keepdim=True))
                # rows with nothing allowed yet keep max -inf; subtract 0 so exp gives 0, not NaN
                m_use = m_new.masked_fill(m_new == -math.inf, 0.0)
                alpha = torch.exp(m_i - m_use)
                pt = _exp_(s.sub_(m_use))
                if tile.allowed is not None:  # exact zeros again (_exp_ floors -inf)
                    pt = tile.fill(pt.view(hd.n, hd.g, m, n), 0.0, True).view(hd.n, gm, n)
                l_i.mul_(alpha).add_(pt.sum(-1, keepdim=True))
                acc.mul_(alpha)
                m_i = m_new
            else:
                if bias_t is not None:
                    s.add_(bias_t)
                pt = tile.fill(_activate(p, s), 0.0, True)
            if rows is not None:
                pt.view(hd.n, hd.g, m, n).masked_fill_(_dropped(p, rows, tile), 0.0)
            if p.p_round is not None:
                pt = p.p_round(pt)
            acc.baddbmm_(pt.view(hd.n, gm, n), vt_all[hd.h0 : hd.h1, c0:c1])
        if softmax:
            # an empty row has l = 0 exactly; any other l is >= 1 (or NaN, which must stay NaN)
            empty = l_i == 0
            acc = torch.where(empty, 0.0, acc.div_(l_i.masked_fill(empty, 1.0)).mul_(post))
            tile_lse = torch.where(empty, -math.inf, m_i + torch.log(l_i))
            lse[hd.q, blk.q0 : blk.q1] = _q_untile(tile_lse, m).squeeze(-1).t()
        elif post != 1.0:
            acc.mul_(post)
        out[blk.q0 : blk.q1, hd.q] = _q_untile(acc, m)

    torch_threads.run(block, [(bi, hd) for bi in p.order for hd in heads], _Scratch, device=q.device)
    return out, lse


def _forward_nan(p: _Plan, bq, bk, bv, out, lse) -> None:
    """Write NaN into the outputs (and softmax lse) that touch a non-finite input (reference rule)."""
    hq, hkv = bq.shape[1], bk.shape[1]
    hd = _Heads(0, hkv, hkv, hq // hkv)
    fv = bv.to(p.cdtype).transpose(0, 1)  # (Hkv, Tk, Dv)
    for blk, chunks in zip(p.blocks, p.chunks):
        m = blk.q1 - blk.q0
        bq_t = _rows_to_tile(bq, blk, hd).view(hkv, hd.g, m, 1)
        bad_rows = torch.zeros(hkv, hd.g, m, dtype=torch.bool, device=bq.device)
        bad_v = torch.zeros(hkv, hd.g * m, fv.shape[2], dtype=p.cdtype, device=bq.device)
        for chunk in chunks:
            c0, c1 = chunk[0], chunk[1]
            tile = _tile(p, blk, chunk, hd)
            allowed = tile.full((hkv, hd.g, m, c1 - c0), bq.device)
            scores = bq_t | bk[c0:c1].t().view(hkv, 1, 1, -1)
            if tile.bad is not None:
                scores = scores | tile.bad
            bad_rows |= (allowed & scores).any(-1)
            bad_v.baddbmm_(allowed.to(p.cdtype).view(hkv, -1, c1 - c0), fv[:, c0:c1])
        touched = _q_untile(bad_v > 0, m) | _q_untile(bad_rows.view(hkv, -1, 1), m)
        out[blk.q0 : blk.q1] = torch.where(touched, _nan(out), out[blk.q0 : blk.q1])
        if lse.numel():
            lse_rows = _q_untile(bad_rows.view(hkv, -1, 1), m).squeeze(-1).t()
            lse[:, blk.q0 : blk.q1] = torch.where(lse_rows, _nan(lse), lse[:, blk.q0 : blk.q1])


# ------------------------------------------------------------------------------ backward


@dataclass
class _BackwardTask:
    """Query blocks ``blocks`` for kv heads ``hd``, adding into the partial sums ``part`` of dK/dV."""

    hd: _Heads
    blocks: list
    part: int
    work: int


def _backward_tasks(p: _Plan, hkv: int, g: int, split: bool) -> tuple[list, int]:
    """Pieces of the backward pass and the number of partial dK/dV sums.

    dK and dV of a key add up contributions of every query block that sees it. Each piece owns
    the heads it computes, so pieces of different heads never write to the same place; when
    there are few head groups, the query blocks are also split into ranges with a dK/dV sum
    each, added in order at the end. The split depends on the problem only, never on the thread
    count or on which thread ran what: results are bit-identical however many threads run them."""
    blocks = list(range(len(p.blocks)))
    if not split:
        return [_BackwardTask(_Heads(0, hkv, hkv, g), blocks, 0, 0)], 1
    # up to 4 groups of KV heads; fewer than 4 KV heads (MQA, GQA): query-block ranges too,
    # each with its own dK/dV sum
    heads = _head_ranges(hkv, g, min(hkv, 4))
    parts = max(1, min(len(blocks), -(-4 // len(heads))))
    ranges, total, acc, start = [], sum(p.work), 0, 0
    for i, w in enumerate(p.work):  # contiguous ranges of about equal work
        acc += w
        if acc * parts >= total * (len(ranges) + 1) and len(ranges) < parts - 1:
            ranges.append(blocks[start : i + 1])
            start = i + 1
    ranges.append(blocks[start:])
    ranges = [r for r in ranges if r]
    tasks = [_BackwardTask(hd, r, i, sum(p.work[b] for b in r) * hd.n) for hd in heads for i, r in enumerate(ranges)]
    tasks.sort(key=lambda t: -t.work)
    return tasks, max(1, len(ranges))


def _backward(p: _Plan, q, k, v, out, lse, dout, dlse, pos_w, ts_w):
    """(dq, dk, dv, dpos, dts) in the inputs' dtypes; q, k, v, out, dout in the compute dtype.

    With grad mode on (double backward: create_graph=True) every op is out of place and one
    piece of work runs in this thread, so autograd can record it."""
    spec, cd = p.spec, p.cdtype
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    inplace = not torch.is_grad_enabled()
    dev = q.device
    dq = _empty(q.shape, dtype=cd, device=dev)
    tasks, parts = _backward_tasks(p, hkv, g, split=inplace)
    dk_parts = torch.zeros(parts, hkv, k.shape[0], k.shape[2], dtype=cd, device=dev)
    dv_parts = torch.zeros(parts, hkv, v.shape[0], v.shape[2], dtype=cd, device=dev)
    # the bias weights collect gradient from every pair of every tile: float64 sums, one per piece
    dpos = torch.zeros((len(tasks),) + pos_w.shape, dtype=torch.float64, device=dev) if pos_w is not None else None
    dts = torch.zeros((len(tasks),) + ts_w.shape, dtype=torch.float64, device=dev) if ts_w is not None else None
    # SiLU's 1/n and dropout's 1/(1-p) multiply P where it meets V: fold them into dO once
    post = (p.silu_scale if spec.score == "silu" else 1.0) / (1.0 - spec.dropout_p)
    rows = dict(delta=None, neg_lse=None, bias=None)
    if spec.score == "softmax":
        # delta_i = sum_j p_ij dp_ij = dO_i . O_i; a gradient on lse enters as -dlse (dlse/ds = p)
        delta = (dout * out).sum(-1)
        rows["delta"] = delta - dlse.to(cd).t() if dlse is not None else delta
        rows["neg_lse"] = -torch.where(torch.isinf(lse), 0.0, lse).t()  # (Tq, Hq); empty rows: s all -inf
    elif p.row_bias is not None:
        rows["bias"] = p.row_bias.view(-1, 1).expand(-1, hq)
    ops = _BackwardOps(p, q, k, v, dout, rows, pos_w, ts_w, post, inplace)
    found = {}

    def run_task(scr: Optional[_Scratch], ti: int) -> None:
        t = tasks[ti]
        hd = t.hd
        dk_acc, dv_acc = dk_parts[t.part, hd.h0 : hd.h1], dv_parts[t.part, hd.h0 : hd.h1]
        for bi in t.blocks:
            dq_blk, dk_acc, dv_acc = ops.block(bi, hd, dk_acc, dv_acc, dpos[ti] if dpos is not None else None,
                                               dts[ti] if dts is not None else None, scr)
            blk = p.blocks[bi]
            dq[blk.q0 : blk.q1, hd.q] = dq_blk
        if not inplace:
            found["dk"], found["dv"] = dk_acc, dv_acc

    torch_threads.run(run_task, range(len(tasks)), _Scratch if inplace else (lambda: None), device=dev,
                      threads=None if inplace else 1)
    if inplace:
        dk, dv = dk_parts.sum(0) if parts > 1 else dk_parts[0], dv_parts.sum(0) if parts > 1 else dv_parts[0]
    else:
        dk, dv = found["dk"], found["dv"]
    grads = [dq.to(p.call.q.dtype), dk.transpose(0, 1).to(p.call.k.dtype), dv.transpose(0, 1).to(p.call.v.dtype)]
    grads += [dpos.sum(0).to(pos_w.dtype), dts.sum(0).to(ts_w.dtype)] if pos_w is not None else [None, None]
    return grads


class _BackwardOps:
    """The backward pass of one query block for some heads: recompute each tile's scores and P,
    then dV += P^T dO, dS = P (dP - delta) (softmax) or dP f'(s), dQ += dS K, dK += dS^T Q.
    With ``inplace`` the tiles live in the thread's scratch buffers; without it (double
    backward) every op is out of place so autograd can record it."""

    def __init__(self, p: _Plan, q, k, v, dout, rows: dict, pos_w, ts_w, post: float, inplace: bool):
        self.p, self.q, self.dout, self.rows, self.pos_w, self.ts_w = p, q, dout, rows, pos_w, ts_w
        self.post, self.inplace = post, inplace
        self.kt_all = k.permute(1, 2, 0)  # (Hkv, D, Tk), views (see _forward)
        self.k_all = k.transpose(0, 1)  # (Hkv, Tk, D)
        self.vt_all = v.permute(1, 2, 0)  # (Hkv, Dv, Tk)

    def block(self, bi: int, hd: _Heads, dk_acc, dv_acc, dpos, dts, scr: Optional[_Scratch]):
        p, ip = self.p, self.inplace
        spec = p.spec
        softmax = spec.score == "softmax"
        blk, chunks = p.blocks[bi], p.chunks[bi]
        m = blk.q1 - blk.q0
        qt = _q_tile(self.q, blk, hd) * spec.scale
        gm = qt.shape[1]
        do = _q_tile(self.dout, blk, hd)  # (nh, G*m, Dv)
        do = do * self.post if self.post != 1.0 else do
        dqt = torch.zeros_like(qt)
        drop_rows = _dropout_rows(p, blk, hd)
        row_add = self.rows["neg_lse"] if softmax else self.rows["bias"]
        row_add = _rows_to_tile(row_add, blk, hd).view(hd.n, hd.g, m, 1) if row_add is not None else None
        delta_t = _rows_to_tile(self.rows["delta"], blk, hd) if softmax else None
        for chunk in chunks:
            c0, c1 = chunk[0], chunk[1]
            n = c1 - c0
            shape4 = (hd.n, hd.g, m, n)
            tile = _tile(p, blk, chunk, hd)
            s, tanh = _scores(p, qt, self.kt_all[hd.h0 : hd.h1, :, c0:c1], blk, tile, hd, self.pos_w, self.ts_w,
                              out=scr.get("s", (hd.n, gm, n), qt) if ip else None,
                              tanh_out=scr.get("tanh", (hd.n, gm, n), qt) if ip else None)
            if row_add is not None:  # softmax: s - lse, so that P = exp(s); sigmoid: its bias
                s = s.add_(row_add) if ip else s + row_add
            dp = torch.bmm(do, self.vt_all[hd.h0 : hd.h1, :, c0:c1], out=scr.get("dp", (hd.n, gm, n), qt) if ip else None)
            dp = dp.view(shape4)
            drop = _dropped(p, drop_rows, tile) if drop_rows is not None else None
            if drop is not None:
                dp = dp.masked_fill_(drop, 0.0) if ip else dp.masked_fill(drop, 0.0)
            if softmax:  # P = exp(s - lse); disallowed pairs are zeroed below with dS
                pt = _exp_(s) if ip else s.exp()
                ds = dp.sub_(delta_t.view(hd.n, hd.g, m, 1)).mul_(pt) if ip else (dp - delta_t.view(hd.n, hd.g, m, 1)) * pt
            else:
                pt, ds = _activate_with_grad(p, s, dp, scr if ip else None)
            ds = tile.fill(ds, 0.0, ip)  # exact zeros, whatever a disallowed pair computed
            pt = tile.fill(pt, 0.0, ip)
            if drop is not None:
                pt = pt.masked_fill_(drop, 0.0) if ip else pt.masked_fill(drop, 0.0)
            pt, ds = pt.reshape(hd.n, gm, n), ds.reshape(hd.n, gm, n)
            dv_acc = _add_into(dv_acc, c0, c1, pt.transpose(1, 2), do, ip)
            if dpos is not None:
                _, rel, bucket = _rab_tile(p, blk, c0, c1, self.pos_w, self.ts_w)
                gr = ds.reshape(hd.n * hd.g, m * n).double()
                if dpos.shape[0] == 1:
                    gr = gr.sum(0, keepdim=True)
                    dpos.index_add_(1, rel.flatten(), gr)
                    dts.index_add_(1, bucket.flatten(), gr)
                else:
                    dpos[hd.q].index_add_(1, rel.flatten(), gr)
                    dts[hd.q].index_add_(1, bucket.flatten(), gr)
            if tanh is not None:  # d(c tanh(x/c))/dx = 1 - tanh^2
                ds = ds.sub_(tanh.mul_(tanh).mul_(ds)) if ip else ds * (1 - tanh * tanh)
            k_chunk = self.k_all[hd.h0 : hd.h1, c0:c1]
            dqt = dqt.baddbmm_(ds, k_chunk) if ip else torch.baddbmm(dqt, ds, k_chunk)
            dk_acc = _add_into(dk_acc, c0, c1, ds.transpose(1, 2), qt, ip)
        return _q_untile(dqt * spec.scale, m), dk_acc, dv_acc


def _add_into(acc: torch.Tensor, c0: int, c1: int, a: torch.Tensor, b: torch.Tensor, inplace: bool) -> torch.Tensor:
    """acc[:, c0:c1] += a @ b for an (nh, Tk, D) accumulator (out of place in grad mode)."""
    if inplace:
        acc[:, c0:c1].baddbmm_(a, b)
        return acc
    return acc.index_add(1, torch.arange(c0, c1, device=a.device), torch.bmm(a, b))


def _backward_nan(p: _Plan, bq, bk, bv, bdo, bad_delta, bad_lse, grads) -> None:
    """Write NaN into the gradients that touch a non-finite value (the reference's rule)."""
    hq, hkv = bq.shape[1], bk.shape[1]
    hd = _Heads(0, hkv, hkv, hq // hkv)
    g = hd.g
    softmax = p.spec.score == "softmax"
    cd = p.cdtype
    bad_dq = torch.zeros(bq.shape, dtype=torch.bool, device=bq.device)  # (Tq, Hq)
    bad_dk = torch.zeros(bk.shape, dtype=torch.bool, device=bq.device)  # (Tk, Hkv)
    bad_dv = torch.zeros(bv.shape, dtype=torch.bool, device=bq.device)  # (Tk, Hkv, Dv)
    counts = [torch.zeros(w.shape, dtype=torch.float64, device=bq.device) for w in grads[3:] if w is not None]
    bv_any = bv.any(-1)
    bdo_any = bdo.any(-1)  # (Tq, Hq)
    for blk, chunks in zip(p.blocks, p.chunks):
        m = blk.q1 - blk.q0
        row_bad = _rows_to_tile(bdo_any | bad_delta if softmax else bdo_any, blk, hd).view(hkv, g, m, 1)
        rows_lse = _rows_to_tile(bad_lse, blk, hd).view(hkv, g, m, 1) if softmax else None
        bq_t = _rows_to_tile(bq, blk, hd).view(hkv, g, m, 1)
        do_t = _q_tile(bdo.to(cd), blk, hd)  # (Hkv, G*m, Dv)
        for chunk in chunks:
            c0, c1 = chunk[0], chunk[1]
            n = c1 - c0
            tile = _tile(p, blk, chunk, hd)
            allowed = tile.full((hkv, g, m, n), bq.device)
            if softmax:
                bad_p = allowed & rows_lse
            else:
                scores = bq_t | bk[c0:c1].t().view(hkv, 1, 1, n)
                bad_p = allowed & (scores | tile.bad if tile.bad is not None else scores)
            bad_ds = allowed & (bad_p | row_bad | bv_any[c0:c1].t().view(hkv, 1, 1, n))
            bad_dq[blk.q0 : blk.q1] |= _q_untile(bad_ds.any(-1).view(hkv, -1, 1), m).squeeze(-1)
            bad_dk[c0:c1] |= bad_ds.any(-2).any(1).t()
            via_do = torch.bmm(allowed.to(cd).view(hkv, -1, n).transpose(1, 2), do_t) > 0  # (Hkv, n, Dv)
            bad_dv[c0:c1] |= (via_do | bad_p.any(-2).any(1).unsqueeze(-1)).transpose(0, 1)
            if counts:
                rel, bucket = _rab_indices(p, blk, c0, c1)
                c = bad_ds.reshape(hq, m, n).double()
                c = c.sum(0, keepdim=True) if counts[0].shape[0] == 1 else c
                counts[0].index_add_(1, rel.flatten(), c.reshape(c.shape[0], -1))
                counts[1].index_add_(1, bucket.flatten(), c.reshape(c.shape[0], -1))
    grads[0].masked_fill_(bad_dq.unsqueeze(-1), math.nan)
    grads[1].masked_fill_(bad_dk.unsqueeze(-1), math.nan)
    grads[2].masked_fill_(bad_dv, math.nan)
    for grad, c in zip(grads[3:], counts):
        grad.masked_fill_(c > 0, math.nan)


# ------------------------------------------------------------------------------ autograd


@dataclass
class _Inputs:
    """q, k, v in the compute dtype, with any NaN/Inf replaced by 0, and the flags of where they were."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bad: Optional[tuple] = None  # (bq (Tq, Hq), bk (Tk, Hkv), bv (Tk, Hkv, Dv)) bool, when any is set

    @classmethod
    def of(cls, p: _Plan, q, k, v) -> "_Inputs":
        cd = p.cdtype
        if _all_finite(q, k, v) and not p.mask_has_bad:
            return cls(q.to(cd), k.to(cd), v.to(cd))
        bv = ~torch.isfinite(v)
        bad = (~torch.isfinite(q).all(-1), ~torch.isfinite(k).all(-1), bv)
        return cls(_zero_nonfinite(q).to(cd), _zero_nonfinite(k).to(cd), v.masked_fill(bv, 0).to(cd), bad)


def _forward_any(p: _Plan, q, k, v, pos_w, ts_w, needs_grad: bool):
    """The forward for inputs in the caller's dtypes, non-finite values included: packed output
    (in the compute dtype where the backward's delta needs it, else q's) and lse. Softmax's
    backward takes delta_i = dO_i . O_i: from the float32 O, not the 16-bit one returned (its
    rounding, up to 2^-9 of |O|, is magnified where dP - delta cancels)."""
    x = _Inputs.of(p, q, k, v)
    wide = p.spec.score == "softmax" and q.dtype != p.cdtype and needs_grad
    out, lse = _forward(p, x.q, x.k, x.v, pos_w, ts_w, p.cdtype if wide else None)
    if x.bad is not None:
        _forward_nan(p, *x.bad, out, lse)
    return out, lse


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_w, ts_w, plan: _Plan):
        out, lse = _forward_any(plan, q, k, v, pos_w, ts_w, any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(q, k, v, out, lse, pos_w, ts_w)
        ctx.plan = plan
        if plan.spec.score != "softmax":
            ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, pos_w, ts_w = ctx.saved_tensors
        with torch_threads.caller_on_one_thread(q.device):
            return (*_backward_any(ctx.plan, q, k, v, out, lse, dout, dlse, pos_w, ts_w), None)


def _backward_any(p: _Plan, q, k, v, out, lse, dout, dlse, pos_w, ts_w):
    """The backward pass for inputs in the caller's dtypes, non-finite values included."""
    cd = p.cdtype
    x = _Inputs.of(p, q, k, v)
    if dlse is not None and p.spec.score != "softmax":
        dlse = None
    if x.bad is None and _all_finite(dout, dlse):
        return _backward(p, x.q, x.k, x.v, out.to(cd), lse, dout.to(cd), dlse, pos_w, ts_w)
    bq, bk, bv = x.bad if x.bad is not None else (
        torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device),
        torch.zeros(k.shape[:2], dtype=torch.bool, device=q.device),
        torch.zeros(v.shape, dtype=torch.bool, device=q.device),
    )
    bdo = ~torch.isfinite(dout)
    softmax = p.spec.score == "softmax"
    bad_delta = bad_lse = None
    if softmax:
        # delta_i = dO_i . O_i - dlse_i is bad where any of them is non-finite
        bad_delta = bdo.any(-1) | ~torch.isfinite(out).all(-1)
        if dlse is not None:
            bad_delta |= ~torch.isfinite(dlse).t()
        bad_lse = lse.isnan().t()  # rows with a bad score: the forward wrote NaN there
        lse = torch.where(lse.isnan() | (lse == math.inf), 0.0, lse)
        dlse = _zero_nonfinite(dlse) if dlse is not None else None
    grads = _backward(p, x.q, x.k, x.v, _zero_nonfinite(out).to(cd), lse, dout.masked_fill(bdo, 0).to(cd), dlse,
                      pos_w, ts_w)
    _backward_nan(p, bq, bk, bv, bdo, bad_delta, bad_lse, grads)
    return grads


def attention(spec: Spec, call: Call, p_round=None, key_tiles: Optional[int] = None
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Packed output (Tq, Hq, Dv) in the inputs' dtype and, for softmax, lse (Hq, Tq).
    ``p_round``, ``key_tiles``: the quantized emulation's rounding of P (forward only) on the
    kernel's key tiles (see _Plan.build)."""
    q, k, v = call.packed()
    pos_w = call.rab.pos_w if call.rab is not None else None
    ts_w = call.rab.ts_w if call.rab is not None else None
    with torch_threads.caller_on_one_thread(q.device):
        plan = _Plan.build(spec, call, key_tiles)
        plan.p_round = p_round
        out, lse = _TiledAttention.apply(q, k, v, pos_w, ts_w, plan)
    return out, (lse if spec.score == "softmax" else None)


def forward_without_autograd(spec: Spec, call: Call, needs_grad: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Packed output (Tq, Hq, Dv) in q's dtype, lse (Hq, Tq) (empty but for softmax) and, where a
    backward will need it (``needs_grad``, softmax on 16-bit inputs), the output in the compute
    dtype (else None): the forward of a call without a relative bias, for a custom op
    (omniattn._ops_torch), whose backward is :func:`backward`."""
    q, k, v = call.packed()
    with torch_threads.caller_on_one_thread(q.device):
        plan = _Plan.build(spec, call)
        out, lse = _forward_any(plan, q, k, v, None, None, needs_grad)
    wide = out if out.dtype != q.dtype else None
    return out.to(q.dtype), lse, wide


def block_backward(spec: Spec, call: Call, out: torch.Tensor, lse: Optional[torch.Tensor], dout: torch.Tensor):
    """(dq, dk, dv) in the caller's layout for this call's keys, given the output and (softmax)
    lse of the whole attention in the caller's layout (see backends.backward)."""
    return backward(spec, call, out, lse, dout)


def backward(spec: Spec, call: Call, out: torch.Tensor, lse: Optional[torch.Tensor], dout: torch.Tensor,
             dlse: Optional[torch.Tensor] = None):
    """(dq, dk, dv) in the caller's layout from out, lse (softmax), dout and dlse in the caller's
    layout: the tiled backward of any call without a relative bias."""
    with torch_threads.caller_on_one_thread(call.q.device):
        return _backward_call(spec, call, out, lse, dout, dlse)


def _backward_call(spec: Spec, call: Call, out, lse, dout, dlse):
    q, k, v = call.packed()
    plan = _Plan.build(spec, call)
    if call.dense:
        b, n = call.q.shape[0], call.q.shape[1]
        out_p = out.reshape(b * n, out.shape[2], out.shape[3])
        dout_p = dout.reshape(b * n, dout.shape[2], dout.shape[3])
        lse_p = lse.transpose(0, 1).reshape(lse.shape[1], b * n) if lse is not None else None
        dlse = dlse.transpose(0, 1).reshape(dlse.shape[1], b * n) if dlse is not None else None
    else:
        out_p, dout_p, lse_p = out, dout, lse
    if lse_p is None:
        lse_p = q.new_empty(0, dtype=plan.cdtype)
    dq, dk, dv, _, _ = _backward_any(plan, q, k, v, out_p, lse_p.to(plan.cdtype), dout_p, dlse, None, None)
    if call.dense:
        dq, dk, dv = dq.view(call.q.shape), dk.view(call.k.shape), dv.view(call.v.shape)
    return dq, dk, dv

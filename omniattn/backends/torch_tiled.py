"""Tiled attention in plain PyTorch: O(N) memory in forward and backward, any device.

This is FlashAttention-2's algorithm written with tensor ops: a block of query rows walks the key
chunks it may see (:mod:`omniattn.tiling` decides which, and which need a mask), keeping an online
softmax (running max and sum) or, for sigmoid and SiLU, a plain running sum. The backward pass
recomputes each tile's scores from Q and K instead of storing them. Nothing of size
(queries x keys) is ever allocated: the largest temporaries are (heads, block_q, block_k) tiles.

It is the backend for CPUs, older GPUs and other accelerators, and the CPU implementation CI runs.
Arithmetic is float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..hstu.relative_bias import bucketize
from ..spec import Call, Spec
from ..tiling import FULL, QueryBlock, chunk_mask, key_chunks, query_blocks, token_meta

# Tiles of BLOCK_Q query rows; key chunks sized so that heads x BLOCK_Q x BLOCK_K stays near
# TILE_ELEMS floats (4 MiB): large enough to amortise Python overhead, small enough for caches.
BLOCK_Q = 128
TILE_ELEMS = 1 << 20
MIN_BLOCK_K = 64
_empty = torch.empty  # allocation of outputs every row of which the kernel writes


def _block_k(heads: int) -> int:
    bk = MIN_BLOCK_K
    while bk < 2048 and heads * BLOCK_Q * bk * 2 <= TILE_ELEMS:
        bk *= 2
    return bk


@dataclass
class _Plan:
    """Everything derived from (spec, call) once per call and reused by the backward pass."""

    spec: Spec
    call: Call
    cdtype: torch.dtype
    blocks: list
    chunks: list
    meta: object
    row_bias: Optional[torch.Tensor]  # sigmoid bias per query row
    row_slope: Optional[torch.Tensor]  # (Tq, Hq) ALiBi slopes per query row
    t_next: Optional[torch.Tensor]  # rab: timestamp of the next token, per query row
    silu_scale: float

    @classmethod
    def build(cls, spec: Spec, call: Call) -> "_Plan":
        cdtype = torch.float64 if call.q.dtype == torch.float64 else torch.float32
        meta = token_meta(spec, call)
        blocks = query_blocks(call, BLOCK_Q)
        bk = _block_k(call.heads_q)
        chunks = [list(key_chunks(spec, call, blk, bk)) for blk in blocks]
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
        return cls(spec, call, cdtype, blocks, chunks, meta, row_bias, row_slope, t_next, 1.0 / norm)


def _q_tile(x: torch.Tensor, blk: QueryBlock, hkv: int, cdtype) -> torch.Tensor:
    """Rows [q0, q1) of a (T, Hq, D) tensor as (Hkv, G * m, D): the G query heads sharing a KV head
    stacked along the rows, so each tile is one batched matmul per KV head (GQA without copies of K)."""
    t = x[blk.q0 : blk.q1]
    m, hq, d = t.shape
    return t.view(m, hkv, hq // hkv, d).permute(1, 2, 0, 3).reshape(hkv, (hq // hkv) * m, d).to(cdtype)


def _q_untile(t: torch.Tensor, m: int, hq: int) -> torch.Tensor:
    """Inverse of _q_tile: (Hkv, G * m, D) -> (m, Hq, D)."""
    hkv, _, d = t.shape
    return t.view(hkv, hq // hkv, m, d).permute(2, 0, 1, 3).reshape(m, hq, d)


def _rows_to_tile(x: torch.Tensor, blk: QueryBlock, hkv: int) -> torch.Tensor:
    """A per-(row, head) quantity (Tq, Hq) -> (Hkv, G * m, 1) in tile order."""
    return _q_tile(x.unsqueeze(-1), blk, hkv, x.dtype)


def _scores(p: _Plan, qt, k, blk: QueryBlock, c0: int, c1: int, kind: str, pos_w, ts_w):
    """Scores of one tile as (Hkv, G, m, n) plus its mask (None for FULL tiles) and, with softcap,
    tanh(s/c) (the softcap gradient needs it)."""
    spec, meta = p.spec, p.meta
    hkv = qt.shape[0]
    m, n = blk.q1 - blk.q0, c1 - c0
    kt = k[c0:c1].to(p.cdtype).permute(1, 2, 0)  # (Hkv, D, n)
    s = torch.bmm(qt, kt).view(hkv, -1, m, n)  # (Hkv, G, m, n)
    tanh = None
    if spec.softcap > 0:
        tanh = s.div_(spec.softcap).tanh_()
        s = tanh * spec.softcap
    if p.row_slope is not None:
        dist = (meta.q_pos[blk.q0 : blk.q1].view(-1, 1) - meta.k_pos[c0:c1].view(1, -1)).abs().to(p.cdtype)
        slope = p.row_slope[blk.q0 : blk.q1].t().reshape(hkv, -1, m, 1)
        s = s.sub_(slope * dist)
    if pos_w is not None:
        s = s + _rab_tile(p, blk, c0, c1, pos_w, ts_w)[0].view(-1, 1 if pos_w.shape[0] == 1 else s.shape[1], m, n)
    mask = None if kind == FULL else chunk_mask(spec, meta, blk.q0, blk.q1, c0, c1, blk.single)
    return s, mask, tanh


def _rab_tile(p: _Plan, blk: QueryBlock, c0: int, c1: int, pos_w, ts_w):
    """(Hr, m, n) bias of one tile, with the position and bucket indices it gathered."""
    r = p.call.rab
    pos = p.meta.rab_pos  # HSTU is self-attention: queries and keys are the same tokens
    rel = (r.max_seq_len - 1) + pos[c0:c1].view(1, -1) - pos[blk.q0 : blk.q1].view(-1, 1)
    dt = p.t_next[blk.q0 : blk.q1].view(-1, 1) - r.timestamps[c0:c1].view(1, -1)
    bucket = bucketize(dt, r.num_buckets, r.bucketization)
    bias = pos_w.to(p.cdtype)[:, rel] + ts_w.to(p.cdtype)[:, bucket]
    return bias, rel, bucket


def _activate(p: _Plan, s: torch.Tensor, blk: QueryBlock) -> torch.Tensor:
    """Pointwise score function (sigmoid or SiLU) of a (Hkv, G, m, n) tile, in place."""
    if p.spec.score == "sigmoid":
        return s.add_(p.row_bias[blk.q0 : blk.q1].view(1, 1, -1, 1)).sigmoid_()
    return F.silu(s, inplace=True).mul_(p.silu_scale)


def _activate_with_grad(p: _Plan, s: torch.Tensor, blk: QueryBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointwise score function of a tile and its derivative with respect to the score."""
    if p.spec.score == "sigmoid":
        sig = torch.sigmoid(s + p.row_bias[blk.q0 : blk.q1].view(1, 1, -1, 1))
        return sig, sig * (1 - sig)
    sig = torch.sigmoid(s)
    return s * sig * p.silu_scale, sig * (1 + s * (1 - sig)) * p.silu_scale


def _forward(p: _Plan, q, k, v, pos_w, ts_w):
    spec, cd = p.spec, p.cdtype
    tq, hq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    softmax = spec.score == "softmax"
    out = _empty(tq, hq, dv, dtype=q.dtype, device=q.device)
    lse = _empty(hq, tq, dtype=cd, device=q.device) if softmax else q.new_empty(0, dtype=cd)
    for blk, chunks in zip(p.blocks, p.chunks):
        m = blk.q1 - blk.q0
        qt = _q_tile(q, blk, hkv, cd) * spec.scale  # (Hkv, G*m, D)
        acc = torch.zeros(hkv, qt.shape[1], dv, dtype=cd, device=q.device)
        if softmax:
            m_i = torch.full((hkv, qt.shape[1], 1), -math.inf, dtype=cd, device=q.device)
            l_i = torch.zeros_like(m_i)
        for c0, c1, kind in chunks:
            s, mask, _ = _scores(p, qt, k, blk, c0, c1, kind, pos_w, ts_w)
            vt = v[c0:c1].to(cd).transpose(0, 1)  # (Hkv, n, Dv)
            if softmax:
                if mask is not None:
                    s = s.masked_fill_(~mask, -math.inf)
                s = s.view(hkv, -1, c1 - c0)
                m_new = torch.maximum(m_i, s.amax(-1, keepdim=True))
                # rows with nothing allowed yet keep max -inf; subtract 0 so exp gives 0, not NaN
                m_use = m_new.masked_fill(m_new == -math.inf, 0.0) if mask is not None else m_new
                alpha = torch.exp(m_i - m_use)
                pt = s.sub_(m_use).exp_()
                l_i.mul_(alpha).add_(pt.sum(-1, keepdim=True))
                acc.mul_(alpha).baddbmm_(pt, vt)
                m_i = m_new
            else:
                pt = _activate(p, s, blk)
                if mask is not None:
                    pt = pt.masked_fill_(~mask, 0.0)
                acc.baddbmm_(pt.view(hkv, -1, c1 - c0), vt)
        if softmax:
            has_keys = l_i > 0
            acc = torch.where(has_keys, acc / l_i.clamp(min=1e-300 if cd == torch.float64 else 1e-30), 0.0)
            tile_lse = torch.where(has_keys, m_i + torch.log(l_i), -math.inf)
            lse[:, blk.q0 : blk.q1] = _q_untile(tile_lse, m, hq).squeeze(-1).t()
        out[blk.q0 : blk.q1] = _q_untile(acc, m, hq)
    return out, lse


def _backward(p: _Plan, q, k, v, out, lse, dout, dlse, pos_w, ts_w):
    spec, cd = p.spec, p.cdtype
    hq, hkv = q.shape[1], k.shape[1]
    softmax = spec.score == "softmax"
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dk = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    # The bias weights collect gradient from every (query, key) pair of every tile: sum in float64
    # (they are small, O(max_seq_len + buckets)) so the long sums lose nothing.
    dpos = torch.zeros(pos_w.shape, dtype=torch.float64, device=q.device) if pos_w is not None else None
    dts = torch.zeros(ts_w.shape, dtype=torch.float64, device=q.device) if ts_w is not None else None
    if softmax:
        # delta_i = sum_j p_ij dp_ij = dO_i . O_i; a gradient on lse enters as -dlse (dlse/ds = p)
        delta = (dout.to(cd) * out.to(cd)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(cd).t()
        lse_safe = torch.where(torch.isinf(lse), 0.0, lse).t()  # (Tq, Hq)
    for blk, chunks in zip(p.blocks, p.chunks):
        m = blk.q1 - blk.q0
        qt = _q_tile(q, blk, hkv, cd) * spec.scale
        do = _q_tile(dout, blk, hkv, cd)  # (Hkv, G*m, Dv)
        dqt = torch.zeros_like(qt)
        if softmax:
            lse_t = _rows_to_tile(lse_safe, blk, hkv).to(cd)
            delta_t = _rows_to_tile(delta, blk, hkv)
        for c0, c1, kind in chunks:
            n = c1 - c0
            s, mask, tanh = _scores(p, qt, k, blk, c0, c1, kind, pos_w, ts_w)
            vt = v[c0:c1].to(cd).transpose(0, 1)  # (Hkv, n, Dv)
            dp = torch.bmm(do, vt.transpose(1, 2))  # (Hkv, G*m, n)
            if softmax:
                if mask is not None:
                    s = s.masked_fill(~mask, -math.inf)
                pt = torch.exp(s.view(hkv, -1, n) - lse_t)
                ds = pt * (dp - delta_t)
            else:
                pt, dact = _activate_with_grad(p, s, blk)
                if mask is not None:
                    pt = pt.masked_fill(~mask, 0.0)
                    dact = dact.masked_fill(~mask, 0.0)
                pt = pt.view(hkv, -1, n)
                ds = dp * dact.view(hkv, -1, n)
            dv[c0:c1] += torch.bmm(pt.transpose(1, 2), do).transpose(0, 1)
            if dpos is not None:
                _, rel, bucket = _rab_tile(p, blk, c0, c1, pos_w, ts_w)
                g = ds.view(hq, m, n).double()
                g = g.sum(0, keepdim=True) if dpos.shape[0] == 1 else g
                dpos.index_add_(1, rel.flatten(), g.reshape(g.shape[0], -1))
                dts.index_add_(1, bucket.flatten(), g.reshape(g.shape[0], -1))
            if tanh is not None:
                ds = ds * (1 - tanh * tanh).view(hkv, -1, n)
            kt = k[c0:c1].to(cd).transpose(0, 1)  # (Hkv, n, D)
            dqt.baddbmm_(ds, kt)
            dk[c0:c1] += torch.bmm(ds.transpose(1, 2), qt).transpose(0, 1)
        dq[blk.q0 : blk.q1] = _q_untile(dqt * spec.scale, m, hq)
    grads = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)]
    grads += [dpos.to(pos_w.dtype), dts.to(ts_w.dtype)] if dpos is not None else [None, None]
    return grads


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_w, ts_w, plan: _Plan):
        out, lse = _forward(plan, q, k, v, pos_w, ts_w)
        ctx.save_for_backward(q, k, v, out, lse, pos_w, ts_w)
        ctx.plan = plan
        if plan.spec.score != "softmax":
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, pos_w, ts_w = ctx.saved_tensors
        dq, dk, dv, dpos, dts = _backward(ctx.plan, q, k, v, out, lse, dout, dlse, pos_w, ts_w)
        return dq, dk, dv, dpos, dts, None


def attention(spec: Spec, call: Call) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Packed output (Tq, Hq, Dv) in the inputs' dtype and, for softmax, lse (Hq, Tq)."""
    q, k, v = call.packed()
    plan = _Plan.build(spec, call)
    pos_w = call.rab.pos_w if call.rab is not None else None
    ts_w = call.rab.ts_w if call.rab is not None else None
    out, lse = _TiledAttention.apply(q, k, v, pos_w, ts_w, plan)
    return out, (lse if spec.score == "softmax" else None)


def block_backward(spec: Spec, call: Call, out: torch.Tensor, lse: Optional[torch.Tensor], dout: torch.Tensor):
    """(dq, dk, dv) in the caller's layout for this call's keys, given the output and (softmax)
    lse of the whole attention in the caller's layout (see backends.backward)."""
    q, k, v = call.packed()
    plan = _Plan.build(spec, call)
    if call.dense:
        b, n = call.q.shape[0], call.q.shape[1]
        out_p = out.reshape(b * n, out.shape[2], out.shape[3])
        dout_p = dout.reshape(b * n, dout.shape[2], dout.shape[3])
        lse_p = lse.transpose(0, 1).reshape(lse.shape[1], b * n) if lse is not None else None
    else:
        out_p, dout_p, lse_p = out, dout, lse
    if lse_p is None:
        lse_p = q.new_empty(0, dtype=plan.cdtype)
    dq, dk, dv, _, _ = _backward(plan, q, k, v, out_p, lse_p.to(plan.cdtype), dout_p, None, None, None)
    if call.dense:
        dq, dk, dv = dq.view(call.q.shape), dk.view(call.k.shape), dv.view(call.v.shape)
    return dq, dk, dv

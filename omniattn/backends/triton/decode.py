"""Split-KV decode kernel (flash-decoding) for every score function, dense or paged KV caches.

One program of ``decode_kernel`` is (split s, batch entry b, kv head hk, row block). Its rows are
the (query, head) pairs of hk's GQA group: row r = i * G + g is query i of query head hk * G + g,
so one K/V tile load serves every query head that reads this kv head and all Nq queries (the
(group x Nq) rows are the M dimension of the tile). The program walks its split's share of the
entry's visible keys in three ranges as fwd.py does (a masked head, an unmasked middle, a masked
tail: for causal decoding only the last tile is masked), then writes a result in the final
format: softmax the normalised output and its lse, sigmoid/SiLU the plain sum. With one split that
IS the output; with several, ``decode_merge_kernel`` combines the splits (softmax by lse, the
pointwise scores by summation).

Queries are bottom-right aligned at the end of each entry's valid keys (flash-attn's KV-cache
convention): query i of entry b sits at key position i + L_b - Nq. Paged caches are read through
``block_table`` (flash-attn's layout): key j of entry b is row j % page_size of page
block_table[b, j // page_size]; any page size works (the page of every key is looked up).

Host side at the bottom: ``decode_forward`` picks the split count from the SM count and the
context length, allocates, launches both kernels. ``merge_states_`` is the in-place merge of
partial attention states used by omniattn.longctx.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import LN2, LOG2E, SIGMOID, SOFTMAX, allowed, key_range, online_softmax_tile, sigmoid, split_range, tanh
from .configs import block_dim, cdiv, interpreting, next_pow2
from .launcher import FastLaunch


@triton.jit
def _decode_tiles(
    acc, m_i, l_i, q, K, V, bt_row, k_head, v_head, start, end,
    ii, offs_d, offs_dv, L, nq, shift, left, right, page_size,
    stride_kb, stride_kt, stride_vb, stride_vt, head_dim, head_dim_v,
    scale, softcap, slope, sig_bias, silu_scale,
    MASKED: tl.constexpr, PAGED: tl.constexpr, SCORE: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MODS: tl.constexpr,
    FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Accumulate key tiles [start, end) into (acc, m_i, l_i)."""
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_ok = offs_n < L
        else:
            kv_ok = offs_n >= 0  # unmasked tiles lie inside the valid keys
        if PAGED:  # the page of every key: block-table rows are tiny and stay in L1
            page = tl.load(bt_row + offs_n // page_size, mask=kv_ok, other=0).to(tl.int64)
            slot = (offs_n % page_size).to(tl.int64)
            k_rows = page * stride_kb + slot * stride_kt
            v_rows = page * stride_vb + slot * stride_vt
        else:
            k_rows = offs_n.to(tl.int64) * stride_kt
            v_rows = offs_n.to(tl.int64) * stride_vt
        k = tl.load(K + k_head + k_rows[:, None] + offs_d[None, :],
                    mask=kv_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN]
        jj = offs_n[None, :]
        if HAS_MODS:  # DESIGN.md's order: softcap, then ALiBi
            s = qk * scale
            if HAS_SOFTCAP:
                s = softcap * tanh(s / softcap, FAST_MATH)
            if HAS_ALIBI:
                s = s - slope * tl.abs(ii + shift - jj).to(tl.float32)
        if MASKED:
            ok = allowed(ii, jj, nq, L, shift, left, right, 0, 0, 0, 0, HAS_LEFT, HAS_RIGHT, False, False, False)
        if SCORE == SOFTMAX:
            if HAS_MODS:
                s2 = s * LOG2E
            else:
                s2 = qk * (scale * LOG2E)
            if MASKED:
                s2 = tl.where(ok, s2, float("-inf"))
            p, m_i, l_i, acc = online_softmax_tile(s2, m_i, l_i, acc, MASKED)
        else:
            if not HAS_MODS:
                s = qk * scale
            if SCORE == SIGMOID:
                p = sigmoid(s + sig_bias, FAST_MATH)
            else:
                p = s * silu_scale * sigmoid(s, FAST_MATH)
            if MASKED:
                p = tl.where(ok, p, 0.0)
        v = tl.load(V + v_head + v_rows[:, None] + offs_dv[None, :],
                    mask=kv_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["nq", "num_splits", "window_left", "window_right", "tune_key"])
def decode_kernel(
    Q, K, V, O, LSE, SEQLENS, BLOCK_TABLE, ALIBI,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_os, stride_lb, stride_lh, stride_lt, stride_ls, stride_btb, stride_ab,
    nq, hkv, group, head_dim, head_dim_v, page_size, num_splits,
    scale, softcap, sigmoid_bias, silu_scale, window_left, window_right, tune_key,
    SCORE: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_MODS: tl.constexpr, DEFAULT_SIG_BIAS: tl.constexpr, PAGED: tl.constexpr,
    FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // hkv
    hk = pid_bh % hkv
    b64 = b.to(tl.int64)
    rows = nq * group
    r0 = pid_m * BLOCK_M
    offs_r = r0 + tl.arange(0, BLOCK_M)
    row_ok = offs_r < rows
    qi = offs_r // group  # query index of each row
    h = hk * group + offs_r % group  # query head of each row
    ii = tl.where(row_ok, qi, nq)[:, None]  # padding rows get an index past the queries: masked everywhere
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    L = tl.load(SEQLENS + b)
    shift = L - nq
    q = tl.load(Q + b64 * stride_qb + qi[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    sig_bias = sigmoid_bias
    if DEFAULT_SIG_BIAS:
        sig_bias = -tl.log(tl.maximum(L, 1).to(tl.float32))
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h, mask=row_ok, other=0.0)[:, None]

    # the keys these rows may see, then this split's share of them (whole tiles)
    m0 = r0 // group
    m_last = (tl.minimum(r0 + BLOCK_M, rows) - 1) // group
    lo, hi, full_lo, full_hi = key_range(m0, m_last, nq, L, shift, window_left, window_right, 0, 0, 0, 0, HAS_LEFT,
                                         HAS_RIGHT, False, False, False)
    start, mid_lo, mid_hi = split_range(lo, hi, full_lo, full_hi, BLOCK_N)
    n_tiles = tl.maximum(tl.cdiv(hi - start, BLOCK_N), 0)
    per_split = tl.cdiv(n_tiles, num_splits)
    s0 = start + pid_s * per_split * BLOCK_N
    s1 = tl.minimum(s0 + per_split * BLOCK_N, hi)

    if PAGED:
        bt_row = BLOCK_TABLE + b64 * stride_btb
        k_head = hk * stride_kh
        v_head = hk * stride_vh
    else:
        bt_row = BLOCK_TABLE
        k_head = b64 * stride_kb + hk * stride_kh
        v_head = b64 * stride_vb + hk * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    args = (ii, offs_d, offs_dv, L, nq, shift, window_left, window_right, page_size,
            stride_kb, stride_kt, stride_vb, stride_vt, head_dim, head_dim_v, scale, softcap, slope, sig_bias,
            silu_scale)
    tiles = (q, K, V, bt_row, k_head, v_head)
    # constexprs go by keyword: inside a tuple they would become run-time values
    acc, m_i, l_i = _decode_tiles(acc, m_i, l_i, *tiles, s0, tl.minimum(s1, mid_lo), *args, MASKED=True,
                                  PAGED=PAGED, SCORE=SCORE, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                  HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_MODS=HAS_MODS,
                                  FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N)
    acc, m_i, l_i = _decode_tiles(acc, m_i, l_i, *tiles, tl.maximum(s0, mid_lo), tl.minimum(s1, mid_hi), *args,
                                  MASKED=False, PAGED=PAGED, SCORE=SCORE, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                  HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_MODS=HAS_MODS,
                                  FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N)
    acc, m_i, l_i = _decode_tiles(acc, m_i, l_i, *tiles, tl.maximum(s0, mid_hi), s1, *args, MASKED=True,
                                  PAGED=PAGED, SCORE=SCORE, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                  HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_MODS=HAS_MODS,
                                  FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N)

    if SCORE == SOFTMAX:
        # `== 0` rather than `> 0`: a NaN sum (a NaN key) must stay NaN in the output and the lse
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
        tl.store(LSE + b64 * stride_lb + h * stride_lh + qi * stride_lt + pid_s * stride_ls, lse, mask=row_ok)
    o_ptrs = O + b64 * stride_ob + qi[:, None] * stride_ot + h[:, None] * stride_oh + pid_s * stride_os + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))


@triton.jit(do_not_specialize=["nq", "num_splits"])
def decode_merge_kernel(
    OP, LSEP, O, LSE,
    stride_pb, stride_pt, stride_ph, stride_ps, stride_qb, stride_qh, stride_qt,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
    nq, hq, head_dim_v, num_splits,
    SCORE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One (batch, query, head) row: combine its splits' partial results into the output."""
    pid = tl.program_id(0)
    h = pid % hq
    t = (pid // hq) % nq
    b = (pid // (hq * nq)).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < num_splits
    o = tl.load(OP + b * stride_pb + t * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps + offs_dv[None, :],
                mask=s_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    if SCORE == SOFTMAX:
        lse = tl.load(LSEP + b * stride_qb + h * stride_qh + t * stride_qt + offs_s, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(lse - m_safe)  # an empty split (lse -inf) weighs 0; a NaN split stays NaN
        total = tl.sum(w, 0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
        lse_out = m_safe + tl.log(tl.where(total == 0.0, 1.0, total))
        tl.store(LSE + b * stride_lb + h * stride_lh + t, tl.where(total == 0.0, float("-inf"), lse_out))
    else:
        out = tl.sum(o, 0)
    tl.store(O + b * stride_ob + t * stride_ot + h * stride_oh + offs_dv, out.to(O.dtype.element_ty),
             mask=offs_dv < head_dim_v)


@triton.jit
def merge_states_kernel(
    ACC, ACC_LSE, OUT, LSE, n, heads, head_dim_v,
    stride_ab, stride_an, stride_ah, stride_lb, stride_lh, stride_ob, stride_on, stride_oh, stride_mb, stride_mh,
    SOFTMAX_MERGE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """In place: (ACC, ACC_LSE) <- the merge of (ACC, ACC_LSE) and (OUT, LSE) for BLOCK_R rows of one
    (batch entry, head). Softmax states are (normalised output, lse); the pointwise scores' are sums."""
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    r_ok = offs_r < n
    mask = r_ok[:, None] & (offs_dv[None, :] < head_dim_v)
    a_ptrs = ACC + b * stride_ab + offs_r[:, None] * stride_an + h * stride_ah + offs_dv[None, :]
    a = tl.load(a_ptrs, mask=mask, other=0.0)
    o = tl.load(OUT + b * stride_ob + offs_r[:, None] * stride_on + h * stride_oh + offs_dv[None, :],
                mask=mask, other=0.0).to(tl.float32)
    if SOFTMAX_MERGE:
        la_ptrs = ACC_LSE + b * stride_lb + h * stride_lh + offs_r
        la = tl.load(la_ptrs, mask=r_ok, other=float("-inf"))
        lb = tl.load(LSE + b * stride_mb + h * stride_mh + offs_r, mask=r_ok, other=float("-inf"))
        m = tl.maximum(la, lb)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        wa = tl.exp(la - m_safe)
        wb = tl.exp(lb - m_safe)
        total = wa + wb
        inv = 1.0 / tl.where(total == 0.0, 1.0, total)
        a = a * (wa * inv)[:, None] + o * (wb * inv)[:, None]
        tl.store(la_ptrs, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(tl.where(total == 0.0, 1.0, total))),
                 mask=r_ok)
    else:
        a = a + o
    tl.store(a_ptrs, a, mask=mask)


# --------------------------------------------------------------------------------------------
# host side


class DecodeParams(NamedTuple):
    score: int  # 0 softmax, 1 sigmoid, 2 silu
    window_left: int
    window_right: int
    scale: float
    softcap: float
    sigmoid_bias: Optional[float]  # None: -ln(L_b) of each entry
    silu_scale: float


# (BLOCK_N, num_warps, num_stages) candidates per (16-bit inputs, head dim <= 128). The decode
# kernel is bound by reading K and V once: deeper pipelines and more keys in flight per program
# are what matters; the GPU picks among these once per problem class (triton.autotune).
_GPU_CONFIGS_16BIT = ((64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4))
_GPU_CONFIGS_WIDE = ((32, 4, 2), (32, 4, 3), (64, 4, 2), (16, 4, 3))
INTERPRETER_BLOCK_N = 16
MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 4


def _override() -> Optional[tuple[int, int, int]]:
    """OMNIATTN_DECODE_CONFIG="BN,WARPS,STAGES" pins the tile config (sweeps; skips autotuning)."""
    value = os.environ.get("OMNIATTN_DECODE_CONFIG")
    if not value:
        return None
    bn, w, s = (int(x) for x in value.split(","))
    return bn, w, s


def _candidates(head_dim: int, dtype_bytes: int) -> tuple:
    return _GPU_CONFIGS_16BIT if dtype_bytes <= 2 and head_dim <= 128 else _GPU_CONFIGS_WIDE


def _time_without_flush(kernel_call, quantiles=None, reps: int = 10):
    """The autotuner's timing of one config, without triton.testing.do_bench's 256 MiB L2-flush
    buffer: a decode step may run inside a GPU memory budget (omniattn.longctx), where that buffer
    alone doubled a 256 MiB budget's peak; and a step reads its keys once, so a warm L2 flatters
    no config. CUDA events over ``reps`` calls after one warm-up call; the same number for every
    quantile asked."""
    kernel_call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        kernel_call()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / reps
    return [ms] * len(quantiles) if quantiles is not None else ms


@functools.lru_cache(maxsize=None)
def _tuned_kernel(candidates: tuple):
    configs = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in candidates]
    return triton.autotune(configs=configs, key=["tune_key"], do_bench=_time_without_flush)(decode_kernel)


# After the autotuner has chosen a problem class's config, later calls of that class launch it
# directly (FastLaunch) instead of through the autotuner's and Triton's per-call argument binding:
# a B=1 decode step over 128K tokens is 0.15 ms of GPU work, less than a call's host time.
_fast_decode = FastLaunch(decode_kernel)
_fast_merge = FastLaunch(decode_merge_kernel)
_chosen: dict = {}  # (candidates, tune_key, dtypes) -> (BLOCK_N, num_warps, num_stages)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(programs: int, max_len: int, block_n: int, slots: int) -> int:
    """FlashAttention-2's split heuristic: the fewest splits whose waves of programs fill the
    GPU's slots (SMs x programs per SM) within 85% of the best efficiency; no split gets fewer than
    MIN_TILES_PER_SPLIT tiles (a split also costs a partial write and a merge)."""
    if programs <= 0 or max_len <= 0:
        return 1
    max_splits = min(MAX_SPLITS, max(1, cdiv(max_len, block_n) // MIN_TILES_PER_SPLIT))
    if programs >= 0.8 * slots or max_splits == 1:
        return 1
    effs = []
    for s in range(1, max_splits + 1):
        waves = programs * s / slots
        effs.append(waves / math.ceil(waves))
    best = max(effs)
    return next(s for s, e in enumerate(effs, 1) if e >= 0.85 * best)


def _strides4(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def decode_forward(q, k, v, seqlens, block_table, alibi, p: DecodeParams, max_len: int, num_splits: int = 0,
                   out_dtype: Optional[torch.dtype] = None):
    """q (B, Nq, Hq, D); k/v (B, S, Hkv, D) or paged (pages, page_size, Hkv, D) with block_table
    (B, max_pages) int32; seqlens (B,) int32 on the device; alibi (B, Hq) float32 or None.
    Returns out (B, Nq, Hq, Dv) in ``out_dtype`` (default q's) and, for softmax, lse (B, Hq, Nq) float32."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bsz, nq, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    group = hq // hkv
    dev = q.device
    out_dtype = out_dtype or q.dtype
    softmax = p.score == 0
    out = torch.empty(bsz, nq, hq, dv, dtype=out_dtype, device=dev)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=dev) if softmax else None
    if out.numel() == 0:
        return out, lse
    rows = group * nq
    block_m = max(16, min(64, next_pow2(rows)))
    row_blocks = cdiv(rows, block_m)
    pinned = _override()
    if interpreting():
        config = dict(BLOCK_N=INTERPRETER_BLOCK_N)
        split_bn = INTERPRETER_BLOCK_N
        slots = 8
    else:
        split_bn = pinned[0] if pinned else 64
        slots = 2 * sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
        config = dict(BLOCK_N=pinned[0], num_warps=pinned[1], num_stages=pinned[2]) if pinned else {}
    programs = bsz * hkv * row_blocks
    splits = num_splits or choose_splits(programs, max_len, split_bn, slots)
    splits = max(1, min(splits, MAX_SPLITS))
    if splits == 1:
        o_part, l_part = out, lse
        o_strides = (*_strides4(out), 0)
        l_strides = (lse.stride(0), lse.stride(1), lse.stride(2), 0) if softmax else (0, 0, 0, 0)
    else:
        o_part = torch.empty(bsz, nq, hq, splits, dv, dtype=torch.float32, device=dev)
        l_part = torch.empty(bsz, hq, nq, splits, dtype=torch.float32, device=dev) if softmax else None
        o_strides = o_part.stride()[:4]
        l_strides = l_part.stride() if softmax else (0, 0, 0, 0)
    dummy_f = torch.empty(1, dtype=torch.float32, device=dev)
    paged = block_table is not None
    bt = block_table if paged else torch.zeros(1, dtype=torch.int32, device=dev)
    meta = dict(
        SCORE=p.score,
        HAS_LEFT=p.window_left >= 0,
        HAS_RIGHT=p.window_right >= 0,
        HAS_SOFTCAP=p.softcap > 0,
        HAS_ALIBI=alibi is not None,
        HAS_MODS=p.softcap > 0 or alibi is not None,
        DEFAULT_SIG_BIAS=p.sigmoid_bias is None,
        PAGED=paged,
        FAST_MATH=q.dtype != torch.float32 and q.is_cuda and not interpreting(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_D=block_dim(d),
        BLOCK_DV=block_dim(dv),
    )
    # the autotuner's cache key: problems of one class (context length, split count, program count)
    tune_key = (next_pow2(max(max_len, 1)) * 128 + splits) * 4096 + min(programs, 4095)
    kernel, tuned, choice = _fast_decode, None, None
    if not interpreting() and not pinned:
        candidates = _candidates(max(d, dv), q.element_size())
        choice = (candidates, tune_key, q.dtype, k.dtype, v.dtype, out_dtype, paged, alibi is not None)
        if choice in _chosen:
            bn, w, st = _chosen[choice]
            config = dict(BLOCK_N=bn, num_warps=w, num_stages=st)
        else:  # first call of this class: the autotuner times the candidates, then launches
            kernel = tuned = _tuned_kernel(candidates)
    page_size = k.shape[1] if paged else 0
    grid = (splits, bsz * hkv, row_blocks)
    kernel[grid](
        q, k, v, o_part, l_part if softmax else dummy_f, seqlens, bt, alibi if alibi is not None else dummy_f,
        *_strides4(q), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *o_strides, *l_strides, bt.stride(0) if paged else 0, alibi.stride(0) if alibi is not None else 0,
        nq, hkv, group, d, dv, page_size, splits,
        p.scale, p.softcap, p.sigmoid_bias or 0.0, p.silu_scale, p.window_left, p.window_right, tune_key,
        **meta, **config,
    )
    if tuned is not None:
        best = tuned.best_config
        _chosen[choice] = (best.kwargs["BLOCK_N"], best.num_warps, best.num_stages)
    if splits > 1:
        _fast_merge[(bsz * nq * hq,)](
            o_part, l_part if softmax else dummy_f, out, lse if softmax else dummy_f,
            *o_part.stride()[:4], *(l_part.stride()[:3] if softmax else (0, 0, 0)),
            *_strides4(out), *((lse.stride(0), lse.stride(1)) if softmax else (0, 0)),
            nq, hq, dv, splits, SCORE=p.score, BLOCK_S=next_pow2(splits), BLOCK_DV=block_dim(dv),
        )
    return out, lse


def merge_states_(acc: torch.Tensor, acc_lse: Optional[torch.Tensor], out: torch.Tensor,
                  lse: Optional[torch.Tensor]) -> None:
    """In place: acc (B, N, H, Dv) float32 and acc_lse (B, H, N) float32 (contiguous along N) <- the
    exact merge with the partial result out (B, N, H, Dv), lse (B, H, N); without lse
    (sigmoid/SiLU) acc += out."""
    bsz, n, heads, dv = acc.shape
    if acc.numel() == 0:
        return
    softmax = acc_lse is not None
    if softmax:
        if acc_lse.stride(-1) != 1 or lse.stride(-1) != 1:
            raise ValueError("merge_states_: lse tensors must be contiguous along the query axis")
        la, lb = acc_lse, lse
    else:
        la = lb = acc.new_empty(1, 1, 1)
    block_r = 16
    grid = (cdiv(n, block_r), bsz, heads)
    merge_states_kernel[grid](
        acc, la, out, lb, n, heads, dv,
        acc.stride(0), acc.stride(1), acc.stride(2), la.stride(0), la.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lb.stride(0), lb.stride(1),
        SOFTMAX_MERGE=softmax, BLOCK_R=block_r, BLOCK_DV=block_dim(dv),
    )

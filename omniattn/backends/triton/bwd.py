"""Backward kernels: a preprocess (delta = rowsum(dO * O) - dlse), dK/dV over query tiles, dQ over key tiles.

Scores are recomputed from Q and K, never stored. The dK/dV kernel owns one key tile of one
key/value head and loops over the query heads of its group, so GQA needs no atomics. The dQ kernel
mirrors the forward pass and also scatters HSTU relative-bias gradients (float64 atomics: the
weights are tiny and every pair of every tile adds to them).
"""

import triton
import triton.language as tl

from .common import (
    LOG2E,
    SIGMOID,
    SOFTMAX,
    allowed,
    key_range,
    modify_scores,
    query_range,
    rab_indices,
    next_timestamps,
    query_program,
    sequence_bounds,
    sequence_constants,
    sigmoid,
    split_range,
)


@triton.jit
def attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_lb, stride_lh,
    seqlen_q, n_heads, head_dim_v,
    IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_start, lq = sequence_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
    if pid_m * BLOCK_M >= lq:
        return
    b64 = b.to(tl.int64)
    q_start = q_start.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < lq) & (offs_dv[None, :] < head_dim_v)
    rows = q_start + offs_m
    o = tl.load(O + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_dv[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_ptrs = b64 * stride_lb + h * stride_lh + rows
    if HAS_DLSE:  # d lse_i / d s_ij = p_ij, so a gradient on lse enters as -dlse
        delta -= tl.load(DLSE + lse_ptrs, mask=offs_m < lq, other=0.0)
    tl.store(DELTA + lse_ptrs, delta, mask=offs_m < lq)


@triton.jit
def _probs_and_dscores(
    qk, dp, ii, jj, lse_or_0, delta_or_0, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
    scale, softcap, slope, sig_bias, silu_scale, t_next, t_key, pos_w, ts_w, rab_center, num_buckets, tgt_start,
    MASKED: tl.constexpr, SCORE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_RAB: tl.constexpr, BUCKET_LOG: tl.constexpr,
    HAS_MODS: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """P and dS of one tile (either orientation) from q.k and dP = dO.V; also the allowed mask.
    dS here is d loss / d score before the softcap chain rule, which the returned ``dcap`` finishes."""
    s = qk * scale
    t = s * 0.0
    if HAS_MODS:
        valid = (ii < lq) & (jj < lk)
        s, t = modify_scores(s, ii, jj, shift, slope, softcap, t_next, t_key, pos_w, ts_w, rab_center,
                             num_buckets, tgt_start, valid, HAS_SOFTCAP, HAS_ALIBI, HAS_RAB, BUCKET_LOG,
                             FAST_MATH)
    ok = (ii >= 0) & (jj >= 0)
    if MASKED:
        ok = allowed(ii, jj, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
                     MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT, HAS_MAX_ATTN)
    if SCORE == SOFTMAX:
        p = tl.exp2(s * LOG2E - lse_or_0 * LOG2E)
        if MASKED:
            p = tl.where(ok, p, 0.0)
        ds = p * (dp - delta_or_0)
    elif SCORE == SIGMOID:
        p = sigmoid(s + sig_bias, FAST_MATH)
        ds = dp * p * (1.0 - p)
        if MASKED:
            p = tl.where(ok, p, 0.0)
            ds = tl.where(ok, ds, 0.0)
    else:
        sig = sigmoid(s, FAST_MATH)
        p = s * sig * silu_scale
        ds = dp * (sig * (1.0 + s * (1.0 - sig)) * silu_scale)
        if MASKED:
            p = tl.where(ok, p, 0.0)
            ds = tl.where(ok, ds, 0.0)
    dcap = 1.0 - t * t
    return p, ds, dcap, ok


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, start, end,
    offs_n, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, left, right, contextual, max_id, max_attn_len,
    scale, softcap, slope, sig_bias, silu_scale, ts_base, t_key, pos_w, ts_w, rab_center, num_buckets, tgt_start,
    MASKED: tl.constexpr, SCORE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_RAB: tl.constexpr, BUCKET_LOG: tl.constexpr,
    HAS_MODS: tl.constexpr, FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles [start, end); tiles are transposed: [BN, BM]."""
    jj = offs_n[:, None]
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ii = offs_m[None, :]
        row_ok = offs_m < lq
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        if SCORE == SOFTMAX:
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)[None, :]
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)[None, :]
        else:
            lse = 0.0
            delta = 0.0
        if HAS_RAB:
            t_next = next_timestamps(ts_base, offs_m, lq)[None, :]
        else:
            t_next = 0
        qk = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BN, BM]
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN, BM]
        p, ds, dcap, _ = _probs_and_dscores(
            qk, dp, ii, jj, lse, delta, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
            scale, softcap, slope, sig_bias, silu_scale, t_next, t_key, pos_w, ts_w, rab_center, num_buckets, tgt_start,
            MASKED, SCORE, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT, HAS_MAX_ATTN,
            HAS_SOFTCAP, HAS_ALIBI, HAS_RAB, BUCKET_LOG, HAS_MODS, FAST_MATH)
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            ds = ds * dcap
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "contextual", "max_attn_len", "rab_center", "num_buckets",
                                "window_left", "window_right"])
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, ALIBI, NUM_TARGETS, POS_W, TS_W, TS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh, stride_ab, stride_pos_h, stride_ts_h,
    seqlen_q, seqlen_k, n_kv_heads, group, head_dim, head_dim_v,
    scale, softcap, sigmoid_bias, silu_scale, window_left, window_right,
    contextual, max_attn_len, rab_center, num_buckets, tune_len,
    SCORE: tl.constexpr, IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_RAB: tl.constexpr, BUCKET_LOG: tl.constexpr, HAS_MODS: tl.constexpr, DEFAULT_SIG_BIAS: tl.constexpr,
    FAST_MATH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    q_start, lq = sequence_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
    k_start, lk = sequence_bounds(CU_K, b, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= lk:
        return
    b64 = b.to(tl.int64)
    q_start = q_start.to(tl.int64)
    k_start = k_start.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < lk
    k = tl.load(K + b64 * stride_kb + hk * stride_kh + (k_start + offs_n)[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    v = tl.load(V + b64 * stride_vb + hk * stride_vh + (k_start + offs_n)[:, None] * stride_vt + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)

    shift = lk - lq
    max_id, tgt_start, sig_bias = sequence_constants(NUM_TARGETS, b, lq, lk, contextual, sigmoid_bias, MASK_KIND,
                                                     HAS_CONTEXT, HAS_TARGETS, DEFAULT_SIG_BIAS)
    ts_base = TS + q_start
    if HAS_RAB:
        t_key = tl.load(ts_base + offs_n, mask=col_ok, other=0)[:, None]
    else:
        t_key = 0

    n_last = tl.minimum(n0 + BLOCK_N, lk) - 1
    lo, hi, full_lo, full_hi, ctx_hi = query_range(n0, n_last, lq, lk, shift, window_left, window_right, contextual,
                                                   max_id, max_attn_len, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL,
                                                   HAS_CONTEXT, HAS_MAX_ATTN)
    start, mid_lo, mid_hi = split_range(lo, hi, full_lo, full_hi, BLOCK_M)
    ctx_end = tl.minimum(ctx_hi, start)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(group):
        h = hk * group + g
        q_base = Q + b64 * stride_qb + q_start * stride_qt + h * stride_qh
        do_base = DO + b64 * stride_dob + q_start * stride_dot + h * stride_doh
        lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start
        delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_start
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(ALIBI + b * stride_ab + h)
        pos_w = POS_W + h * stride_pos_h
        ts_w = TS_W + h * stride_ts_h
        args = (offs_n, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, window_left, window_right, contextual,
                max_id, max_attn_len, scale, softcap, slope, sig_bias, silu_scale, ts_base, t_key, pos_w, ts_w,
                rab_center, num_buckets, tgt_start)
        # constexprs go by keyword: inside a tuple they would become run-time values
        tiles = (k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot)
        if HAS_CONTEXT:  # contextual rows before the query range see these keys too
            dk, dv = _dkdv_tiles(dk, dv, *tiles, 0, ctx_end, *args, MASKED=True, BLOCK_M=BLOCK_M,
                             SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                             HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
                             HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG,
                             HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, *tiles, start, mid_lo, *args, MASKED=True, BLOCK_M=BLOCK_M,
                             SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                             HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
                             HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG,
                             HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, *tiles, mid_lo, mid_hi, *args, MASKED=False, BLOCK_M=BLOCK_M,
                             SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                             HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
                             HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG,
                             HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, *tiles, mid_hi, hi, *args, MASKED=True, BLOCK_M=BLOCK_M,
                             SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                             HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
                             HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG,
                             HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION)
    dk = dk * scale
    out_mask = col_ok[:, None]
    tl.store(DK + b64 * stride_dkb + hk * stride_dkh + (k_start + offs_n)[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=out_mask & (offs_d[None, :] < head_dim))
    tl.store(DV + b64 * stride_dvb + hk * stride_dvh + (k_start + offs_n)[:, None] * stride_dvt + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask & (offs_dv[None, :] < head_dim_v))


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start, end,
    offs_m, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, left, right, contextual, max_id, max_attn_len,
    scale, softcap, slope, sig_bias, silu_scale, t_next, ts_base, pos_w, ts_w, dpos, dts, rab_center, num_buckets,
    tgt_start,
    MASKED: tl.constexpr, SCORE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_RAB: tl.constexpr, BUCKET_LOG: tl.constexpr,
    HAS_MODS: tl.constexpr, FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles [start, end); rab gradients scattered here."""
    ii = offs_m[:, None]
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        jj = offs_n[None, :]
        col_ok = offs_n < lk
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        if HAS_RAB:
            t_key = tl.load(ts_base + offs_n, mask=col_ok, other=0)[None, :]
        else:
            t_key = 0
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM, BN]
        _, ds, dcap, ok = _probs_and_dscores(
            qk, dp, ii, jj, lse, delta, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
            scale, softcap, slope, sig_bias, silu_scale, t_next, t_key, pos_w, ts_w, rab_center, num_buckets, tgt_start,
            MASKED, SCORE, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT, HAS_MAX_ATTN,
            HAS_SOFTCAP, HAS_ALIBI, HAS_RAB, BUCKET_LOG, HAS_MODS, FAST_MATH)
        if HAS_RAB:
            rel, bucket = rab_indices(ii, jj, t_next, t_key, rab_center, num_buckets, tgt_start, BUCKET_LOG)
            hit = ok & (ii < lq) & (jj < lk)
            g = ds.to(tl.float64)
            tl.atomic_add(dpos + rel, g, mask=hit, sem="relaxed")
            tl.atomic_add(dts + bucket, g, mask=hit, sem="relaxed")
        if HAS_SOFTCAP:
            ds = ds * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "contextual", "max_attn_len", "rab_center", "num_buckets",
                                "window_left", "window_right"])
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, ALIBI, NUM_TARGETS, POS_W, TS_W, TS, DPOS, DTS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_ab, stride_pos_h, stride_ts_h,
    seqlen_q, seqlen_k, n_heads, group, head_dim, head_dim_v,
    scale, softcap, sigmoid_bias, silu_scale, window_left, window_right,
    contextual, max_attn_len, rab_center, num_buckets, tune_len,
    SCORE: tl.constexpr, IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_RAB: tl.constexpr, BUCKET_LOG: tl.constexpr, HAS_MODS: tl.constexpr, DEFAULT_SIG_BIAS: tl.constexpr,
    FAST_MATH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, b, h, hk, q_start, lq, k_start, lk = query_program(CU_Q, CU_K, seqlen_q, seqlen_k, n_heads, group,
                                                              HAS_RIGHT or HSTU_CAUSAL, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < lq
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + (q_start + offs_m)[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + (q_start + offs_m)[:, None] * stride_dot + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    if SCORE == SOFTMAX:
        lse = tl.load(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)[:, None]
        delta = tl.load(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)[:, None]
    else:
        lse = 0.0
        delta = 0.0
    k_base = K + b64 * stride_kb + k_start * stride_kt + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vt + hk * stride_vh

    shift = lk - lq
    max_id, tgt_start, sig_bias = sequence_constants(NUM_TARGETS, b, lq, lk, contextual, sigmoid_bias, MASK_KIND,
                                                     HAS_CONTEXT, HAS_TARGETS, DEFAULT_SIG_BIAS)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h)
    ts_base = TS + q_start
    if HAS_RAB:
        t_next = next_timestamps(ts_base, offs_m, lq)[:, None]
    else:
        t_next = 0
    pos_w = POS_W + h * stride_pos_h
    ts_w = TS_W + h * stride_ts_h
    dpos = DPOS + h * stride_pos_h
    dts = DTS + h * stride_ts_h

    m_last = tl.minimum(m0 + BLOCK_M, lq) - 1
    lo, hi, full_lo, full_hi = key_range(m0, m_last, lq, lk, shift, window_left, window_right, contextual, max_id,
                                         max_attn_len, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT,
                                         HAS_MAX_ATTN)
    start, mid_lo, mid_hi = split_range(lo, hi, full_lo, full_hi, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    args = (offs_m, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, window_left, window_right, contextual,
            max_id, max_attn_len, scale, softcap, slope, sig_bias, silu_scale, t_next, ts_base, pos_w, ts_w, dpos, dts,
            rab_center, num_buckets, tgt_start)
    # constexprs go by keyword: inside a tuple they would become run-time values
    tiles = (q, do, lse, delta, k_base, v_base, stride_kt, stride_vt)
    dq = _dq_tiles(dq, *tiles, start, mid_lo, *args, MASKED=True, BLOCK_N=BLOCK_N,
                   SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, HSTU_CAUSAL=HSTU_CAUSAL,
                   HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                   HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG, HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH,
                   DOT_PRECISION=DOT_PRECISION)
    dq = _dq_tiles(dq, *tiles, mid_lo, mid_hi, *args, MASKED=False, BLOCK_N=BLOCK_N,
                   SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, HSTU_CAUSAL=HSTU_CAUSAL,
                   HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                   HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG, HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH,
                   DOT_PRECISION=DOT_PRECISION)
    dq = _dq_tiles(dq, *tiles, mid_hi, hi, *args, MASKED=True, BLOCK_N=BLOCK_N,
                   SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, HSTU_CAUSAL=HSTU_CAUSAL,
                   HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                   HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG, HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH,
                   DOT_PRECISION=DOT_PRECISION)
    dq = dq * scale
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + (q_start + offs_m)[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))

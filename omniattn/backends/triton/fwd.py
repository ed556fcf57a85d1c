"""Forward kernel: FlashAttention-2's loop with the score function as a compile-time choice.

One program computes BLOCK_M query rows of one (sequence, head). It walks only the key tiles
its rows may see, in three ranges: a masked head, an unmasked middle (no mask arithmetic at all:
for causal attention this is everything left of the diagonal band) and a masked tail. Softmax
keeps a running max and sum in base 2; sigmoid and SiLU keep neither, just a running sum of P.V.
"""

import triton
import triton.language as tl

from .common import (
    LN2,
    LOG2E,
    SIGMOID,
    SOFTMAX,
    allowed,
    key_range,
    modify_scores,
    next_timestamps,
    query_program,
    sequence_constants,
    sigmoid,
    split_range,
)


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start, end,
    offs_m, offs_d, offs_dv, lq, lk, head_dim, head_dim_v,
    shift, left, right, contextual, max_id, max_attn_len,
    scale, softcap, slope, sig_bias, silu_scale, t_next, ts_base, pos_w, ts_w, rab_center, num_buckets, tgt_start,
    MASKED: tl.constexpr, SCORE: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_MAX_ATTN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_RAB: tl.constexpr,
    BUCKET_LOG: tl.constexpr, HAS_MODS: tl.constexpr, FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Accumulate key tiles [start, end) into (acc, m_i, l_i)."""
    ii = offs_m[:, None]
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        jj = offs_n[None, :]
        if MASKED:
            kv_ok = offs_n[:, None] < lk
        else:
            kv_ok = offs_n[:, None] >= 0  # unmasked tiles lie inside the sequence
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=kv_ok & (offs_d[None, :] < head_dim), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN]
        if HAS_MODS:
            if HAS_RAB:
                t_key = tl.load(ts_base + offs_n, mask=offs_n < lk, other=0)[None, :]
            else:
                t_key = 0
            valid = (ii < lq) & (jj < lk)
            s, _ = modify_scores(qk * scale, ii, jj, shift, slope, softcap, t_next, t_key, pos_w, ts_w,
                                 rab_center, num_buckets, tgt_start, valid, HAS_SOFTCAP, HAS_ALIBI, HAS_RAB, BUCKET_LOG,
                                 FAST_MATH)
        if MASKED:
            ok = allowed(ii, jj, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
                         MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT, HAS_MAX_ATTN)
        if SCORE == SOFTMAX:
            if HAS_MODS:
                s2 = s * LOG2E
            else:
                s2 = qk * (scale * LOG2E)
            if MASKED:
                s2 = tl.where(ok, s2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            if MASKED:  # a row with nothing allowed yet: subtract 0, so exp2 gives 0 rather than NaN
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            p = tl.exp2(s2 - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
        else:  # sigmoid and SiLU: no running max or sum, just P = f(s)
            if not HAS_MODS:
                s = qk * scale
            if SCORE == SIGMOID:
                p = sigmoid(s + sig_bias, FAST_MATH)
            else:
                p = s * silu_scale * sigmoid(s, FAST_MATH)
            if MASKED:
                p = tl.where(ok, p, 0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_dv[None, :],
                    mask=kv_ok & (offs_dv[None, :] < head_dim_v), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "contextual", "max_attn_len", "rab_center", "num_buckets",
                                "window_left", "window_right"])
def attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, ALIBI, NUM_TARGETS, POS_W, TS_W, TS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_ab, stride_pos_h, stride_ts_h,
    seqlen_q, seqlen_k, n_heads, group, head_dim, head_dim_v,
    scale, softcap, sigmoid_bias, silu_scale, window_left, window_right,
    contextual, max_attn_len, rab_center, num_buckets, tune_len,
    SCORE: tl.constexpr, IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_RAB: tl.constexpr, BUCKET_LOG: tl.constexpr, HAS_MODS: tl.constexpr, DEFAULT_SIG_BIAS: tl.constexpr,
    STORE_LSE: tl.constexpr, FAST_MATH: tl.constexpr,
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
    q_base = Q + b64 * stride_qb + q_start * stride_qt + h * stride_qh
    k_base = K + b64 * stride_kb + k_start * stride_kt + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vt + hk * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=(offs_m[:, None] < lq) & (offs_d[None, :] < head_dim), other=0.0)

    shift = lk - lq
    max_id, tgt_start, sig_bias = sequence_constants(NUM_TARGETS, b, lq, lk, contextual, sigmoid_bias, MASK_KIND,
                                                     HAS_CONTEXT, HAS_TARGETS, DEFAULT_SIG_BIAS)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h)
    ts_base = TS + q_start
    pos_w = POS_W + h * stride_pos_h
    ts_w = TS_W + h * stride_ts_h
    if HAS_RAB:  # timestamp of the next token of each row (the last row uses its own)
        t_next = next_timestamps(ts_base, offs_m, lq)[:, None]
    else:
        t_next = 0

    m_last = tl.minimum(m0 + BLOCK_M, lq) - 1
    lo, hi, full_lo, full_hi = key_range(m0, m_last, lq, lk, shift, window_left, window_right, contextual, max_id,
                                         max_attn_len, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT,
                                         HAS_MAX_ATTN)
    start, mid_lo, mid_hi = split_range(lo, hi, full_lo, full_hi, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    args = (offs_m, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, window_left, window_right, contextual,
            max_id, max_attn_len, scale, softcap, slope, sig_bias, silu_scale, t_next, ts_base, pos_w, ts_w,
            rab_center, num_buckets, tgt_start)
    # constexprs go by keyword: inside a tuple they would become run-time values
    tiles = (q, k_base, v_base, stride_kt, stride_vt)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *tiles, start, mid_lo, *args, MASKED=True, BLOCK_N=BLOCK_N,
                               SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                               HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
                               HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG,
                               HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *tiles, mid_lo, mid_hi, *args, MASKED=False, BLOCK_N=BLOCK_N,
                               SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                               HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
                               HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG,
                               HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *tiles, mid_hi, hi, *args, MASKED=True, BLOCK_N=BLOCK_N,
                               SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                               HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
                               HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB, BUCKET_LOG=BUCKET_LOG,
                               HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION)

    if SCORE == SOFTMAX:
        has_keys = l_i > 0.0
        acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        if STORE_LSE:
            lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
            tl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=offs_m < lq)
    o_ptrs = O + b64 * stride_ob + q_start * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < lq) & (offs_dv[None, :] < head_dim_v))

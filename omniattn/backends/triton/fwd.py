"""Forward kernel: FlashAttention-2's loop with the score function as a compile-time choice.

One program computes BLOCK_M query rows of one (sequence, head). It walks only the key tiles
its rows may see, in three ranges: a masked head, an unmasked middle (no mask arithmetic at all:
for causal attention this is everything left of the diagonal band) and a masked tail. Softmax
keeps a running max and sum in base 2; sigmoid and SiLU keep neither, just a running sum of P.V.

Varlen calls may pass a tile list (TILE_LIST): the grid then covers only the real (sequence,
query tile) pairs, heaviest first, instead of every sequence padded to the longest.

Quantized precisions are branches of the same loop (QK_MODE, PV_FP8): Q and K arrive quantized
(INT8, INT4 packed two per byte, or FP8) with one float32 scale per token, so a tile's scores are
the integer (or FP8) product times the outer product of the row and column scales; P goes to FP8
against V quantized per channel (V stored transposed, K-major, as the FP8 tensor cores need).
"""

import triton
import triton.language as tl

from .common import (
    FP8_MAX,
    LN2,
    LOG2_FP8_MAX,
    LOG2E,
    QK_EXACT,
    QK_INT4,
    QK_INT8,
    SIGMOID,
    SILU,
    SOFTMAX,
    VT_ALIGN,
    allowed,
    dropout_keep,
    dropout_row_hash,
    key_range,
    load_timestamps,
    modify_scores,
    next_timestamps,
    online_softmax_tile,
    rab_tile,
    sequence_constants,
    sigmoid,
    split_range,
    table_rows,
    tile_program,
    to_fp8,
    unpack_int4,
    vt_column,
    wide,
)


@triton.jit
def _qk_tile_quantized(q, q_hi, k, offs_n, lk, KS, ks_base, stride_kst, qm, qm_hi, sq, fold,
                       QK_MODE: tl.constexpr, SMOOTH_Q: tl.constexpr):
    """q.k of one key tile k [BN, D] from quantized Q and K, dequantized to float32 and already
    times ``fold`` (the loop's score multiplier, which the row scales ``sq`` carry: two multiplies
    per score, not three)."""
    if QK_MODE == QK_INT4:  # two int8 products over the low and high channel halves
        k_lo, k_hi = unpack_int4(k)
        qk = tl.dot(q, tl.trans(k_lo), out_dtype=tl.int32) + tl.dot(q_hi, tl.trans(k_hi), out_dtype=tl.int32)
    elif QK_MODE == QK_INT8:
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    else:
        qk = tl.dot(q, tl.trans(k))  # FP8 e4m3 -> float32
    sk = tl.load(KS + ks_base + offs_n * stride_kst, mask=offs_n < lk, other=0.0)
    qk = qk.to(tl.float32) * sq[:, None] * sk[None, :]
    if SMOOTH_Q:  # Q was smoothed by its tile mean qm: add back qm . k_j (CUDA cores, BN*D FMAs)
        if QK_MODE == QK_INT4:
            kq = tl.sum(k_lo.to(tl.float32) * qm[None, :], 1) + tl.sum(k_hi.to(tl.float32) * qm_hi[None, :], 1)
        else:
            kq = tl.sum(k.to(tl.float32) * qm[None, :], 1)
        qk += (kq * (sk * fold))[None, :]
    return qk


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, q, q_hi, k_base, v_base, stride_kt, stride_vt, k_desc, v_desc, start, end,
    offs_m, offs_d, offs_dv, lq, lk, head_dim, head_dim_v,
    shift, left, right, contextual, max_id, max_attn_len,
    scale, softcap, slope, sig_bias, silu_scale, t_next, ts_base, pos_w, ts_w, ts_edges, rab_center, num_buckets,
    rab_rows, tgt_start, mask_base, stride_mi, stride_mj, drop_row, drop_threshold, drop_scale,
    KS, ks_base, stride_kst, qm, qm_hi, sq, row_bias, fold,
    MASKED: tl.constexpr, SCORE: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_MAX_ATTN: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_CACHED: tl.constexpr, BUCKET_LOG: tl.constexpr, GPU_GATHER: tl.constexpr,
    HAS_ATTN_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_MODS: tl.constexpr, FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    QK_MODE: tl.constexpr, PV_FP8: tl.constexpr, PV_TWO_LEVEL: tl.constexpr, SMOOTH_Q: tl.constexpr,
    HAS_ROW_BIAS: tl.constexpr, EXACT_FP8_ROUNDING: tl.constexpr, INT64_OFFSETS: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Accumulate key tiles [start, end) into (acc, m_i, l_i). ``USE_TMA``: K and V tiles come by
    TMA from the descriptors (Hopper; rows past the sequence arrive as zeros, like the masked
    loads; the copies hold no registers)."""
    ii = offs_m[:, None]
    # the multiplier the scores still need: quantized scores come with it folded into their row scales
    if QK_MODE == QK_EXACT:
        s_scale = scale
        s2_scale = scale * LOG2E
    else:
        s_scale = 1.0
        s2_scale = 1.0
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        jj = offs_n[None, :]
        rows = wide(offs_n, INT64_OFFSETS)
        if MASKED:
            kv_ok = offs_n[:, None] < lk
        else:
            kv_ok = offs_n[:, None] >= 0  # unmasked tiles lie inside the sequence
        if USE_TMA:
            k = k_desc.load([start_n, 0])
        else:  # (kv_ok: a mask that is all-true in unmasked tiles compiles away)
            k = tl.load(k_base + rows[:, None] * stride_kt + offs_d[None, :],
                        mask=kv_ok & (offs_d[None, :] < head_dim), other=0.0)
        if QK_MODE == QK_EXACT:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN]
        else:
            qk = _qk_tile_quantized(q, q_hi, k, offs_n, lk, KS, ks_base, stride_kst, qm, qm_hi, sq, fold, QK_MODE,
                                    SMOOTH_Q)
        if HAS_ROW_BIAS:  # q . mean(K), removed by K's smoothing: restored for sigmoid, SiLU and the lse
            qk += row_bias[:, None]
        if MASKED:
            ok = allowed(ii, jj, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
                         MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT, HAS_MAX_ATTN)
        if HAS_MODS:
            valid = (ii < lq) & (jj < lk)
            rab = 0.0
            if RAB_CACHED:  # the call's bias table (rab_cache): read only where the mask allows
                rab_ptrs = rab_rows + (tl.multiple_of(start_n, BLOCK_N) + tl.arange(0, BLOCK_N))[None, :]
                if MASKED:
                    rab = tl.load(rab_ptrs, mask=ok, other=0.0)
                else:
                    rab = tl.load(rab_ptrs)
            elif HAS_RAB:
                t_key = load_timestamps(ts_base + offs_n, offs_n < lk, GPU_GATHER)
                rab, _ = rab_tile(ii, jj, lq, lk, t_next, t_key, pos_w, ts_w, ts_edges, rab_center, num_buckets, tgt_start,
                               True, HAS_TARGETS, BUCKET_LOG, GPU_GATHER)
            s, _, mask_ok = modify_scores(qk * s_scale, ii, jj, shift, slope, softcap, rab,
                                          mask_base + ii * stride_mi + jj * stride_mj, valid, HAS_SOFTCAP,
                                          HAS_ALIBI, HAS_RAB, HAS_ATTN_MASK, MASK_IS_BOOL, FAST_MATH)
        if HAS_ATTN_MASK:
            if MASKED:
                ok = ok & mask_ok
            else:
                ok = mask_ok
        if SCORE == SOFTMAX:
            if HAS_MODS:
                s2 = s * LOG2E
            else:
                s2 = qk * s2_scale
            if MASKED or HAS_ATTN_MASK:
                s2 = tl.where(ok, s2, float("-inf"))
            # FP8 P.V: P comes out x448 (e4m3's largest value), the running sum too
            p, m_i, l_i, acc = online_softmax_tile(s2, m_i, l_i, acc, MASKED or HAS_ATTN_MASK,
                                                   LOG2_FP8_MAX if PV_FP8 else 0.0)
        else:  # sigmoid and SiLU: no running max or sum, just P = f(s)
            if not HAS_MODS:
                s = qk * s_scale
            if SCORE == SIGMOID:  # FP8 P.V: x448, folded into sigmoid's constants
                p = sigmoid(s + sig_bias, FAST_MATH, FP8_MAX if PV_FP8 else 1.0)
            elif PV_FP8:  # SiLU's 1/n is applied to the output: P stays in FP8's range
                p = s * sigmoid(s, FAST_MATH)
            else:
                p = s * silu_scale * sigmoid(s, FAST_MATH)
            if MASKED or HAS_ATTN_MASK:
                p = tl.where(ok, p, 0.0)
        if HAS_DROPOUT:  # the softmax sum above used every P; only P.V sees the dropped ones
            p = tl.where(dropout_keep(drop_row, jj, drop_threshold), p * drop_scale, 0.0)
        if PV_FP8:
            # V^T tiles [Dv, BN] (K-major for the FP8 MMA); softmax and sigmoid P arrive x448, in
            # e4m3's range (no clamp), SiLU's is clamped; the two-level accumulator adds each tile's
            # product in float32
            vt_ptrs = v_base + offs_dv[:, None] * stride_vt + rows[None, :]
            channels_ok = offs_dv[:, None] < head_dim_v
            if USE_TMA:
                vt = v_desc.load([0, start_n])
            elif MASKED:
                # a mask along V^T's contiguous (token) axis turns the load into single bytes: only
                # the tile that crosses the sequence's end needs it, and a packed sequence's V^T has
                # zeros up to its next 16-token column (quant_kv_kernel), so there whole 16-byte
                # columns are read
                if start_n + BLOCK_N <= lk:
                    vt = tl.load(vt_ptrs, mask=channels_ok, other=0.0)
                elif IS_VARLEN:
                    vt = tl.load(vt_ptrs, mask=(offs_n // VT_ALIGN * VT_ALIGN < lk)[None, :] & channels_ok, other=0.0)
                else:
                    vt = tl.load(vt_ptrs, mask=tl.trans(kv_ok) & channels_ok, other=0.0)
            else:
                vt = tl.load(vt_ptrs, mask=channels_ok, other=0.0)
            p8 = to_fp8(p, EXACT_FP8_ROUNDING, SCORE == SILU)
            if PV_TWO_LEVEL:
                acc += tl.dot(p8, tl.trans(vt))
            else:
                acc = tl.dot(p8, tl.trans(vt), acc)
        else:
            if USE_TMA:
                v = v_desc.load([start_n, 0])
            else:
                v = tl.load(v_base + rows[:, None] * stride_vt + offs_dv[None, :],
                            mask=kv_ok & (offs_dv[None, :] < head_dim_v), other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "contextual", "max_attn_len", "rab_center", "num_buckets",
                                "window_left", "window_right", "drop_seed", "drop_threshold"])
def attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, ALIBI, NUM_TARGETS, POS_W, TS_W, TS, TS_EDGES, RAB_BIAS, stride_rab,
    TILES, MASK, QS, KS, VS, RB, QM,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_ab, stride_pos_h, stride_ts_h,
    stride_mb, stride_mh, stride_mi, stride_mj,
    stride_qsb, stride_qst, stride_qsh, stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vsh,
    seqlen_q, seqlen_k, n_heads, group, head_dim, head_dim_v,
    scale, softcap, sigmoid_bias, silu_scale, window_left, window_right,
    contextual, max_attn_len, rab_center, num_buckets, drop_seed, drop_threshold, drop_scale, tune_len,
    SCORE: tl.constexpr, IS_VARLEN: tl.constexpr, TILE_LIST: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_CACHED: tl.constexpr, BUCKET_LOG: tl.constexpr, GPU_GATHER: tl.constexpr,
    HAS_ATTN_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_MODS: tl.constexpr, DEFAULT_SIG_BIAS: tl.constexpr,
    STORE_LSE: tl.constexpr, FAST_MATH: tl.constexpr,
    QK_MODE: tl.constexpr, PV_FP8: tl.constexpr, PV_TWO_LEVEL: tl.constexpr, SMOOTH_Q: tl.constexpr,
    HAS_ROW_BIAS: tl.constexpr, EXACT_FP8_ROUNDING: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m, b, h, q_start, lq, k_start, lk = tile_program(CU_Q, CU_K, TILES, seqlen_q, seqlen_k, n_heads,
                                                         HAS_RIGHT or HSTU_CAUSAL, IS_VARLEN, TILE_LIST)
    hk = h // group
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < lq
    q_base = Q + b64 * stride_qb + q_start * stride_qt + h * stride_qh
    k_base = K + b64 * stride_kb + k_start * stride_kt + hk * stride_kh
    if PV_FP8:  # V^T: (batch or sequence, kv head, channel, token)
        v_base = V + b64 * stride_vb + hk * stride_vh + vt_column(k_start, b, IS_VARLEN)
    else:
        v_base = V + b64 * stride_vb + k_start * stride_vt + hk * stride_vh
    q_ptrs = q_base + wide(offs_m, INT64_OFFSETS)[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rows_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    q_hi = q
    sq = 0.0
    qm = 0.0
    qm_hi = 0.0
    row_bias = 0.0
    ks_base = 0
    fold = 1.0
    if QK_MODE != QK_EXACT:
        if QK_MODE == QK_INT4:
            q, q_hi = unpack_int4(q)
        qs_rows = b64 * stride_qsb + (q_start + offs_m) * stride_qst + h * stride_qsh
        # the loop's score multiplier (scale, and log2(e) for softmax without modifiers) is folded
        # into the row scales here, once per program
        if SCORE == SOFTMAX and not HAS_MODS:
            fold = scale * LOG2E
        else:
            fold = scale
        sq = tl.load(QS + qs_rows, mask=rows_ok, other=0.0) * fold
        if HAS_ROW_BIAS:
            row_bias = tl.load(RB + qs_rows, mask=rows_ok, other=0.0) * fold
        ks_base = b64 * stride_ksb + k_start * stride_kst + hk * stride_ksh
        if SMOOTH_Q:  # one mean per query tile, (sequences, heads, tiles, 2 * BLOCK_D) float32; INT4
            # keeps the low channel half in [0, BLOCK_D) and the high half in [BLOCK_D, 2 * BLOCK_D)
            qm_row = ((b64 * n_heads + h) * tl.cdiv(seqlen_q, BLOCK_M) + pid_m) * (2 * BLOCK_D)
            qm = tl.load(QM + qm_row + offs_d)
            qm_hi = tl.load(QM + qm_row + BLOCK_D + offs_d)

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
        t_next = next_timestamps(ts_base, offs_m, lq, GPU_GATHER)
    else:
        t_next = 0
    rab_rows = RAB_BIAS + table_rows(q_start, b64, seqlen_q, offs_m, lq, stride_rab, IS_VARLEN)[:, None]
    mask_base = MASK + b64 * stride_mb + h * stride_mh
    drop_row = 0
    if HAS_DROPOUT:
        drop_row = dropout_row_hash(drop_seed, b, h, n_heads, offs_m)[:, None]

    m_last = tl.minimum(m0 + BLOCK_M, lq) - 1
    lo, hi, full_lo, full_hi = key_range(m0, m_last, lq, lk, shift, window_left, window_right, contextual, max_id,
                                         max_attn_len, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT,
                                         HAS_MAX_ATTN)
    start, mid_lo, mid_hi = split_range(lo, hi, full_lo, full_hi, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    args = (offs_m, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, window_left, window_right, contextual,
            max_id, max_attn_len, scale, softcap, slope, sig_bias, silu_scale, t_next, ts_base, pos_w, ts_w, TS_EDGES,
            rab_center, num_buckets, rab_rows, tgt_start, mask_base, stride_mi, stride_mj, drop_row, drop_threshold,
            drop_scale, KS, ks_base, stride_kst, qm, qm_hi, sq, row_bias, fold)
    k_desc = k_base
    v_desc = v_base
    if USE_TMA:  # per program: the descriptor's bounds are this sequence's keys
        k_desc = tl.make_tensor_descriptor(k_base, shape=[lk, head_dim], strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        if PV_FP8:  # V^T (channel, token)
            v_desc = tl.make_tensor_descriptor(v_base, shape=[head_dim_v, lk], strides=[stride_vt, 1],
                                               block_shape=[BLOCK_DV, BLOCK_N])
        else:
            v_desc = tl.make_tensor_descriptor(v_base, shape=[lk, head_dim_v], strides=[stride_vt, 1],
                                               block_shape=[BLOCK_N, BLOCK_DV])
    # constexprs go by keyword: inside a tuple they would become run-time values
    tiles = (q, q_hi, k_base, v_base, stride_kt, stride_vt, k_desc, v_desc)
    for part in tl.static_range(3):  # masked head, unmasked middle, masked tail
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, *tiles, (start, mid_lo, mid_hi)[part], (mid_lo, mid_hi, hi)[part], *args,
            MASKED=part != 1, BLOCK_N=BLOCK_N, SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT,
            HAS_RIGHT=HAS_RIGHT, HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
            HAS_TARGETS=HAS_TARGETS, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB,
            RAB_CACHED=RAB_CACHED, BUCKET_LOG=BUCKET_LOG, GPU_GATHER=GPU_GATHER, HAS_ATTN_MASK=HAS_ATTN_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_DROPOUT=HAS_DROPOUT,
            HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION, QK_MODE=QK_MODE, PV_FP8=PV_FP8,
            PV_TWO_LEVEL=PV_TWO_LEVEL, SMOOTH_Q=SMOOTH_Q, HAS_ROW_BIAS=HAS_ROW_BIAS,
            EXACT_FP8_ROUNDING=EXACT_FP8_ROUNDING, INT64_OFFSETS=INT64_OFFSETS, USE_TMA=USE_TMA, IS_VARLEN=IS_VARLEN)

    if PV_FP8:  # undo V's per-channel scale and P's x448 (softmax: its sum carries the x448; SiLU: its 1/n)
        vs = tl.load(VS + b64 * stride_vsb + hk * stride_vsh + offs_dv, mask=offs_dv < head_dim_v, other=0.0)
        if SCORE == SILU:
            acc = acc * (vs * silu_scale)[None, :]
        elif SCORE == SIGMOID:
            acc = acc * (vs / FP8_MAX)[None, :]
        else:
            acc = acc * vs[None, :]
    if SCORE == SOFTMAX:
        has_keys = l_i > 0.0
        acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        if STORE_LSE:
            lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
            if PV_FP8:
                lse -= LOG2_FP8_MAX * LN2
            tl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=rows_ok)
    o_ptrs = (O + b64 * stride_ob + q_start * stride_ot + h * stride_oh + wide(offs_m, INT64_OFFSETS)[:, None] * stride_ot
              + offs_dv[None, :])
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=rows_ok[:, None] & (offs_dv[None, :] < head_dim_v))

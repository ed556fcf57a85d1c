"""Backward kernels: a preprocess (delta = rowsum(dO * O) - dlse), dK/dV over query tiles, dQ over key tiles.

Scores are recomputed from Q and K, never stored. The dK/dV kernel owns one key tile of one
key/value head and loops over the query heads of its group, so GQA needs no atomics. The dQ kernel
mirrors the forward pass and also reduces the HSTU relative-bias gradients, without atomics: each
tile's position-weight gradient is a sum along its diagonals (the weight depends on j - i only),
added into the program's own strip of partial sums; its time-bucket gradient lands in a small
per-program vector. rab_grad_reduce_kernel then sums the strips in a fixed order.
"""

import triton
import triton.language as tl

from .common import (
    LOG2E,
    SIGMOID,
    SOFTMAX,
    allowed,
    dropout_keep,
    dropout_row_hash,
    key_range,
    load_timestamps,
    modify_scores,
    next_timestamps,
    query_range,
    rab_tile,
    sequence_bounds,
    sequence_constants,
    sigmoid,
    split_range,
    table_rows,
    tile_program,
    time_bucket_range,
    wide,
)


@triton.jit
def attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_lb, stride_lh,
    seqlen_q, n_heads, head_dim_v,
    IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # one grid axis (query blocks fastest): (sequence, head) pairs past 65535 fit, unlike a second axis
    n_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid_m = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
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
    scale, softcap, slope, sig_bias, silu_scale, rab, mask_ptrs, drop_row, drop_threshold, drop_scale,
    MASKED: tl.constexpr, SCORE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_RAB: tl.constexpr, HAS_ATTN_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_MODS: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """P (as it multiplies V: with dropout applied) and dS of one tile (either orientation) from
    q.k and dP = dO.V; also the allowed mask. dS here is d loss / d score before the softcap
    chain rule, which the returned ``dcap`` finishes."""
    s = qk * scale
    t = s * 0.0
    ok = (ii >= 0) & (jj >= 0)
    if HAS_MODS:
        valid = (ii < lq) & (jj < lk)
        s, t, mask_ok = modify_scores(s, ii, jj, shift, slope, softcap, rab, mask_ptrs, valid, HAS_SOFTCAP,
                                      HAS_ALIBI, HAS_RAB, HAS_ATTN_MASK, MASK_IS_BOOL, FAST_MATH)
        if HAS_ATTN_MASK:
            ok = ok & mask_ok
    if MASKED:
        ok = ok & allowed(ii, jj, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
                          MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT, HAS_MAX_ATTN)
    if HAS_DROPOUT:  # dP of a dropped pair is 0; a kept one is scaled like P
        keep = dropout_keep(drop_row, jj, drop_threshold)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    if SCORE == SOFTMAX:
        p = tl.exp2(s * LOG2E - lse_or_0 * LOG2E)
        if MASKED or HAS_ATTN_MASK:
            p = tl.where(ok, p, 0.0)
        ds = p * (dp - delta_or_0)
    elif SCORE == SIGMOID:
        p = sigmoid(s + sig_bias, FAST_MATH)
        ds = dp * p * (1.0 - p)
    else:
        sig = sigmoid(s, FAST_MATH)
        p = s * sig * silu_scale
        ds = dp * (sig * (1.0 + s * (1.0 - sig)) * silu_scale)
    if SCORE != SOFTMAX:
        if MASKED or HAS_ATTN_MASK:
            p = tl.where(ok, p, 0.0)
            ds = tl.where(ok, ds, 0.0)
    if HAS_DROPOUT:
        p = tl.where(keep, p * drop_scale, 0.0)
    dcap = 1.0 - t * t
    return p, ds, dcap, ok


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, start, end,
    offs_n, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, left, right, contextual, max_id, max_attn_len,
    scale, softcap, slope, sig_bias, silu_scale, ts_base, t_key, pos_w, ts_w, ts_edges, rab_center, num_buckets,
    rab_cols, stride_rab, tgt_start, mask_base, stride_mi, stride_mj, drop_seed, drop_b, drop_h, n_heads,
    drop_threshold, drop_scale,
    MASKED: tl.constexpr, SCORE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_RAB: tl.constexpr,
    RAB_CACHED: tl.constexpr, BUCKET_LOG: tl.constexpr, GPU_GATHER: tl.constexpr, HAS_ATTN_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_MODS: tl.constexpr, FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles [start, end); tiles are transposed: [BN, BM]."""
    jj = offs_n[:, None]
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ii = offs_m[None, :]
        row_ok = offs_m < lq
        rows = wide(offs_m, INT64_OFFSETS)
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        if SCORE == SOFTMAX:
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)[None, :]
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)[None, :]
        else:
            lse = 0.0
            delta = 0.0
        rab = 0.0
        if RAB_CACHED:  # the call's bias table (rab_cache), [BN, BM]; masked tiles read only allowed pairs
            # 32-bit row offsets: the table holds fewer than 2^31 entries (rab_cache.fits)
            rab_ptrs = rab_cols + (tl.minimum(offs_m, lq - 1) * stride_rab)[None, :]
            if MASKED:
                rab = tl.load(rab_ptrs, mask=allowed(ii, jj, lq, lk, shift, left, right, contextual, max_id,
                                                     max_attn_len, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL,
                                                     HAS_CONTEXT, HAS_MAX_ATTN), other=0.0)
            else:
                rab = tl.load(rab_ptrs)
        elif HAS_RAB:
            t_next = next_timestamps(ts_base, offs_m, lq, GPU_GATHER)
            rab, _ = rab_tile(ii, jj, lq, lk, t_next, t_key, pos_w, ts_w, ts_edges, rab_center, num_buckets,
                              tgt_start, False, HAS_TARGETS, BUCKET_LOG, GPU_GATHER)
        drop_row = 0
        if HAS_DROPOUT:
            drop_row = dropout_row_hash(drop_seed, drop_b, drop_h, n_heads, offs_m)[None, :]
        qk = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BN, BM]
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN, BM]
        p, ds, dcap, _ = _probs_and_dscores(
            qk, dp, ii, jj, lse, delta, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
            scale, softcap, slope, sig_bias, silu_scale, rab, mask_base + ii * stride_mi + jj * stride_mj,
            drop_row, drop_threshold, drop_scale,
            MASKED, SCORE, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT, HAS_MAX_ATTN,
            HAS_SOFTCAP, HAS_ALIBI, HAS_RAB, HAS_ATTN_MASK, MASK_IS_BOOL, HAS_DROPOUT, HAS_MODS, FAST_MATH)
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            ds = ds * dcap
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "contextual", "max_attn_len", "rab_center", "num_buckets",
                                "window_left", "window_right", "drop_seed", "drop_threshold"])
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, ALIBI, NUM_TARGETS, POS_W, TS_W, TS, TS_EDGES, RAB_BIAS, stride_rab,
    TILES, MASK, Q_WIN,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh, stride_ab, stride_pos_h, stride_ts_h, stride_mb, stride_mh, stride_mi, stride_mj,
    seqlen_q, seqlen_k, n_kv_heads, group, head_dim, head_dim_v,
    scale, softcap, sigmoid_bias, silu_scale, window_left, window_right,
    contextual, max_attn_len, rab_center, num_buckets, drop_seed, drop_threshold, drop_scale, tune_len,
    SCORE: tl.constexpr, IS_VARLEN: tl.constexpr, TILE_LIST: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_CACHED: tl.constexpr, BUCKET_LOG: tl.constexpr, GPU_GATHER: tl.constexpr,
    HAS_ATTN_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_MODS: tl.constexpr, DEFAULT_SIG_BIAS: tl.constexpr, FAST_MATH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_Q_WIN: tl.constexpr = False, ACCUMULATE: tl.constexpr = False,
):
    # TILES, if any: (sequence, kv head, key tile) triples (schedule.tile_list). Q_WIN (HAS_Q_WIN):
    # per sequence, the one range of query rows [lo, hi) (tile-aligned) this launch visits: the
    # caller reads only some rows, the others hold zero queries and zero output gradients, so
    # they add nothing (schedule.query_windows); ACCUMULATE adds to DK/DV (one launch per window)
    pid_n, b, hk, q_start, lq, k_start, lk = tile_program(CU_Q, CU_K, TILES, seqlen_q, seqlen_k, n_kv_heads,
                                                          False, IS_VARLEN, TILE_LIST)
    n0 = pid_n * BLOCK_N
    if n0 >= lk:
        return
    b64 = b.to(tl.int64)
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
        t_key = load_timestamps(ts_base + offs_n, col_ok, GPU_GATHER)
    else:
        t_key = 0
    # the table's column of each key of the tile, in the sequence's first row (columns clamped into
    # the sequence: an unmasked tile never reads past the row, whatever the mask)
    rab_cols = (RAB_BIAS + table_rows(q_start, b64, seqlen_q, 0, lq, stride_rab, IS_VARLEN)
                + tl.minimum(offs_n, lk - 1)[:, None])

    n_last = tl.minimum(n0 + BLOCK_N, lk) - 1
    lo, hi, full_lo, full_hi, ctx_hi = query_range(n0, n_last, lq, lk, shift, window_left, window_right, contextual,
                                                   max_id, max_attn_len, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL,
                                                   HAS_CONTEXT, HAS_MAX_ATTN)
    if HAS_Q_WIN:
        lo = tl.maximum(lo, tl.load(Q_WIN + 2 * b))
        hi = tl.minimum(hi, tl.load(Q_WIN + 2 * b + 1))
        full_lo = tl.maximum(full_lo, lo)
        full_hi = tl.minimum(full_hi, hi)
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
        mask_base = MASK + b64 * stride_mb + h * stride_mh
        args = (offs_n, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, window_left, window_right, contextual,
                max_id, max_attn_len, scale, softcap, slope, sig_bias, silu_scale, ts_base, t_key, pos_w, ts_w, TS_EDGES,
                rab_center, num_buckets, rab_cols, stride_rab, tgt_start, mask_base, stride_mi, stride_mj, drop_seed,
                b, h, n_kv_heads * group, drop_threshold, drop_scale)
        # constexprs go by keyword: inside a tuple they would become run-time values
        tiles = (k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot)
        # contextual rows before the query range (they see these keys too), masked head, unmasked middle, tail
        for part in tl.static_range(4):
            if part > 0 or HAS_CONTEXT:
                dk, dv = _dkdv_tiles(
                    dk, dv, *tiles, (0, start, mid_lo, mid_hi)[part], (ctx_end, mid_lo, mid_hi, hi)[part], *args,
                    MASKED=part != 2, BLOCK_M=BLOCK_M, SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT,
                    HAS_RIGHT=HAS_RIGHT, HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
                    HAS_TARGETS=HAS_TARGETS, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB, RAB_CACHED=RAB_CACHED,
                    BUCKET_LOG=BUCKET_LOG, GPU_GATHER=GPU_GATHER, HAS_ATTN_MASK=HAS_ATTN_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                    HAS_DROPOUT=HAS_DROPOUT, HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION,
                    INT64_OFFSETS=INT64_OFFSETS)
    dk = dk * scale
    out_mask = col_ok[:, None]
    dk_ptrs = DK + b64 * stride_dkb + hk * stride_dkh + (k_start + offs_n)[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + hk * stride_dvh + (k_start + offs_n)[:, None] * stride_dvt + offs_dv[None, :]
    dk_mask = out_mask & (offs_d[None, :] < head_dim)
    dv_mask = out_mask & (offs_dv[None, :] < head_dim_v)
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=dk_mask, other=0.0).to(tl.float32)
        dv += tl.load(dv_ptrs, mask=dv_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=dv_mask)


@triton.jit
def _add_diagonal_sums(x, strip, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """strip[d] += sum_i x[i, d - (BLOCK_M - 1) + i] for d in [0, BM + BN - 1): the sums of a
    [BM, BN] tile along its diagonals (d = j - i + BM - 1).

    Row i is rotated left by i (one gather of the tile, no padding): column k then holds the pairs
    with j - i = k - w * BN, w = (k + i) // BN the row's wrap count, so each diagonal is a masked
    column sum, one per wrap count (2 for square tiles). Gathering the [BM, BM + BN - 1] band
    instead costs (BM + BN - 1) / BN times the tile."""
    rows = tl.arange(0, BLOCK_M)[:, None]
    k = tl.arange(0, BLOCK_N)
    shifted = k[None, :] + rows  # [BM, BN]
    rotated = tl.gather(x, shifted % BLOCK_N, 1)
    wraps = shifted // BLOCK_N
    for w in tl.static_range((BLOCK_M + BLOCK_N - 2) // BLOCK_N + 1):
        sums = tl.sum(tl.where(wraps == w, rotated, 0.0), 0)
        d = k - w * BLOCK_N + BLOCK_M - 1
        ok = d >= 0  # d < 0 would need a row i >= BM: those sums are empty
        tl.store(strip + d, tl.load(strip + d, mask=ok, other=0.0) + sums, mask=ok)


@triton.jit
def _rab_grads(
    ds, bucket, ii, jj, offs_m, offs_n, m0, n0, lq, lk, t_next, t_key, strip, acc_ts, acc_rows, edges,
    num_buckets, tgt_start, HAS_TARGETS: tl.constexpr, HSTU_CAUSAL: tl.constexpr, BUCKET_LOG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TS_PAD: tl.constexpr,
):
    """Add one tile's relative-bias gradients (dS, masked pairs 0; the pairs' time buckets) to the
    program's partials.

    Position weights: pair (i, j) feeds pos_w[C + p(j) - p(i)], p(x) = min(x, targets' start);
    the program's strip holds index s = p(j) - p(i) + m0 + BM - 1. Pairs of history rows and
    history keys lie on the tile's diagonals (one gather-and-sum); target rows feed per-key
    sums (they sit at the first target's position); history rows that see target keys
    (non-causal HSTU) feed per-row sums, kept in registers (acc_rows) until the program ends.
    Time buckets: per-bucket sums of dS into the register vector acc_ts."""
    rows_ok = offs_m < lq
    cols_ok = offs_n < lk
    b_lo, b_hi = time_bucket_range(t_next, t_key, rows_ok, cols_ok, edges, num_buckets, BUCKET_LOG)
    ts_idx = tl.arange(0, TS_PAD)
    for bk in range(b_lo, b_hi + 1):  # few buckets away from the diagonal (time_bucket_range)
        acc_ts += tl.where(ts_idx == bk, tl.sum(tl.sum(tl.where(bucket == bk, ds, 0.0), 1), 0), 0.0)

    diag = ds
    if HAS_TARGETS:
        tgt_row = ii >= tgt_start
        tgt_col = jj >= tgt_start
        diag = tl.where(tgt_row | tgt_col, 0.0, ds)
    tl.debug_barrier()  # the previous tile's stores overlap this tile's window (other threads)
    _add_diagonal_sums(diag, strip + n0, BLOCK_M, BLOCK_N)
    if HAS_TARGETS:
        # targets among themselves see only themselves: p(j) - p(i) = 0 -> s = m0 + BM - 1
        same = tl.sum(tl.sum(tl.where(tgt_row & tgt_col, ds, 0.0), 1), 0)
        if not HSTU_CAUSAL:  # history rows seeing target keys: p(j) - p(i) = tgt_start - i, per row
            acc_rows += tl.sum(tl.where(tgt_col & (ii < tgt_start), ds, 0.0), 1)
        tl.debug_barrier()
        tl.store(strip + m0 + BLOCK_M - 1, tl.load(strip + m0 + BLOCK_M - 1) + same)
        if m0 + BLOCK_M > tgt_start:  # target rows seeing history keys: s = j - tgt_start + m0 + BM - 1
            per_key = tl.sum(tl.where(tgt_row & (jj < tgt_start), ds, 0.0), 0)
            tl.debug_barrier()
            kp = strip + offs_n - tgt_start + m0 + BLOCK_M - 1
            ok = cols_ok & (offs_n < tgt_start)
            tl.store(kp, tl.load(kp, mask=ok, other=0.0) + per_key, mask=ok)
    return acc_ts, acc_rows


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start, end,
    offs_m, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, left, right, contextual, max_id, max_attn_len,
    scale, softcap, slope, sig_bias, silu_scale, t_next, ts_base, pos_w, ts_w, ts_edges, rab_center, num_buckets,
    tgt_start, mask_base, stride_mi, stride_mj, drop_row, drop_threshold, drop_scale, m0, strip, acc_ts, acc_rows,
    MASKED: tl.constexpr, SCORE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_RAB: tl.constexpr,
    BUCKET_LOG: tl.constexpr, GPU_GATHER: tl.constexpr, HAS_ATTN_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_MODS: tl.constexpr, FAST_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TS_PAD: tl.constexpr, INT64_OFFSETS: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles [start, end); rab gradients reduced here."""
    ii = offs_m[:, None]
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        jj = offs_n[None, :]
        col_ok = offs_n < lk
        rows = wide(offs_n, INT64_OFFSETS)
        k = tl.load(k_base + rows[:, None] * stride_kt + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vt + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        rab = 0.0
        t_key = 0
        bucket = 0
        if HAS_RAB:  # per pair: reading rab_cache's table here measured slower (NOTES.md, session 9)
            t_key = load_timestamps(ts_base + offs_n, col_ok, GPU_GATHER)
            rab, bucket = rab_tile(ii, jj, lq, lk, t_next, t_key, pos_w, ts_w, ts_edges, rab_center, num_buckets,
                                   tgt_start, True, HAS_TARGETS, BUCKET_LOG, GPU_GATHER)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM, BN]
        _, ds, dcap, ok = _probs_and_dscores(
            qk, dp, ii, jj, lse, delta, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
            scale, softcap, slope, sig_bias, silu_scale, rab, mask_base + ii * stride_mi + jj * stride_mj,
            drop_row, drop_threshold, drop_scale,
            MASKED, SCORE, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT, HAS_MAX_ATTN,
            HAS_SOFTCAP, HAS_ALIBI, HAS_RAB, HAS_ATTN_MASK, MASK_IS_BOOL, HAS_DROPOUT, HAS_MODS, FAST_MATH)
        if HAS_RAB:
            g = tl.where(ok & (ii < lq) & (jj < lk), ds, 0.0)
            acc_ts, acc_rows = _rab_grads(g, bucket, ii, jj, offs_m, offs_n, m0, start_n, lq, lk, t_next, t_key,
                                          strip, acc_ts, acc_rows, ts_edges, num_buckets, tgt_start, HAS_TARGETS,
                                          HSTU_CAUSAL, BUCKET_LOG, BLOCK_M, BLOCK_N, TS_PAD)
        if HAS_SOFTCAP:
            ds = ds * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq, acc_ts, acc_rows


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "contextual", "max_attn_len", "rab_center", "num_buckets",
                                "window_left", "window_right", "drop_seed", "drop_threshold"])
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, ALIBI, NUM_TARGETS, POS_W, TS_W, TS, TS_EDGES, TILES, MASK,
    PART_POS, PART_TS, STRIP_START,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_ab, stride_pos_h, stride_ts_h, stride_mb, stride_mh, stride_mi, stride_mj,
    seqlen_q, seqlen_k, n_heads, group, head_dim, head_dim_v,
    scale, softcap, sigmoid_bias, silu_scale, window_left, window_right,
    contextual, max_attn_len, rab_center, num_buckets, drop_seed, drop_threshold, drop_scale, tune_len,
    SCORE: tl.constexpr, IS_VARLEN: tl.constexpr, TILE_LIST: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HSTU_CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_RAB: tl.constexpr, BUCKET_LOG: tl.constexpr, GPU_GATHER: tl.constexpr, HAS_ATTN_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_MODS: tl.constexpr, DEFAULT_SIG_BIAS: tl.constexpr, FAST_MATH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TS_PAD: tl.constexpr,
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
    t_next = 0
    if HAS_RAB:
        t_next = next_timestamps(ts_base, offs_m, lq, GPU_GATHER)
    pos_w = POS_W + h * stride_pos_h
    ts_w = TS_W + h * stride_ts_h
    mask_base = MASK + b64 * stride_mb + h * stride_mh
    drop_row = 0
    if HAS_DROPOUT:
        drop_row = dropout_row_hash(drop_seed, b, h, n_heads, offs_m)[:, None]
    if TILE_LIST:
        pid = tl.program_id(0)
    else:
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    strip = PART_POS + tl.load(STRIP_START + pid)
    acc_ts = tl.zeros([TS_PAD], dtype=tl.float32)
    acc_rows = tl.zeros([BLOCK_M], dtype=tl.float32)

    m_last = tl.minimum(m0 + BLOCK_M, lq) - 1
    lo, hi, full_lo, full_hi = key_range(m0, m_last, lq, lk, shift, window_left, window_right, contextual, max_id,
                                         max_attn_len, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT,
                                         HAS_MAX_ATTN)
    start, mid_lo, mid_hi = split_range(lo, hi, full_lo, full_hi, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    args = (offs_m, offs_d, offs_dv, lq, lk, head_dim, head_dim_v, shift, window_left, window_right, contextual,
            max_id, max_attn_len, scale, softcap, slope, sig_bias, silu_scale, t_next, ts_base, pos_w, ts_w, TS_EDGES,
            rab_center, num_buckets, tgt_start, mask_base, stride_mi, stride_mj, drop_row, drop_threshold, drop_scale,
            m0, strip)
    # constexprs go by keyword: inside a tuple they would become run-time values
    tiles = (q, do, lse, delta, k_base, v_base, stride_kt, stride_vt)
    for part in tl.static_range(3):  # masked head, unmasked middle, masked tail
        dq, acc_ts, acc_rows = _dq_tiles(
            dq, *tiles, (start, mid_lo, mid_hi)[part], (mid_lo, mid_hi, hi)[part], *args, acc_ts, acc_rows,
            MASKED=part != 1, BLOCK_N=BLOCK_N, SCORE=SCORE, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT,
            HAS_RIGHT=HAS_RIGHT, HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN,
            HAS_TARGETS=HAS_TARGETS, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI, HAS_RAB=HAS_RAB,
            BUCKET_LOG=BUCKET_LOG, GPU_GATHER=GPU_GATHER, HAS_ATTN_MASK=HAS_ATTN_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_DROPOUT=HAS_DROPOUT,
            HAS_MODS=HAS_MODS, FAST_MATH=FAST_MATH, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
            TS_PAD=TS_PAD, INT64_OFFSETS=INT64_OFFSETS)
    if HAS_RAB:
        tl.store(PART_TS + pid * TS_PAD + tl.arange(0, TS_PAD), acc_ts)
        if HAS_TARGETS and not HSTU_CAUSAL:  # history rows that saw target keys: s = tgt_start - i + m0 + BM - 1
            tl.debug_barrier()
            rp = strip + tgt_start - offs_m + m0 + BLOCK_M - 1
            ok = row_ok & (offs_m < tgt_start)
            tl.store(rp, tl.load(rp, mask=ok, other=0.0) + acc_rows, mask=ok)
    dq = dq * scale
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + (q_start + offs_m)[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))


@triton.jit
def rab_grad_reduce_kernel(PART, STRIPS, OUT, n_programs, strip_max, rab_center, chunk, BLOCK_M: tl.constexpr,
                           BLOCK: tl.constexpr):
    """OUT[c, h, r] = sum over the programs p of head h in chunk c (a fixed order) of their strip
    value at s = r - C + m0_p + BM - 1; the caller adds the chunks (their order fixed too).
    STRIPS: (head-sorted programs, 4) int64 = (start, length, m0, head), then (first, end) per head."""
    pid_r = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2)
    r = pid_r * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = tl.load(STRIPS + 4 * n_programs + 2 * h)
    last = tl.load(STRIPS + 4 * n_programs + 2 * h + 1)
    lo = first + c * chunk
    hi = tl.minimum(lo + chunk, last)
    for p in range(lo, hi):
        start = tl.load(STRIPS + 4 * p)
        length = tl.load(STRIPS + 4 * p + 1)
        m0 = tl.load(STRIPS + 4 * p + 2)
        s = r - rab_center + m0 + BLOCK_M - 1
        ok = (s >= 0) & (s < length)
        acc += tl.load(PART + start + s, mask=ok, other=0.0)
    tl.store(OUT + (c * tl.num_programs(1) + h) * strip_max + r, acc, mask=r < strip_max)

"""Quantization kernels for the quantized precisions (omniattn/quant/quantize.py states the maths).

Two passes over K and V: kv_stats_kernel reduces each sequence's K sum (for K's mean) and V's
per-channel max in chunks of tokens, in parallel over the sequence, kv_stats_finish_kernel
combines the chunks per sequence and head; quant_kv_kernel then writes K
(smoothed, per-group scales) and V (FP8, transposed) in one pass, and quant_q_kernel writes Q with
its scales, the row term q . mean(K) and the smooth-Q tile means. Inputs are only read.
"""

import triton
import triton.language as tl

from .common import FP8_MAX, VT_ALIGN, round_half_even, sequence_bounds, to_fp8, vt_column


@triton.jit
def kv_stats_kernel(
    K, V, KSUM, VMAX, CU_K, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    seqlen_k, n_kv_heads, n_chunks, head_dim, head_dim_v,
    IS_VARLEN: tl.constexpr, HAS_V: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Partial sums of K and maxima of |V| over CHUNK tokens: (sequences, Hkv, chunks, D)."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    start, length = sequence_bounds(CU_K, b, seqlen_k, IS_VARLEN)
    start = start.to(tl.int64)
    b64 = b.to(tl.int64)
    rows = pid_c * CHUNK + tl.arange(0, CHUNK)
    ok = rows < length
    d = tl.arange(0, BLOCK_D)
    out = (pid_bh.to(tl.int64) * n_chunks + pid_c)
    k = tl.load(K + b64 * stride_kb + (start + rows)[:, None] * stride_kt + hk * stride_kh + d[None, :],
                mask=ok[:, None] & (d[None, :] < head_dim), other=0.0)
    tl.store(KSUM + out * BLOCK_D + d, tl.sum(k.to(tl.float32), 0))
    if HAS_V:
        dv = tl.arange(0, BLOCK_DV)
        v = tl.load(V + b64 * stride_vb + (start + rows)[:, None] * stride_vt + hk * stride_vh + dv[None, :],
                    mask=ok[:, None] & (dv[None, :] < head_dim_v), other=0.0)
        tl.store(VMAX + out * BLOCK_DV + dv, tl.max(tl.abs(v.to(tl.float32)), 0))


@triton.jit
def kv_stats_finish_kernel(
    KSUM, VMAX, KM, VM, VS, CU_K, seqlen_k, n_kv_heads, n_chunks, head_dim_v,
    IS_VARLEN: tl.constexpr, HAS_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Per (sequence, kv head), from kv_stats_kernel's chunks: K's mean over the sequence's tokens
    (KM), V's per-channel max |V| (VM) and FP8 scale (VS, (sequences, Hkv, Dv)). One launch where
    PyTorch took six small ones (host time is what a short quantized call waits for)."""
    pid = tl.program_id(0)
    _, length = sequence_bounds(CU_K, pid // n_kv_heads, seqlen_k, IS_VARLEN)
    first = pid.to(tl.int64) * n_chunks
    d = tl.arange(0, BLOCK_D)
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ksum += tl.sum(tl.load(KSUM + (first + c)[:, None] * BLOCK_D + d[None, :], mask=(c < n_chunks)[:, None],
                               other=0.0), 0)
    tl.store(KM + pid.to(tl.int64) * BLOCK_D + d, ksum / tl.maximum(length, 1).to(tl.float32))
    if HAS_V:
        dv = tl.arange(0, BLOCK_DV)
        vmax = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for c0 in range(0, n_chunks, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            vmax = tl.maximum(vmax, tl.max(tl.load(VMAX + (first + c)[:, None] * BLOCK_DV + dv[None, :],
                                                   mask=(c < n_chunks)[:, None], other=0.0), 0))
        tl.store(VM + pid.to(tl.int64) * BLOCK_DV + dv, vmax)
        tl.store(VS + pid.to(tl.int64) * head_dim_v + dv, tl.where(vmax == 0.0, 1.0, vmax / FP8_MAX),
                 mask=dv < head_dim_v)


@triton.jit
def _group_inv_scale(x, rows_ok, LIMIT: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """Per-row (inv, scale) of a [ROWS, D] float32 tile whose rows share a scale in groups of GROUP."""
    amax = tl.max(tl.abs(x), 1)
    amax = tl.where(rows_ok, amax, 0.0)
    if GROUP == ROWS:
        amax = tl.zeros([ROWS], dtype=tl.float32) + tl.max(amax, 0)
    elif GROUP > 1:
        g = tl.max(tl.reshape(amax, [ROWS // GROUP, GROUP]), 1)
        amax = tl.reshape(tl.broadcast_to(g[:, None], [ROWS // GROUP, GROUP]), [ROWS])
    zero = amax == 0.0
    inv = tl.where(zero, 1.0, LIMIT / tl.where(zero, 1.0, amax))
    scale = tl.where(zero, 1.0, amax / LIMIT)
    return inv, scale


@triton.jit
def _store_quantized(ptrs, y, mask, QK_MODE: tl.constexpr, LIMIT: tl.constexpr, EXACT_FP8_ROUNDING: tl.constexpr):
    """Store y (already x * inv) as INT8, FP8, or INT4 packed two per byte (channel d in the low
    nibble, d + D/2 in the high one; D a power of two, so the halves are the tile's halves)."""
    if QK_MODE == 3:
        tl.store(ptrs, to_fp8(y, EXACT_FP8_ROUNDING), mask=mask)
    else:
        r = tl.minimum(tl.maximum(round_half_even(y), -LIMIT), LIMIT).to(tl.int32)
        if QK_MODE == 2:
            lo, hi = tl.split(tl.reshape(r, [r.shape[0], 2, r.shape[1] // 2]).permute(0, 2, 1))
            tl.store(ptrs, ((lo & 0xF) | (hi << 4)).to(tl.int8), mask=mask)
        else:
            tl.store(ptrs, r.to(tl.int8), mask=mask)


@triton.jit
def quant_kv_kernel(
    K, V, KM, VS, KQ, KS, VT, CU_K,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_kqb, stride_kqt, stride_kqh, stride_ksb, stride_kst, stride_ksh, stride_vtb, stride_vth, stride_vtd,
    seqlen_k, n_kv_heads, head_dim, head_dim_v,
    IS_VARLEN: tl.constexpr, QK_MODE: tl.constexpr, LIMIT: tl.constexpr, GROUP: tl.constexpr,
    SMOOTH_K: tl.constexpr, PV_FP8: tl.constexpr, EXACT_FP8_ROUNDING: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """K - mean(K) quantized with per-group scales; V / (per-channel scale) to FP8, transposed."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    start, length = sequence_bounds(CU_K, b, seqlen_k, IS_VARLEN)
    if pid_n * ROWS >= length:
        return
    start = start.to(tl.int64)
    b64 = b.to(tl.int64)
    rows = pid_n * ROWS + tl.arange(0, ROWS)
    ok = rows < length
    d = tl.arange(0, BLOCK_D)
    k = tl.load(K + b64 * stride_kb + (start + rows)[:, None] * stride_kt + hk * stride_kh + d[None, :],
                mask=ok[:, None] & (d[None, :] < head_dim), other=0.0).to(tl.float32)
    if SMOOTH_K:
        k = k - tl.load(KM + pid_bh.to(tl.int64) * BLOCK_D + d)[None, :]
        k = tl.where(ok[:, None] & (d[None, :] < head_dim), k, 0.0)
    inv, scale = _group_inv_scale(k, ok, LIMIT, GROUP, ROWS)
    y = k * inv[:, None]
    if QK_MODE == 2:
        dh = tl.arange(0, BLOCK_D // 2)
        ptrs = KQ + b64 * stride_kqb + (start + rows)[:, None] * stride_kqt + hk * stride_kqh + dh[None, :]
        _store_quantized(ptrs, y, ok[:, None] & (dh[None, :] < head_dim // 2), QK_MODE, LIMIT, EXACT_FP8_ROUNDING)
    else:
        ptrs = KQ + b64 * stride_kqb + (start + rows)[:, None] * stride_kqt + hk * stride_kqh + d[None, :]
        _store_quantized(ptrs, y, ok[:, None] & (d[None, :] < head_dim), QK_MODE, LIMIT, EXACT_FP8_ROUNDING)
    tl.store(KS + b64 * stride_ksb + (start + rows) * stride_kst + hk * stride_ksh, scale, mask=ok)
    if PV_FP8:
        dv = tl.arange(0, BLOCK_DV)
        v = tl.load(V + b64 * stride_vb + (start + rows)[:, None] * stride_vt + hk * stride_vh + dv[None, :],
                    mask=ok[:, None] & (dv[None, :] < head_dim_v), other=0.0).to(tl.float32)
        vmax = tl.load(VS + pid_bh.to(tl.int64) * BLOCK_DV + dv)  # per-channel max |V| of the sequence
        inv_v = tl.where(vmax == 0.0, 1.0, FP8_MAX / tl.where(vmax == 0.0, 1.0, vmax))
        v8 = to_fp8(v * inv_v[None, :], EXACT_FP8_ROUNDING)
        # transposed: (sequence or batch, kv head, channel, token)
        column = vt_column(start, b64, IS_VARLEN) + rows
        vt = VT + b64 * stride_vtb + hk * stride_vth + dv[:, None] * stride_vtd + column[None, :]
        if IS_VARLEN:
            # whole 16-token columns (a sequence owns its columns up to the next multiple of 16, and
            # gets zeros past its end): a mask constant over 16 tokens makes each channel's store
            # one 16-byte vector; a per-token mask made it 16 byte stores, each warp's writing 32
            # rows' partial sectors (1.15 ms for a 32 x 4096 HSTU batch against 0.06 for K)
            tokens_ok = rows // VT_ALIGN * VT_ALIGN < length
        else:  # dense: a channel's row ends at the sequence's end
            tokens_ok = ok
        tl.store(vt, tl.trans(v8), mask=(dv[:, None] < head_dim_v) & tokens_ok[None, :])


@triton.jit
def quant_q_kernel(
    Q, KM, QQ, QS, RB, QM, CU_Q,
    stride_qb, stride_qt, stride_qh, stride_qqb, stride_qqt, stride_qqh, stride_qsb, stride_qst, stride_qsh,
    seqlen_q, n_heads, group, head_dim, n_tiles,
    IS_VARLEN: tl.constexpr, QK_MODE: tl.constexpr, LIMIT: tl.constexpr, GROUP: tl.constexpr,
    SMOOTH_Q: tl.constexpr, ROW_BIAS: tl.constexpr, EXACT_FP8_ROUNDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PACKED_D: tl.constexpr,
):
    """Q (smoothed by its tile mean with SMOOTH_Q) quantized with per-group scales; the row term
    q . mean(K) of its KV head (ROW_BIAS) and the tile means (SMOOTH_Q, kernel layout)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, length = sequence_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
    if pid_m * BLOCK_M >= length:
        return
    start = start.to(tl.int64)
    b64 = b.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < length
    d = tl.arange(0, BLOCK_D)
    valid = ok[:, None] & (d[None, :] < head_dim)
    q = tl.load(Q + b64 * stride_qb + (start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=valid, other=0.0).to(tl.float32)
    s_ptrs = b64 * stride_qsb + (start + rows) * stride_qst + h * stride_qsh
    if ROW_BIAS:
        km = tl.load(KM + (b64 * (n_heads // group) + h // group) * BLOCK_D + d)
        tl.store(RB + s_ptrs, tl.sum(q * km[None, :], 1), mask=ok)
    if SMOOTH_Q:
        qm = tl.sum(q, 0) / tl.sum(ok.to(tl.float32), 0)
        q = tl.where(valid, q - qm[None, :], 0.0)
        base = QM + ((b64 * n_heads + h) * n_tiles + pid_m) * (2 * PACKED_D)
        if QK_MODE == 2:
            lo, hi = tl.split(tl.reshape(qm, [2, BLOCK_D // 2]).permute(1, 0))
            dh = tl.arange(0, BLOCK_D // 2)
            tl.store(base + dh, lo, mask=dh < PACKED_D)
            tl.store(base + PACKED_D + dh, hi, mask=dh < PACKED_D)
        else:
            tl.store(base + d, qm)
    inv, scale = _group_inv_scale(q, ok, LIMIT, GROUP, BLOCK_M)
    y = q * inv[:, None]
    if QK_MODE == 2:
        dh = tl.arange(0, BLOCK_D // 2)
        ptrs = QQ + b64 * stride_qqb + (start + rows)[:, None] * stride_qqt + h * stride_qqh + dh[None, :]
        _store_quantized(ptrs, y, ok[:, None] & (dh[None, :] < head_dim // 2), QK_MODE, LIMIT, EXACT_FP8_ROUNDING)
    else:
        ptrs = QQ + b64 * stride_qqb + (start + rows)[:, None] * stride_qqt + h * stride_qqh + d[None, :]
        _store_quantized(ptrs, y, valid, QK_MODE, LIMIT, EXACT_FP8_ROUNDING)
    tl.store(QS + s_ptrs, scale, mask=ok)

"""In-kernel pieces shared by the forward and backward kernels: masks, score modifiers, tile bounds.

Index tensors ``ii`` (query positions) and ``jj`` (key positions) are passed already shaped for
broadcasting, ``[BM, 1]``/``[1, BN]`` in the forward and dq kernels and ``[1, BM]``/``[BN, 1]`` in
the transposed dk/dv kernel, so one helper serves both orientations.

Masks come in two families (``MASK_KIND``): 0 = the causal / sliding-window rule, bottom-right
aligned (``shift = Lk - Lq``); 1 = HSTU's id rule (targets, contextual prefix, max_attn_len).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LOG2_TO_BUCKET = tl.constexpr(0.6931471805599453 / 0.301)  # log2(x) -> ln(x) / 0.301, HSTU's log buckets

SOFTMAX = tl.constexpr(0)
SIGMOID = tl.constexpr(1)
SILU = tl.constexpr(2)


@triton.jit
def _tanh_approx(x):
    # one MUFU instruction (max relative error ~2^-11): below the rounding of 16-bit P, twice as
    # cheap as exp2 + reciprocal; not available in the interpreter, so FAST_MATH is off there
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def tanh(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        return _tanh_approx(x)
    # 1 - 2 / (e^{2x} + 1): exact limits (+-1) for large |x|, and no libdevice (the interpreter has none)
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def sigmoid(x, FAST_MATH: tl.constexpr, SCALE: tl.constexpr = 1.0):
    """SCALE * sigmoid(x); a constant SCALE costs nothing (it folds into the constants)."""
    if FAST_MATH:  # sigmoid(x) = (1 + tanh(x / 2)) / 2: one MUFU op instead of exp2 and a reciprocal
        return 0.5 * SCALE + (0.5 * SCALE) * _tanh_approx(0.5 * x)
    return SCALE / (1.0 + tl.exp2(-x * LOG2E))


# Quantized Q.K modes (precision): the inputs' dtype, INT8, INT4 packed two per byte, FP8 e4m3.
QK_EXACT = tl.constexpr(0)
QK_INT8 = tl.constexpr(1)
QK_INT4 = tl.constexpr(2)
QK_FP8 = tl.constexpr(3)
FP8_MAX = tl.constexpr(448.0)
LOG2_FP8_MAX = tl.constexpr(8.807354922057604)  # log2(448)
# FP8 V^T of packed sequences: sequence s's tokens start at column (cu_k[s] // VT_ALIGN + s) * VT_ALIGN,
# a 16-byte boundary, so V^T tiles load as 16-byte vectors (from any token offset they load byte by byte)
VT_ALIGN = tl.constexpr(16)


@triton.jit
def wide(offsets, INT64_OFFSETS: tl.constexpr):
    """Token offsets for address arithmetic: 32-bit unless the host saw a sequence whose
    offsets times strides reach 2^31 elements (64-bit everywhere costs registers and spills)."""
    if INT64_OFFSETS:  # one return: Triton rejects returns of different types even under a constexpr
        wide_offsets = offsets.to(tl.int64)
    else:
        wide_offsets = offsets
    return wide_offsets


@triton.jit
def round_half_even(x):
    """rint for |x| < 2^22 in plain float32 adds (no libdevice: the interpreter has none)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def to_fp8(x, EXACT_ROUNDING: tl.constexpr, CLAMP: tl.constexpr = True):
    """float32 -> e4m3 with round-to-nearest-even, saturating at +-448 (CLAMP=False: the caller
    knows |x| <= 448). The GPU's conversion instruction rounds correctly; Triton's interpreter
    does not carry a mantissa overflow into the exponent (7.8 -> 4.0), so there (EXACT_ROUNDING)
    x is first rounded onto the e4m3 grid in float32, after which the conversion is exact."""
    if CLAMP:
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    if EXACT_ROUNDING:
        bits = x.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3: 3 mantissa bits, subnormals below 2^-6
        ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        x = round_half_even(x / ulp) * ulp
    return x.to(tl.float8e4nv)


@triton.jit
def unpack_int4(x):
    """Packed INT4 (low nibble: channel d, high nibble: channel d + D/2) -> two int8 halves."""
    return (x << 4) >> 4, x >> 4


@triton.jit
def hstu_id(p, contextual, max_id, HAS_CONTEXT: tl.constexpr):
    """HSTU id of position p: contextual tokens share id 0, targets share max_id."""
    if HAS_CONTEXT:
        x = tl.maximum(p - contextual + 1, 0)
    else:
        x = p
    return tl.minimum(x, max_id)


@triton.jit
def first_pos_with_id(x, contextual, HAS_CONTEXT: tl.constexpr):
    """Smallest position whose (unclamped) HSTU id is >= x."""
    if HAS_CONTEXT:
        p = x + contextual - 1
    else:
        p = x
    return tl.where(x <= 0, 0, p)


@triton.jit
def allowed(
    ii, jj, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
):
    """Boolean tile: key jj visible from query ii (also False outside both sequences)."""
    ok = (jj < lk) & (ii < lq)
    if MASK_KIND == 0:
        if HAS_LEFT:
            ok = ok & (jj >= ii + shift - left)
        if HAS_RIGHT:
            ok = ok & (jj <= ii + shift + right)
    else:
        id_i = hstu_id(ii, contextual, max_id, HAS_CONTEXT)
        id_j = hstu_id(jj, contextual, max_id, HAS_CONTEXT)
        d = id_i - id_j
        if not HSTU_CAUSAL:
            d = tl.abs(d)
        rule = (ii == jj) | (d > 0)
        if HAS_MAX_ATTN:
            rule = rule & (d <= max_attn_len)
        if HAS_CONTEXT:
            rule = rule | ((id_i == 0) & (id_j < max_id))
        ok = ok & rule
    return ok


@triton.jit
def approx_log2(x, GPU_ASM: tl.constexpr):
    """log2(x), approximate (MUFU.LG2 on a GPU): only ever an estimate that time_bucket corrects."""
    if GPU_ASM:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def time_bucket(dt, edges, num_buckets, BUCKET_LOG: tl.constexpr, GPU_GATHER: tl.constexpr):
    """HSTU's time bucket of |dt| (int64, any shape), exactly as the reference's float32 maths.

    A one-instruction estimate of ln(x)/0.301 (or sqrt(x)) is within 1e-4 of the reference's value,
    so its nearest integer c is the one bucket edge the pair can be near: the bucket is c, or c - 1
    when x lies below the edge. ``edges[c]`` (hstu.relative_bias.bucket_edges) is the smallest
    float32 x whose reference bucket is >= c, -inf / +inf at 0 / num_buckets + 1: one comparison
    replaces the exact log, a division and the clamps (about 25 instructions per pair)."""
    x = tl.maximum(tl.abs(dt.to(tl.float32)), 1.0)
    if BUCKET_LOG:
        estimate = approx_log2(x, GPU_GATHER) * LOG2_TO_BUCKET
    else:
        estimate = tl.sqrt(x)
    edge = tl.minimum(estimate + 0.5, num_buckets + 1.0).to(tl.int32)  # clamped before the conversion
    return edge - (x < gather_f32(edges + edge, GPU_GATHER)).to(tl.int32)


@triton.jit
def time_span(t_rows, t_cols, rows_ok, cols_ok):
    """Smallest and largest |t_row - t_col| of a tile, from its row and column vectors (int64)."""
    big = 1 << 62
    r_min = tl.min(tl.where(rows_ok, t_rows, big), 0)
    r_max = tl.max(tl.where(rows_ok, t_rows, -big), 0)
    c_min = tl.min(tl.where(cols_ok, t_cols, big), 0)
    c_max = tl.max(tl.where(cols_ok, t_cols, -big), 0)
    hi = tl.maximum(r_max - c_min, c_max - r_min)
    lo = tl.maximum(tl.maximum(r_min - c_max, c_min - r_max), 0)
    return lo, hi


@triton.jit
def tile_gaps(t_rows, t_cols, ROWS_FIRST: tl.constexpr):
    """t_row - t_col of every pair of the tile (int64); ``ROWS_FIRST``: t_rows indexes axis 0."""
    if ROWS_FIRST:
        dt = t_rows[:, None] - t_cols[None, :]
    else:
        dt = t_rows[None, :] - t_cols[:, None]
    return dt


@triton.jit
def time_bucket_range(t_rows, t_cols, rows_ok, cols_ok, edges, num_buckets, BUCKET_LOG: tl.constexpr):
    """[b_lo, b_hi]: the time buckets a tile's pairs lie in, from its row and column timestamps.
    Log-spaced buckets make it narrow away from the diagonal, so the backward's per-bucket sums
    loop over few buckets there. (Two scalars: plain loads, the inline-PTX gather takes tensors.)"""
    lo, hi = time_span(t_rows, t_cols, rows_ok, cols_ok)
    return (time_bucket(lo, edges, num_buckets, BUCKET_LOG, False),
            time_bucket(hi, edges, num_buckets, BUCKET_LOG, False))


@triton.jit
def gather_f32(ptrs, GPU_GATHER: tl.constexpr):
    """Per-element float32 loads from a small table (every pointer in bounds). On a GPU, one plain
    cached load each, as inline PTX: the software pipeliner turns a ``tl.load`` in the key loop into
    4-byte cp.async copies through shared memory, which made the biased HSTU forward 3x slower
    (benchmarks/NOTES.md). The interpreter has no PTX: ``tl.load`` there."""
    if GPU_GATHER:
        w = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptrs], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        w = tl.load(ptrs)
    return w


@triton.jit
def rab_tile(
    ii, jj, lq, lk, t_rows, t_cols, pos_w, ts_w, edges, rab_center, num_buckets, tgt_start,
    ROWS_FIRST: tl.constexpr, HAS_TARGETS: tl.constexpr, BUCKET_LOG: tl.constexpr, GPU_GATHER: tl.constexpr,
):
    """HSTU's relative bias of a tile: pos_w[C + p(j) - p(i)] + ts_w[bucket] (DESIGN.md), with
    p(x) = min(x, targets' start) (targets share one position, as they share one id).

    Positions are clamped per row and per column into the sequence (sequences are no longer than
    the table's M = C + 1, so every pair then indexes inside it: no per-pair clamp), and the row
    part of the address is formed once per row: a pair costs one add and one plain load. Pairs
    outside the sequence get some in-table weight; the callers mask them."""
    pi = tl.minimum(ii, lq - 1)
    pj = tl.minimum(jj, lk - 1)
    if HAS_TARGETS:
        pi = tl.minimum(pi, tgt_start)
        pj = tl.minimum(pj, tgt_start)
    pos = gather_f32((pos_w + rab_center - pi) + pj, GPU_GATHER)
    bucket = time_bucket(tile_gaps(t_rows, t_cols, ROWS_FIRST), edges, num_buckets, BUCKET_LOG, GPU_GATHER)
    return pos + gather_f32(ts_w + bucket, GPU_GATHER), bucket


@triton.jit
def table_rows(q_start, b64, seqlen_q, offs_m, lq, stride_row, IS_VARLEN: tl.constexpr):
    """Offsets of query rows ``offs_m`` in a (query rows, keys) table of the call (rab_cache): the
    sequence's first row is its packed start (varlen) or b * seqlen_q. Rows past the sequence
    read its last row (unmasked tiles load them; they are never used)."""
    row0 = q_start if IS_VARLEN else b64 * seqlen_q
    return (row0 + tl.minimum(offs_m, lq - 1)) * stride_row


@triton.jit
def fmix32(x):
    """MurmurHash3's 32-bit finaliser (uint32, wrapping): the dropout hash of DESIGN.md."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def dropout_row_hash(seed, b, h, n_heads, ii):
    """Per-row part of the dropout hash (DESIGN.md): fmix32(base ^ (i * 0x85EBCA77))."""
    bh = (b * n_heads + h + 1).to(tl.uint32)
    base = fmix32(seed.to(tl.uint32) + bh * 0x9E3779B9)
    return fmix32(base ^ (ii.to(tl.uint32) * 0x85EBCA77))


@triton.jit
def dropout_keep(row_hash, jj, threshold):
    """True where the pair is kept: fmix32(row + j * 0xC2B2AE3D) >= threshold."""
    return fmix32(row_hash + jj.to(tl.uint32) * 0xC2B2AE3D) >= threshold.to(tl.uint32)


@triton.jit
def modify_scores(
    s, ii, jj, shift, slope, softcap, rab, mask_ptrs, valid,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_RAB: tl.constexpr, HAS_ATTN_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """s = scale*q.k -> softcap, then ALiBi, then the relative bias (given as ``rab``), then a float
    attention mask (DESIGN.md's order). Returns the new scores, tanh(s/softcap) (the softcap
    gradient needs it; 0 without softcap) and the allowed tile of a boolean mask (True without one)."""
    t = s * 0.0
    ok = valid | True
    if HAS_SOFTCAP:
        t = tanh(s / softcap, FAST_MATH)
        s = softcap * t
    if HAS_ALIBI:
        s = s - slope * tl.abs(ii + shift - jj).to(tl.float32)
    if HAS_RAB:
        s = s + rab
    if HAS_ATTN_MASK:
        m = tl.load(mask_ptrs, mask=valid, other=0)
        if MASK_IS_BOOL:
            ok = m != 0
        else:
            m = m.to(tl.float32)
            ok = m != float("-inf")
            s = s + tl.where(ok, m, 0.0)
    return s, t, ok


@triton.jit
def sequence_bounds(CU, b, dense_len, IS_VARLEN: tl.constexpr):
    """(start, length) of sequence b in the packed token dimension (start 0 for dense inputs)."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = b * 0
        length = dense_len
    return start, length


@triton.jit
def vt_column(start, seq, IS_VARLEN: tl.constexpr):
    """First FP8 V^T column of sequence ``seq``'s keys (``start``: its first packed token; dense: 0)."""
    if IS_VARLEN:
        column = tl.multiple_of((start // VT_ALIGN + seq) * VT_ALIGN, VT_ALIGN)
    else:
        column = start
    return column


@triton.jit
def tile_program(CU_Q, CU_K, TILES, seqlen_q, seqlen_k, n_heads, REVERSE: tl.constexpr,
                 IS_VARLEN: tl.constexpr, TILE_LIST: tl.constexpr):
    """Who a program of a tiled grid is: its tile, batch entry, head and the two sequences.

    The forward / dQ grids tile queries over query heads, the dK/dV grid tiles keys over KV heads
    (n_heads is whichever the grid runs over). Without a tile list the grid is (tiles, batch x
    heads); REVERSE (causal-like masks): later query tiles see more keys, so they are launched
    first. With TILE_LIST the grid is 1-D and TILES holds the real programs of a varlen batch as
    (sequence, head, tile) triples (schedule.tile_list): no program is spent on padding."""
    if TILE_LIST:
        entry = TILES + 3 * tl.program_id(0)
        b = tl.load(entry)
        h = tl.load(entry + 1)
        pid = tl.load(entry + 2)
    else:
        pid = tl.program_id(0)
        if REVERSE:
            pid = tl.num_programs(0) - 1 - pid
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
    q_start, lq = sequence_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
    k_start, lk = sequence_bounds(CU_K, b, seqlen_k, IS_VARLEN)
    return pid, b, h, q_start.to(tl.int64), lq, k_start.to(tl.int64), lk


@triton.jit
def online_softmax_tile(s2, m_i, l_i, acc, MAY_BE_EMPTY: tl.constexpr, P_LOG2_SCALE: tl.constexpr = 0.0):
    """One key tile of the online softmax in base 2: the tile's P against the new running max, with
    the running sum and the accumulator rescaled to it. MAY_BE_EMPTY: masks can leave a row with
    nothing allowed yet (max -inf); it subtracts 0 instead, so exp2 gives 0 rather than NaN.
    P_LOG2_SCALE: P (and so the running sum) comes out times 2^P_LOG2_SCALE at no cost (FP8 P.V
    wants P in e4m3's range)."""
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s2 - (m_use - P_LOG2_SCALE)[:, None])
    alpha = tl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def sequence_constants(
    NUM_TARGETS, b, lq, lk, contextual, sigmoid_bias,
    MASK_KIND: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_TARGETS: tl.constexpr, DEFAULT_SIG_BIAS: tl.constexpr,
):
    """Per-sequence scalars: HSTU's max_id, the first target's position (where the relative bias
    puts every target) and the sigmoid bias (-ln Lk by default)."""
    max_id = lq
    tgt_start = lq
    if MASK_KIND == 1:
        if HAS_CONTEXT:
            max_id = lq - contextual + 1
        if HAS_TARGETS:
            n_targets = tl.load(NUM_TARGETS + b)
            max_id = max_id - n_targets
            tgt_start = lq - n_targets
    sig_bias = sigmoid_bias
    if DEFAULT_SIG_BIAS:
        sig_bias = -tl.log(tl.maximum(lk, 1).to(tl.float32))
    return max_id, tgt_start, sig_bias


@triton.jit
def load_timestamps(ptrs, ok, GPU_GATHER: tl.constexpr):
    """Timestamps where ``ok``, else 0. On a GPU, int64 ones by inline PTX (a predicated plain
    load per element): a tl.load inside the key loop is software-pipelined into a cp.async of
    every element each thread holds, through shared memory, and the score layout holds each key
    in many threads (a 128x64 forward tile: 64 copies per thread for 64 timestamps; measured
    benchmarks/NOTES.md, session 14). Other dtypes: tl.load."""
    if GPU_GATHER and ptrs.dtype.element_ty == tl.int64:
        t = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; mov.b64 $0, 0; @p ld.global.nc.b64 $0, [$1]; }", "=l,l,r",
            [ptrs, ok.to(tl.int32)], dtype=tl.int64, is_pure=True, pack=1)
    elif GPU_GATHER and ptrs.dtype.element_ty == tl.int32:  # (launch's 32-bit offsets of int64 timestamps)
        t = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; mov.b32 $0, 0; @p ld.global.nc.b32 $0, [$1]; }", "=r,l,r",
            [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1)
    else:
        t = tl.load(ptrs, mask=ok, other=0)
    return t


@triton.jit
def next_timestamps(ts_base, offs, lq, GPU_GATHER: tl.constexpr):
    """t_next of each position: the next token's timestamp, the last token's own."""
    return load_timestamps(ts_base + tl.minimum(offs + 1, lq - 1), offs < lq, GPU_GATHER)


@triton.jit
def key_range(
    m0, m_last, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
):
    """Keys query rows m0..m_last may see, [lo, hi), and the part [full_lo, full_hi) every one of
    those rows sees entirely (no mask needed there). Tiles outside [lo, hi) are never visited."""
    if MASK_KIND == 0:
        lo = m0 * 0
        hi = lk
        full_lo = lo
        full_hi = hi
        if HAS_LEFT:
            lo = tl.maximum(m0 + shift - left, 0)
            full_lo = tl.maximum(m_last + shift - left, 0)
        if HAS_RIGHT:
            hi = tl.minimum(m_last + shift + right + 1, lk)
            full_hi = tl.minimum(m0 + shift + right + 1, lk)
    else:
        id0 = hstu_id(m0, contextual, max_id, HAS_CONTEXT)
        id_last = hstu_id(m_last, contextual, max_id, HAS_CONTEXT)
        lo = m0 * 0
        full_lo = lo
        if HAS_MAX_ATTN:
            lo = first_pos_with_id(id0 - max_attn_len, contextual, HAS_CONTEXT)
            full_lo = first_pos_with_id(id_last - max_attn_len, contextual, HAS_CONTEXT)
        if HSTU_CAUSAL:
            hi = m_last + 1
            full_hi = tl.minimum(first_pos_with_id(id0, contextual, HAS_CONTEXT), hi)
        else:
            hi = lk
            if HAS_MAX_ATTN:
                hi = tl.where(id_last + max_attn_len < max_id,
                              first_pos_with_id(id_last + max_attn_len + 1, contextual, HAS_CONTEXT), lk)
            full_hi = lo  # non-causal HSTU: every tile masked
        if HAS_CONTEXT:  # contextual rows (id 0) see every non-target key
            ctx = id0 == 0
            lo = tl.where(ctx, 0, lo)
            hi = tl.where(ctx, lk, hi)
            full_hi = tl.where(ctx, 0, full_hi)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), lk)
    return lo, hi, full_lo, full_hi


@triton.jit
def query_range(
    n0, n_last, lq, lk, shift, left, right, contextual, max_id, max_attn_len,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HSTU_CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
):
    """The transpose of key_range: query rows that may see keys n0..n_last, [lo, hi), and the
    rows [full_lo, full_hi) that see all of them. With a contextual prefix, rows [0, ctx_hi) also
    see the keys (they are visited separately, masked)."""
    ctx_hi = n0 * 0
    if MASK_KIND == 0:
        lo = n0 * 0
        hi = lq
        full_lo = lo
        full_hi = hi
        if HAS_RIGHT:  # j <= i + shift + right  <=>  i >= j - shift - right
            lo = tl.maximum(n0 - shift - right, 0)
            full_lo = tl.maximum(n_last - shift - right, 0)
        if HAS_LEFT:  # j >= i + shift - left  <=>  i <= j - shift + left
            hi = tl.minimum(n_last - shift + left + 1, lq)
            full_hi = tl.minimum(n0 - shift + left + 1, lq)
        full_hi = tl.where(n_last < lk, full_hi, full_lo)  # a key tile past the sequence end is masked
    else:
        id0 = hstu_id(n0, contextual, max_id, HAS_CONTEXT)
        id_last = hstu_id(n_last, contextual, max_id, HAS_CONTEXT)
        hi = lq
        if HAS_MAX_ATTN:
            hi = tl.where(id_last + max_attn_len < max_id,
                          first_pos_with_id(id_last + max_attn_len + 1, contextual, HAS_CONTEXT), lq)
        if HSTU_CAUSAL:
            lo = n0
            # rows whose id exceeds every key id (d > 0), within max_attn_len of the first key
            full_lo = tl.maximum(first_pos_with_id(id_last + 1, contextual, HAS_CONTEXT), lo)
            full_hi = hi
            if HAS_MAX_ATTN:
                full_hi = tl.where(id0 + max_attn_len < max_id,
                                   first_pos_with_id(id0 + max_attn_len + 1, contextual, HAS_CONTEXT), lq)
            full_hi = tl.where((id_last < max_id) & (n_last < lk), tl.minimum(full_hi, hi), full_lo)
        else:
            lo = n0 * 0
            if HAS_MAX_ATTN:
                lo = first_pos_with_id(id0 - max_attn_len, contextual, HAS_CONTEXT)
            full_lo = lo
            full_hi = lo
        if HAS_CONTEXT:
            ctx_hi = tl.minimum(contextual, lo)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), lq)
    return lo, hi, full_lo, full_hi, ctx_hi


@triton.jit
def split_range(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split [lo, hi) into tiles of BLOCK aligned to multiples of BLOCK: a masked head [start, mid_lo),
    an unmasked middle [mid_lo, mid_hi) and a masked tail [mid_hi, hi)."""
    start = (lo // BLOCK) * BLOCK
    mid_lo = tl.cdiv(full_lo, BLOCK) * BLOCK
    mid_hi = (full_hi // BLOCK) * BLOCK
    empty = (mid_hi <= mid_lo) | (mid_lo < start)
    mid_lo = tl.where(empty, start, mid_lo)
    mid_hi = tl.where(empty, start, mid_hi)
    return start, mid_lo, mid_hi

"""Hopper (sm_90) backward in Gluon: one pass over the query tiles per key tile, five products.

The template's backward (bwd.py) runs dK/dV and dQ as two kernels, seven matrix products per
(query tile, key tile) pair, at 255 registers and 12.5% occupancy (benchmarks/NOTES.md). Here one
program owns BLOCK_N keys of one (sequence, key/value head) and walks the query tiles of every
query head of its group once, FlashAttention-2/3's schedule:

    S^T  = K Q^T          dP^T = V dO^T          (keys as rows: the accumulators stay in registers)
    P^T, dS^T from S^T and dP^T (the score function's derivative)
    dV  += P^T dO         dK  += dS^T Q          (P^T and dS^T from registers)
    dQ  += dS K           (dS^T through shared memory; added by TMA reductions into a float32
                           buffer the caller scales and casts: the one sum that crosses programs)

in three partitions: a producer warp loads K and V once, then Q and dO tile by tile by TMA into a
ring of STAGES buffers (softmax: with the rows' lse and delta, which the consumers read from shared
memory after the products they need: ptxas spilled in the loop when each thread held them across
the wait, 63 local loads and stores per tile); two consumer warpgroups own 64 keys each (their S^T, dP^T, dK and dV) and
share the dQ product, each taking half of the head dim, after both have written their half of
dS^T. The reductions make dQ's float32 sums' order vary from run to run: under
torch.use_deterministic_algorithms(True) the backward takes the template (bwd.py), whose reductions
are fixed.

Score functions, masks (windows, causal included, and HSTU's), GQA, dense and packed sequences
are compile-time branches, with the template's helpers for the masks and tile ranges; anything
else (softcap, ALiBi, the relative bias, attention masks, dropout, float32) takes the template
(launch.sm90_backward_ok). The maths is DESIGN.md's, as bwd.py computes it.
"""

import functools

import torch
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from .common import _tanh_approx as _tanh
from .common import allowed, query_range, sequence_bounds, sequence_constants
from .fwd_sm90 import LOG2E, SIGMOID, SOFTMAX, _barrier, _rows, _tma_load

if hasattr(tma, "async_atomic_add"):  # Triton 3.7+
    _tma_add = tma.async_atomic_add
else:  # 3.6 (the H100 machine's) builds the same operation without a Python wrapper

    @builtin
    def _tma_add(tensor_desc, coord, src, _semantic=None):
        """Add a shared-memory tile into global memory by TMA (cp.reduce.async.bulk.tensor)."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)


MAXNREG = 168  # as the forward: 12 warps, the consumers then take 240 registers, the producer 32
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(32)


@gluon.jit
def _query_tiles(part, ctx_end, start, hi):
    """Query rows [lo, hi) of part 0 (the contextual rows before the range, masked) or 1 (the range)."""
    if part == 0:
        return 0, ctx_end
    return start, hi


@gluon.jit
def _producer(Q, DO, K, V, LSE, DELTA, stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
              stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_lb, stride_lh,
              b, hk, group, q_start, lq, k_start, lk, n0, head_dim, ctx_end, start, hi,
              q_smem, do_smem, k_smem, v_smem, rows_smem, kv_bar, q_full, q_empty, SCORE: gl.constexpr,
              HAS_CONTEXT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, Q_LAYOUT: gl.constexpr, KV_LAYOUT: gl.constexpr):
    """One warp: K and V of the program's key tile, then Q and dO of every query tile of every
    query head of the group, each ring buffer as soon as both warpgroups have released it. Softmax:
    with each tile its rows' lse (times log2(e)) and delta, stored to rows_smem by this warp before
    the tile's barrier is armed (its arrive publishes them): loaded by the consumers after their
    products, they held 32 registers across the products' wait and ptxas spilled in the loop."""
    ROW_LAYOUT: gl.constexpr = gl.BlockedLayout([2], [32], [1], [0])
    b64 = b.to(gl.int64)
    k_desc = _rows(K + b64 * stride_kb + k_start.to(gl.int64) * stride_kt + hk * stride_kh, lk, head_dim,
                   stride_kt, BLOCK_N, HEAD_DIM, KV_LAYOUT)
    v_desc = _rows(V + b64 * stride_vb + k_start.to(gl.int64) * stride_vt + hk * stride_vh, lk, head_dim,
                   stride_vt, BLOCK_N, HEAD_DIM, KV_LAYOUT)
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    _tma_load(k_desc, [n0, 0], kv_bar, k_smem)
    _tma_load(v_desc, [n0, 0], kv_bar, v_smem)
    i = 0  # query tiles loaded so far (ring position and phase)
    for g in range(group):
        h = hk * group + g
        row_off = b64 * stride_lb + h * stride_lh + q_start  # lse and delta share the layout
        if i > 0:  # the descriptors below overwrite the previous head's: its last loads must have landed
            mbarrier.wait(q_full.index((i - 1) % STAGES), ((i - 1) // STAGES) & 1)
        q_desc = _rows(Q + b64 * stride_qb + q_start.to(gl.int64) * stride_qt + h * stride_qh, lq, head_dim,
                       stride_qt, BLOCK_M, HEAD_DIM, Q_LAYOUT)
        do_desc = _rows(DO + b64 * stride_dob + q_start.to(gl.int64) * stride_dot + h * stride_doh, lq, head_dim,
                        stride_dot, BLOCK_M, HEAD_DIM, Q_LAYOUT)
        for part in gl.static_range(2):
            if part == 1 or HAS_CONTEXT:
                lo_p, hi_p = _query_tiles(part, ctx_end, start, hi)
                for m in range(lo_p, hi_p, BLOCK_M):
                    stage = i % STAGES
                    mbarrier.wait(q_empty.index(stage), ((i // STAGES) & 1) ^ 1)
                    if SCORE == SOFTMAX:  # (every lane's stores ordered before the one lane's arrive below)
                        q_idx = m + gl.arange(0, BLOCK_M, layout=ROW_LAYOUT)
                        ok = q_idx < lq
                        rows_smem.index(2 * stage).store(
                            gl.load(LSE + row_off + q_idx, mask=ok, other=0.0) * LOG2E)
                        rows_smem.index(2 * stage + 1).store(gl.load(DELTA + row_off + q_idx, mask=ok, other=0.0))
                        _barrier()
                    mbarrier.expect(q_full.index(stage), 2 * q_desc.block_type.nbytes)
                    _tma_load(q_desc, [m, 0], q_full.index(stage), q_smem.index(stage))
                    _tma_load(do_desc, [m, 0], q_full.index(stage), do_smem.index(stage))
                    i += 1


@gluon.jit
def _consumer(args, WG: gl.constexpr, SCORE: gl.constexpr, MASK_KIND: gl.constexpr, HAS_LEFT: gl.constexpr,
              HAS_RIGHT: gl.constexpr, HSTU_CAUSAL: gl.constexpr, HAS_CONTEXT: gl.constexpr,
              HAS_MAX_ATTN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr):
    """One warpgroup: keys n0 + WG * 64 .. + 64 of the program's tile; their dK and dV in
    registers over every query tile, and half of each tile's dQ (channels WG * HEAD_DIM / 2 ..)."""
    (DQA, DK, DV, stride_qab, stride_qat, stride_qah, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt,
     stride_dvh, b, hk, group, q_start, lq, k_start, lk, n0, head_dim, ctx_end, start, hi, full_lo, full_hi, shift,
     left, right, contextual, max_id, max_attn_len, scale, sig_bias, silu_scale, q_smem, do_smem, k_smem, v_smem,
     ds_smem, rows_smem, kv_bar, q_full, q_empty, ds_ready, ds_free, dq_smem) = args
    dq_buf = dq_smem.index(WG)
    DQ_LAYOUT: gl.constexpr = dq_smem.layout
    HALF_N: gl.constexpr = BLOCK_N // 2
    HALF_D: gl.constexpr = HEAD_DIM // 2
    dtype: gl.constexpr = q_smem.dtype
    # accumulators of one warpgroup (4 warps along the rows)
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    KV_ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, HEAD_DIM, 16])
    DQ_ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, HALF_D, 16])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=KV_ACC, k_width=2)
    k_w = k_smem.slice(WG * HALF_N, HALF_N, dim=0)
    v_w = v_smem.slice(WG * HALF_N, HALF_N, dim=0)
    k_d = k_smem.slice(WG * HALF_D, HALF_D, dim=1)  # dQ's channels of this warpgroup, every key
    s_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, S_LAYOUT)
    dq_zero = gl.zeros([BLOCK_M, HALF_D], gl.float32, DQ_ACC)
    dk = gl.zeros([HALF_N, HEAD_DIM], gl.float32, KV_ACC)
    dv = gl.zeros([HALF_N, HEAD_DIM], gl.float32, KV_ACC)
    keys = n0 + WG * HALF_N + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, S_LAYOUT))
    jj = gl.expand_dims(keys, 1)
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, S_LAYOUT))
    c = scale
    if SCORE == SOFTMAX:
        c = scale * LOG2E
    mask = (lq, lk, shift, left, right, contextual, max_id, max_attn_len)
    b64 = b.to(gl.int64)
    mbarrier.wait(kv_bar, 0)
    i = 0
    for g in range(group):
        h = hk * group + g
        tma.store_wait(0)  # the descriptor below overwrites the previous head's, still in use until then
        dq_desc = _rows(DQA + b64 * stride_qab + h * stride_qah + q_start.to(gl.int64) * stride_qat, lq, head_dim,
                        stride_qat, BLOCK_M, HALF_D, DQ_LAYOUT)
        for part in gl.static_range(2):
            if part == 1 or HAS_CONTEXT:
                lo_p, hi_p = _query_tiles(part, ctx_end, start, hi)
                for m in range(lo_p, hi_p, BLOCK_M):
                    stage = i % STAGES
                    qs = q_smem.index(stage)
                    dos = do_smem.index(stage)
                    mbarrier.wait(q_full.index(stage), (i // STAGES) & 1)
                    s = warpgroup_mma(k_w, qs.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    dp = warpgroup_mma(v_w, dos.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    q_idx = m + cols
                    s = warpgroup_mma_wait(1, deps=(s, ))
                    if SCORE == SOFTMAX:  # (lse times log2(e), staged by the producer)
                        lse = rows_smem.index(2 * stage).load(gl.SliceLayout(0, S_LAYOUT))
                        p = gl.exp2(s * c - gl.expand_dims(lse, 0))
                    else:
                        hx = s * (0.5 * c)  # sigmoid(x) = (1 + tanh(x / 2)) / 2, as the forward
                        if SCORE == SIGMOID:
                            p = 0.5 * _tanh(hx + 0.5 * sig_bias) + 0.5
                        else:  # with t = tanh(x / 2), n = silu_scale: P = n x sigmoid(x) = u + u t
                            # (u = n x / 2) and dP/dx = n sigmoid(x) + P (1 - sigmoid(x)), taken before
                            # dP^T's wait: four FMAs and two multiplies a score, two tiles live across it
                            t = _tanh(hx)
                            u = hx * silu_scale
                            p = u * t + u
                            n_sig = t * (0.5 * silu_scale) + 0.5 * silu_scale
                            dsilu = p * (0.5 - 0.5 * t) + n_sig
                    dp = warpgroup_mma_wait(0, deps=(dp, ))
                    if SCORE == SOFTMAX:
                        delta = rows_smem.index(2 * stage + 1).load(gl.SliceLayout(0, S_LAYOUT))
                        ds = p * (dp - gl.expand_dims(delta, 0))
                    elif SCORE == SIGMOID:
                        ds = dp * (p - p * p)
                    else:
                        ds = dp * dsilu
                    if (part == 0) | (m < full_lo) | (m + BLOCK_M > full_hi):  # a tile the mask cuts
                        ok = allowed(gl.expand_dims(q_idx, 0), jj, *mask, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT,
                                     HAS_RIGHT=HAS_RIGHT, HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT,
                                     HAS_MAX_ATTN=HAS_MAX_ATTN)
                        p = gl.where(ok, p, 0.0)
                        ds = gl.where(ok, ds, 0.0)
                    p_op = gl.convert_layout(p.to(dtype), A_LAYOUT)
                    dv = warpgroup_mma(p_op, dos, dv, is_async=True)
                    ds16 = ds.to(dtype)
                    ds_op = gl.convert_layout(ds16, A_LAYOUT)
                    dk = warpgroup_mma(ds_op, qs, dk, is_async=True)
                    # dS^T through shared memory for dQ = dS K, both warpgroups' halves
                    buf = i % 2
                    mbarrier.wait(ds_free.index(buf), ((i // 2) & 1) ^ 1)
                    ds_smem.index(buf).slice(WG * HALF_N, HALF_N, dim=0).store(ds16)
                    fence_async_shared()
                    mbarrier.arrive(ds_ready.index(buf), count=1)
                    mbarrier.wait(ds_ready.index(buf), (i // 2) & 1)
                    dq = warpgroup_mma(ds_smem.index(buf).permute((1, 0)), k_d, dq_zero, use_acc=False, is_async=True)
                    dq, dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dq, dv, dk, p_op, ds_op))
                    mbarrier.arrive(q_empty.index(stage), count=1)
                    mbarrier.arrive(ds_free.index(buf), count=1)
                    # dQ leaves by a TMA reduction (float32 adds in L2, whole tiles): per-element
                    # atomics from registers measured 2.2x slower for the whole backward
                    tma.store_wait(0)  # the previous tile's reduction has read the buffer
                    dq_buf.store(dq)
                    fence_async_shared()
                    _tma_add(dq_desc, [m, WG * HALF_D], dq_buf)
                    i += 1
    tma.store_wait(0)
    # dK, dV of this warpgroup's keys; dK takes the score's scale (dS is d loss / d (scale q.k))
    kv_rows = n0 + WG * HALF_N + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, KV_ACC))
    kv_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, KV_ACC))
    ok = gl.expand_dims(kv_rows < lk, 1) & gl.expand_dims(kv_cols < head_dim, 0)
    rows64 = gl.expand_dims((k_start + kv_rows).to(gl.int64), 1)
    gl.store(DK + b64 * stride_dkb + hk * stride_dkh + rows64 * stride_dkt + gl.expand_dims(kv_cols, 0),
             (dk * scale).to(dtype), mask=ok)
    gl.store(DV + b64 * stride_dvb + hk * stride_dvh + rows64 * stride_dvt + gl.expand_dims(kv_cols, 0),
             dv.to(dtype), mask=ok)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "contextual", "max_attn_len",
                              "n_seqs"])
def attn_bwd_sm90_kernel(
    Q, K, V, DO, LSE, DELTA, DQA, DK, DV, CU_Q, CU_K, NUM_TARGETS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_qab, stride_qat, stride_qah, stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_seqs, n_kv_heads, group, head_dim, scale, sigmoid_bias, silu_scale, window_left,
    window_right, contextual, max_attn_len,
    SCORE: gl.constexpr, MASK_KIND: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
    HSTU_CAUSAL: gl.constexpr, HAS_TARGETS: gl.constexpr, HAS_CONTEXT: gl.constexpr, HAS_MAX_ATTN: gl.constexpr,
    IS_VARLEN: gl.constexpr, DEFAULT_SIG_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, Q_LAYOUT: gl.constexpr, KV_LAYOUT: gl.constexpr,
    DS_LAYOUT: gl.constexpr, DQ_LAYOUT: gl.constexpr,
):
    """One program per (key tile, sequence, key/value head)."""
    n_n = gl.cdiv(seqlen_k, BLOCK_N)
    # the key tiles of one (sequence, head) run together, sharing its Q and dO in L2 (all heads'
    # first key tiles first measured 1.15-1.8x slower, causal or not: every program streamed its own)
    pid = gl.program_id(0)
    pid_n = pid % n_n
    bh = pid // n_n
    b = bh // n_kv_heads
    hk = bh % n_kv_heads
    q_start, lq = sequence_bounds(CU_Q, b, seqlen_q, IS_VARLEN=IS_VARLEN)
    k_start, lk = sequence_bounds(CU_K, b, seqlen_k, IS_VARLEN=IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 < lk:
        shift = lk - lq
        max_id, _, sig_bias = sequence_constants(NUM_TARGETS, b, lq, lk, contextual, sigmoid_bias,
                                                 MASK_KIND=MASK_KIND, HAS_CONTEXT=HAS_CONTEXT,
                                                 HAS_TARGETS=HAS_TARGETS, DEFAULT_SIG_BIAS=DEFAULT_SIG_BIAS)
        lo, hi, full_lo, full_hi, ctx_hi = query_range(
            n0, gl.minimum(n0 + BLOCK_N, lk) - 1, lq, lk, shift, window_left, window_right, contextual, max_id,
            max_attn_len, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, HSTU_CAUSAL=HSTU_CAUSAL,
            HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN)
        start = (lo // BLOCK_M) * BLOCK_M
        hi = gl.maximum(hi, start)
        ctx_end = gl.minimum(ctx_hi, start)

        dtype: gl.constexpr = Q.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], Q_LAYOUT)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], Q_LAYOUT)
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], KV_LAYOUT)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], KV_LAYOUT)
        ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], DS_LAYOUT)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, HEAD_DIM // 2], DQ_LAYOUT)
        # softmax's lse and delta of each ring buffer's query rows, rows 2 * stage and 2 * stage + 1
        # (unused otherwise; 8: a shape's dimensions must be powers of two)
        gl.static_assert(STAGES <= 4)
        rows_smem = gl.allocate_shared_memory(gl.float32, [8, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(q_full.index(s), count=1)
            mbarrier.init(q_empty.index(s), count=2)  # released by both consumer warpgroups
        for s in gl.static_range(2):
            mbarrier.init(ds_ready.index(s), count=2)
            mbarrier.init(ds_free.index(s), count=2)
        fence_async_shared()

        consumer_args = (DQA, DK, DV, stride_qab, stride_qat, stride_qah, stride_dkb, stride_dkt, stride_dkh,
                         stride_dvb, stride_dvt, stride_dvh, b, hk, group, q_start, lq, k_start, lk, n0, head_dim,
                         ctx_end, start, hi, full_lo, full_hi, shift, window_left, window_right, contextual, max_id,
                         max_attn_len, scale, sig_bias, silu_scale, q_smem, do_smem, k_smem, v_smem, ds_smem, rows_smem,
                         kv_bar, q_full, q_empty, ds_ready, ds_free, dq_smem)
        gl.warp_specialize([
            (_consumer, (consumer_args, 0, SCORE, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT,
                         HAS_MAX_ATTN, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)),
            (_consumer, (consumer_args, 1, SCORE, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT,
                         HAS_MAX_ATTN, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)),
            (_producer, (Q, DO, K, V, LSE, DELTA, stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh,
                         stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_lb, stride_lh, b, hk,
                         group, q_start, lq, k_start, lk, n0, head_dim, ctx_end, start, hi, q_smem, do_smem, k_smem,
                         v_smem, rows_smem, kv_bar, q_full, q_empty, SCORE, HAS_CONTEXT, BLOCK_M, BLOCK_N, HEAD_DIM,
                         STAGES, Q_LAYOUT, KV_LAYOUT)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


BLOCK_M = 64  # query rows per step: S^T and dP^T of a warpgroup are 64 x 64 (32 registers each)
BLOCK_N = 128  # keys per program, 64 per consumer warpgroup
HEAD_DIM = 128
STAGES = 3  # Q/dO buffers: 3 measured 3-12% faster than 2 (224 KB of shared memory in all; 226 with softmax's rows)


@functools.lru_cache(maxsize=None)
def config(torch_dtype) -> dict:
    dtype = gl.bfloat16 if torch_dtype == torch.bfloat16 else gl.float16
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, STAGES=STAGES,
                Q_LAYOUT=gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype),
                KV_LAYOUT=gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype),
                DS_LAYOUT=gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype),
                DQ_LAYOUT=gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM // 2], gl.float32),
                num_warps=4, maxnreg=MAXNREG)

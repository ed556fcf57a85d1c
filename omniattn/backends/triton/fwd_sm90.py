"""Hopper (sm_90) forward in Gluon: the template's loop with the softmax hidden under the tensor cores.

The Triton template (fwd.py) runs each key tile as MMA, wait, softmax, MMA, wait: on an H100 the
tensor cores idle while the exponentials run (benchmarks/NOTES.md: issue slots 40% busy, no
eligible warp in 59% of cycles). Triton 3.6 waits for every wgmma right after issuing it, so the
overlap has to be written by hand; Gluon exposes the asynchronous wgmma, TMA, mbarriers and warp
specialization directly.

The kernel is persistent: one program per SM, each taking work items (BLOCK_M = 128 query rows
of one (sequence, head)) until none is left, in three partitions (tiles per head-dim class, TILES:
head dims 72-128 as below; 136-256 with 64-key tiles and one Q slot that the output leaves from):

- a producer warp takes the items (its program id first, then the next untaken one from a
  counter: the balance the GPU's block scheduler gives a grid of unequal, causal, items), hands
  each to the consumers with its Q in one of two slots, an item ahead (the next item's Q is in
  place before this one's last tile), and loads its K/V tile by tile by TMA into a ring of STAGES
  buffers each (tensor descriptors made in the kernel over this sequence's rows: rows past the
  sequence and channels past the head dim arrive as zeros, the output store stops there; dense and
  packed sequences alike), refilling a buffer once both consumers have released it: the next
  item's first loads run under this item's last tiles and output store;
- two consumer warpgroups of 64 rows each. Per key tile j (FlashAttention-3's overlap):

    issue S_j = Q K_j^T            (async)
    issue O  += P_{j-1} V_{j-1}    (async, P from registers)
    wait for S_j; softmax of S_j   <- runs while P_{j-1} V_{j-1} is on the tensor cores
    wait for the P.V product; rescale O; release K_j and V_{j-1}

  and with PINGPONG the two warpgroups take turns to issue, so one's softmax also runs under the
  other's products. The output leaves by TMA from its own buffer while the next item starts.

The score function, the mask (a window, causal included, or HSTU's: causal or not, targets,
contextual prefix, max_attn_len; common.allowed), softcap and ALiBi are compile-time branches, as
in the template, whose mask and tile-range helpers it calls. So are the quantized precisions
(QK_MODE, PV_FP8; omniattn.quant): INT8 or FP8 Q.K on the 8-bit tensor cores (twice the 16-bit
rate) with one float32 scale per token, and P.V in 16 bits or in FP8 against V^T tiles (FP8 wgmma
reads B K-major; one accumulator, pv_accum="fp32") with V's per-channel scales applied once at the
end. Calls with anything else (relative bias, attention masks, dropout, INT4, smoothed Q, the
two-level FP8 P.V sum, float32) take the template
(launch.sm90_forward_ok). The maths is DESIGN.md's, as fwd.py computes
it (same scale, base-2 online softmax, -ln(Lk) sigmoid bias, one-instruction tanh for 16-bit inputs).
"""

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from .common import _tanh_approx as _tanh  # one MUFU instruction (the template's FAST_MATH tanh)
from .common import (FP8_MAX, LN2, LOG2_FP8_MAX, LOG2E, QK_INT8, SIGMOID, SOFTMAX, VT_ALIGN, allowed, key_range,
                     sequence_bounds, sequence_constants)

# Triton 3.7+ names the TMA copies async_load / async_store; 3.6 (the H100 machine's) has the old names
if hasattr(tma, "async_load"):
    _tma_load, _tma_store = tma.async_load, tma.async_store
else:
    _tma_load, _tma_store = tma.async_copy_global_to_shared, tma.async_copy_shared_to_global
# a barrier of the partition's threads: thread_barrier in 3.6, barrier from 3.9
_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier

# float(x) for an int32 |x| < 2^22 (INT8 Q.K over <= 128 channels: |x| <= 127 * 127 * 128 < 2^21):
# the bits of 1.5 * 2^23 + x, minus 1.5 * 2^23: an integer add and a float add, where the conversion
# instruction (I2F) issues at 16 per clock per SM, as the exponentials do
I2F_MAGIC_BITS = gl.constexpr(0x4B400000)
I2F_MAGIC = gl.constexpr(12582912.0)
# registers per thread by warpgroup: the kernel runs 12 warps (two consumer warpgroups, one
# producer warp rounded up to a warpgroup) under maxnreg=MAXNREG: 65536 / 384 threads; the
# workers then take 240 (consumer warpgroup 1) and 32 (the producer), and Triton gives the default
# partition (consumer warpgroup 0) 232 (its PTX). ptxas spills 4-444 bytes per variant, in the
# per-item code (24 for the producer spills as much)
MAXNREG = 168
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(32)


@gluon.jit
def _rows(base, n_rows, head_dim, row_stride, BLOCK_ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
          LAYOUT: gl.constexpr):
    """A TMA descriptor over n_rows rows of head_dim channels: boxes read past either as zeros,
    stores stop at both."""
    return tma.make_tensor_descriptor(base, shape=[n_rows, head_dim], strides=[row_stride, 1],
                                      block_shape=[BLOCK_ROWS, HEAD_DIM], layout=LAYOUT)


@gluon.jit
def _tile_p(s, t, m_i, l_i, rows, cols, mask, full_lo, full_hi, qk_scale, row_a, row_b, scale, softcap, slope,
            sig_bias, silu_scale, SCORE: gl.constexpr, MASK_KIND: gl.constexpr, HAS_LEFT: gl.constexpr,
            HAS_RIGHT: gl.constexpr, HSTU_CAUSAL: gl.constexpr, HAS_CONTEXT: gl.constexpr,
            HAS_MAX_ATTN: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, QUANT: gl.constexpr,
            PV_FP8: gl.constexpr, BLOCK_N: gl.constexpr):
    """P of key tile t from its raw scores s = q.k (float32), with the running max and sum
    (softmax) and the factor the accumulator must be rescaled by. ``mask``: the mask's run-time
    values (lq, lk, shift, left, right, contextual, max_id, max_attn_len), as common.allowed takes
    them; [full_lo, full_hi): the keys every row of the warpgroup sees (tiles inside need no mask).

    QUANT: s holds t_ij = x_ij * sk_j (the quantized product times the key's scale), and the row's
    scale sq_i and row term r_i (q_i . mean K, smoothing's correction) come as per-row multipliers:
    the score q_i . k_j = sq_i * t_ij + r_i costs no more than the 16-bit path's one FMA per score.
    Softmax: ``row_a`` = sq_i * scale * log2(e) (r_i cancels; the running max is of t);
    sigmoid / SiLU: hx = t * row_a + row_b (half the scaled score, r_i and the sigmoid's bias in
    row_b). PV_FP8: P comes out x448 (e4m3's largest value; SiLU's 1/n waits for the output)."""
    j0 = t * BLOCK_N
    need_mask = (j0 < full_lo) | (j0 + BLOCK_N > full_hi)
    kj = gl.expand_dims(j0 + cols, 0)
    ii = gl.expand_dims(rows, 1)
    c_rows = qk_scale  # the exponent's multiplier per row (scalar unless QUANT)
    if QUANT:
        c_rows = row_a
        c = gl.expand_dims(row_a, 1)
    elif HAS_SOFTCAP or HAS_ALIBI:  # DESIGN.md's order: scale, softcap, then ALiBi
        s = s * scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        if HAS_ALIBI:
            s = s - slope * gl.abs(ii + mask[2] - kj).to(gl.float32)
        if SCORE == SOFTMAX:
            c = LOG2E
        else:
            c = 1.0
        c_rows = c
    else:
        c = qk_scale
    if SCORE == SOFTMAX:  # the running max in units of s: P = exp2(s * c - m * c), one FMA
        if need_mask:
            s = gl.where(allowed(ii, kj, *mask, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                 HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN),
                         s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new) * c_rows  # a row with nothing allowed yet
        if PV_FP8:
            p = gl.exp2(s * c - gl.expand_dims(m_use - LOG2_FP8_MAX, 1))
        else:
            p = gl.exp2(s * c - gl.expand_dims(m_use, 1))
        alpha = gl.exp2(m_i * c_rows - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
    else:  # sigmoid(x) = (1 + tanh(x / 2)) / 2 with the halving folded into the scale: two FP32
        # operations and one MUFU per score for sigmoid, three for SiLU (five before folding)
        if QUANT:
            hx = s * c + gl.expand_dims(row_b, 1)
        else:
            hx = s * (0.5 * c)
            if SCORE == SIGMOID:
                hx = hx + 0.5 * sig_bias
        if SCORE == SIGMOID:
            if PV_FP8:
                p = (0.5 * FP8_MAX) * _tanh(hx) + 0.5 * FP8_MAX
            else:
                p = 0.5 * _tanh(hx) + 0.5
        else:  # x * silu_scale * sigmoid(x) = u + u * tanh(x / 2), u = silu_scale * x / 2
            if PV_FP8:  # (in e4m3's range: silu_scale waits for the output)
                p = gl.minimum(hx * _tanh(hx) + hx, FP8_MAX)
            else:
                u = hx * silu_scale
                p = u * _tanh(hx) + u
        if need_mask:
            p = gl.where(allowed(ii, kj, *mask, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                 HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN),
                         p, 0.0)
        alpha = m_i  # unused
    return p, m_i, l_i, alpha


@gluon.jit
def _pv_wait(acc, p_op, PV_FP8: gl.constexpr):
    """The P.V product once complete. A 16-bit P stays a dependency of the wait (its registers live
    until the product has read them); Triton 3.6's wait cannot take 8-bit values, so an FP8 P is
    not one: its PTX values are never rewritten, and ptxas does not reuse a wgmma's register
    operands before the wait that covers it."""
    if PV_FP8:
        acc = warpgroup_mma_wait(0, deps=(acc, ))
    else:
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    return acc


@gluon.jit
def _scaled_scores(s, sk, QK_MODE: gl.constexpr):
    """t = x * sk of a quantized tile: the product x (int32 or float32) in float32 times each key's
    scale (sk: [1, BLOCK_N], read from shared memory in the scores' layout)."""
    if QK_MODE == QK_INT8:
        s = (s + I2F_MAGIC_BITS).to(gl.float32, bitcast=True) - I2F_MAGIC
    return s * sk


@gluon.jit
def _item_q(item, n_m, n_heads, CU_Q, seqlen_q, HAS_RIGHT: gl.constexpr, HSTU_CAUSAL: gl.constexpr,
            IS_VARLEN: gl.constexpr, BLOCK_M: gl.constexpr):
    """Work item ``item``'s (sequence, head) and query rows m0.. of its sequence (from q_start, lq
    long; rows at or past lq: nothing to do).

    Items run through the query tiles of one (sequence, head) before the next, so programs
    running together share K and V in L2 (ordering all heads' heaviest tiles first measured up to
    19% slower: every program streamed its own K and V from DRAM); when later rows see more keys,
    the last query tile comes first."""
    bh = item // n_m
    pid_m = item % n_m
    if HAS_RIGHT or HSTU_CAUSAL:
        pid_m = n_m - 1 - pid_m
    b = bh // n_heads
    h = bh % n_heads
    q_start, lq = sequence_bounds(CU_Q, b, seqlen_q, IS_VARLEN=IS_VARLEN)
    return b, h, q_start, lq, pid_m * BLOCK_M


@gluon.jit
def _item(item, n_m, n_heads, CU_Q, CU_K, NUM_TARGETS, seqlen_q, seqlen_k, left, right, contextual, max_attn_len,
          sigmoid_bias, MASK_KIND: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
          HSTU_CAUSAL: gl.constexpr, HAS_TARGETS: gl.constexpr, HAS_CONTEXT: gl.constexpr,
          HAS_MAX_ATTN: gl.constexpr, IS_VARLEN: gl.constexpr, DEFAULT_SIG_BIAS: gl.constexpr,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Work item ``item`` (every partition computes the same): _item_q's (sequence, head) and query
    rows, and the key tiles t_lo.. (n_tiles of them) they may see."""
    b, h, q_start, lq, m0 = _item_q(item, n_m, n_heads, CU_Q, seqlen_q, HAS_RIGHT, HSTU_CAUSAL, IS_VARLEN, BLOCK_M)
    k_start, lk = sequence_bounds(CU_K, b, seqlen_k, IS_VARLEN=IS_VARLEN)
    shift = lk - lq  # windows (causal = (-1, 0)) are bottom-right aligned (DESIGN.md)
    # HSTU's last history id (targets share it) and the sigmoid's bias (-ln Lk by default)
    max_id, _, sig_bias = sequence_constants(NUM_TARGETS, b, lq, lk, contextual, sigmoid_bias, MASK_KIND=MASK_KIND,
                                             HAS_CONTEXT=HAS_CONTEXT, HAS_TARGETS=HAS_TARGETS,
                                             DEFAULT_SIG_BIAS=DEFAULT_SIG_BIAS)
    lo, hi, _, _ = key_range(m0, gl.minimum(m0 + BLOCK_M, lq) - 1, lq, lk, shift, left, right, contextual, max_id,
                             max_attn_len, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                             HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN)
    # the key tiles the rows may see; at least one, so a row with no key at all comes out as the
    # mask leaves it (0, lse -inf)
    t_lo = gl.minimum(lo, lk) // BLOCK_N
    n_tiles = gl.maximum(gl.cdiv(hi, BLOCK_N) - t_lo, 1)
    return b, h, q_start, lq, k_start, lk, m0, shift, max_id, sig_bias, t_lo, n_tiles


@gluon.jit
def _with_rows(item, n_items, n_m, n_heads, CU_Q, seqlen_q, COUNTER, HAS_RIGHT: gl.constexpr,
               HSTU_CAUSAL: gl.constexpr, IS_VARLEN: gl.constexpr, BLOCK_M: gl.constexpr):
    """``item``, or the first item taken after it that has rows to compute (packed sequences
    shorter than the longest have query tiles without), or n_items or more when none is left; with
    its _item_q values."""
    b, h, q_start, lq, m0 = _item_q(gl.minimum(item, n_items - 1), n_m, n_heads, CU_Q, seqlen_q, HAS_RIGHT,
                                    HSTU_CAUSAL, IS_VARLEN, BLOCK_M)
    if IS_VARLEN:  # (dense: every item has rows)
        while (item < n_items) & (m0 >= lq):
            # dynamic: the GPU's block scheduler would balance items of unequal work (causal) the same way
            item = gl.num_programs(0) + gl.atomic_add(COUNTER, 1)
            b, h, q_start, lq, m0 = _item_q(gl.minimum(item, n_items - 1), n_m, n_heads, CU_Q, seqlen_q, HAS_RIGHT,
                                            HSTU_CAUSAL, IS_VARLEN, BLOCK_M)
    return item, b, h, q_start, lq, m0


@gluon.jit
def _load_q(args, item, b, h, q_start, lq, m0, slot, qs, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
            Q_LAYOUT: gl.constexpr):
    """Hands work item ``item`` (_item_q's values; past the last item, the end) to the consumers in
    Q slot ``slot`` with its Q (two halves, one per consumer warpgroup), once both warpgroups have
    released the slot: ``qs`` items have been handed to it so far (the barriers' phase)."""
    (Q, K, V, KS, stride_ksb, stride_kst, stride_ksh, ks_smem, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt,
     stride_kh, stride_vb, stride_vt, stride_vh, n_items, n_m, n_heads, group, head_dim, CU_Q, CU_K, NUM_TARGETS,
     COUNTER, seqlen_q, seqlen_k, left, right, contextual, max_attn_len, sigmoid_bias, q_smem, k_smem, v_smem,
     item_smem, q_bar, q_empty, k_full, v_full, k_empty, v_empty) = args
    HALF_M: gl.constexpr = BLOCK_M // 2
    ITEM_LAYOUT: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    mbarrier.wait(q_empty.index(slot), (qs & 1) ^ 1)  # (a fresh barrier counts as released)
    if item < n_items:
        q_desc = _rows(Q + b.to(gl.int64) * stride_qb + q_start.to(gl.int64) * stride_qt + h * stride_qh, lq,
                       head_dim, stride_qt, HALF_M, HEAD_DIM, Q_LAYOUT)
        item_smem.index(slot).store(gl.full([1], item, gl.int32, ITEM_LAYOUT))
        mbarrier.expect(q_bar.index(slot), 2 * q_desc.block_type.nbytes)  # (releases the item number too)
        _tma_load(q_desc, [m0, 0], q_bar.index(slot), q_smem.index(2 * slot))
        _tma_load(q_desc, [m0 + HALF_M, 0], q_bar.index(slot), q_smem.index(2 * slot + 1))
    else:
        item_smem.index(slot).store(gl.full([1], n_items, gl.int32, ITEM_LAYOUT))
        mbarrier.arrive(q_bar.index(slot), count=1)


@gluon.jit
def _load_kv(args, item, it, done, site_last, MASK_KIND: gl.constexpr, HAS_LEFT: gl.constexpr,
             HAS_RIGHT: gl.constexpr, HSTU_CAUSAL: gl.constexpr, HAS_TARGETS: gl.constexpr,
             HAS_CONTEXT: gl.constexpr, HAS_MAX_ATTN: gl.constexpr, IS_VARLEN: gl.constexpr,
             DEFAULT_SIG_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, PV_FP8: gl.constexpr, Q_LAYOUT: gl.constexpr,
             K_LAYOUT: gl.constexpr, V_LAYOUT: gl.constexpr, QUANT: gl.constexpr, Q_SLOTS: gl.constexpr,
             SITE: gl.constexpr):
    """Loads the K and V tiles of work item ``item`` (the ``done``-th, with rows; its Q already
    handed over) into the ring from position ``it``, each buffer once both consumer warpgroups
    have released it, and hands over the next item's Q (_load_q) in the other slot, freed when the
    consumers finished the item before this one: after this item's second tile (EARLY), so that
    it lands an item ahead of its use where loading it after the last tile into the one slot
    left the consumers waiting (ncu: 9% of the forward's stall samples at N = 1024), else after
    its last tile (no wait for this item's consumers, nor for the last tiles' landing). With one
    Q slot (Q_SLOTS = 1: head dims past 128) the next item's Q waits for this item's end, so it
    is handed over after the last tile, whose loads are then all issued.
    Returns the next item, the ring position and the ring position of this item's last tile.

    Each call site (SITE) makes its own TMA descriptors (128 bytes of global scratch each) and the
    producer alternates between two, so a descriptor is rewritten two items after its loads:
    those have landed (the consumers released the item's Q slot after its last K tile; its last V
    tile is waited for, unless its ring buffer has been refilled since). ``site_last``: the ring
    position of the last tile this site loaded (-STAGES - 1 for none)."""
    (Q, K, V, KS, stride_ksb, stride_kst, stride_ksh, ks_smem, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt,
     stride_kh, stride_vb, stride_vt, stride_vh, n_items, n_m, n_heads, group, head_dim, CU_Q, CU_K, NUM_TARGETS,
     COUNTER, seqlen_q, seqlen_k, left, right, contextual, max_attn_len, sigmoid_bias, q_smem, k_smem, v_smem,
     item_smem, q_bar, q_empty, k_full, v_full, k_empty, v_empty) = args
    SK_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, 1], [1, 0])
    sk_cols = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, SK_LAYOUT)), 0)
    # dense calls without a causal mask or window end: the next item is taken as this one starts
    # (the atomic's latency runs under the first tiles' waits) and handed over after its second
    # tile. The others take it after their last tile: causal items are unequal, and an item taken
    # early is work the counter can no longer give to the program that runs out first (a suite run
    # with every call early: 1x16384 causal 7% slower); packed sequences skip items without rows
    # while taking one, which inside the item held its tiles back (packed GQA at 16 x <= 1024: 2x)
    EARLY: gl.constexpr = not (IS_VARLEN or HAS_RIGHT or HSTU_CAUSAL)
    nxt = item
    if item < n_items:
        if EARLY:
            nxt = gl.num_programs(0) + gl.atomic_add(COUNTER, 1)
        b, h, q_start, lq, k_start, lk, m0, _, _, _, t_lo, n_tiles = _item(
            item, n_m, n_heads, CU_Q, CU_K, NUM_TARGETS, seqlen_q, seqlen_k, left, right, contextual, max_attn_len,
            sigmoid_bias, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_MAX_ATTN,
            IS_VARLEN, DEFAULT_SIG_BIAS, BLOCK_M, BLOCK_N)
        if it <= site_last + STAGES:
            mbarrier.wait(v_full.index(site_last % STAGES), (site_last // STAGES) & 1)
        b64 = b.to(gl.int64)
        hk = h // group
        ks_base = KS + b64 * stride_ksb + k_start.to(gl.int64) * stride_kst + hk * stride_ksh
        v_column = k_start  # (dense: 0)
        if IS_VARLEN:
            v_column = (k_start // VT_ALIGN + b) * VT_ALIGN
        # a sequence without keys reads one row (masked, its product discarded) at the tensor's
        # start, a valid address
        k_rows = gl.maximum(lk, 1)
        k_start = gl.where(lk > 0, k_start, 0)
        k_desc = _rows(K + b64 * stride_kb + k_start.to(gl.int64) * stride_kt + hk * stride_kh, k_rows, head_dim,
                       stride_kt, BLOCK_N, HEAD_DIM, K_LAYOUT)
        if PV_FP8:  # (stride_vt: V^T's channel stride)
            v_desc = tma.make_tensor_descriptor(V + b64 * stride_vb + hk * stride_vh + v_column.to(gl.int64),
                                                shape=[head_dim, k_rows], strides=[stride_vt, 1],
                                                block_shape=[HEAD_DIM, BLOCK_N], layout=V_LAYOUT)
        else:
            v_desc = _rows(V + b64 * stride_vb + k_start.to(gl.int64) * stride_vt + hk * stride_vh, k_rows,
                           head_dim, stride_vt, BLOCK_N, HEAD_DIM, V_LAYOUT)
        handover = n_tiles - 1
        if EARLY and Q_SLOTS == 2:
            handover = gl.minimum(handover, 1)
        for j in range(n_tiles):
            stage = (it + j) % STAGES
            free = (((it + j) // STAGES) & 1) ^ 1  # a fresh barrier counts as released (phase 1 complete)
            mbarrier.wait(k_empty.index(stage), free)
            if QUANT:  # (every lane's store ordered before the one lane's arrive below)
                keys = (t_lo + j) * BLOCK_N + sk_cols
                ks_smem.index(stage).store(gl.load(ks_base + keys * stride_kst, mask=keys < lk, other=0.0))
                _barrier()
            mbarrier.expect(k_full.index(stage), k_desc.block_type.nbytes)
            _tma_load(k_desc, [(t_lo + j) * BLOCK_N, 0], k_full.index(stage), k_smem.index(stage))
            mbarrier.wait(v_empty.index(stage), free)
            mbarrier.expect(v_full.index(stage), v_desc.block_type.nbytes)
            if PV_FP8:
                _tma_load(v_desc, [0, (t_lo + j) * BLOCK_N], v_full.index(stage), v_smem.index(stage))
            else:
                _tma_load(v_desc, [(t_lo + j) * BLOCK_N, 0], v_full.index(stage), v_smem.index(stage))
            if j == handover:
                if not EARLY:
                    nxt = gl.num_programs(0) + gl.atomic_add(COUNTER, 1)
                nxt, nb, nh, n_start, n_lq, n_m0 = _with_rows(nxt, n_items, n_m, n_heads, CU_Q, seqlen_q, COUNTER,
                                                              HAS_RIGHT, HSTU_CAUSAL, IS_VARLEN, BLOCK_M)
                _load_q(args, nxt, nb, nh, n_start, n_lq, n_m0, (done + 1) % Q_SLOTS, (done + 1) // Q_SLOTS, BLOCK_M,
                        HEAD_DIM, Q_LAYOUT)
        it += n_tiles
        site_last = it - 1
    return nxt, it, site_last


@gluon.jit
def _producer(args, MASK_KIND: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
              HSTU_CAUSAL: gl.constexpr, HAS_TARGETS: gl.constexpr, HAS_CONTEXT: gl.constexpr,
              HAS_MAX_ATTN: gl.constexpr, IS_VARLEN: gl.constexpr, DEFAULT_SIG_BIAS: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              PV_FP8: gl.constexpr, Q_LAYOUT: gl.constexpr, K_LAYOUT: gl.constexpr, V_LAYOUT: gl.constexpr,
              QUANT: gl.constexpr, Q_SLOTS: gl.constexpr):
    """One warp, the program's scheduler: takes work items (first its program id, then the next
    untaken one, from COUNTER), hands each to the consumers with its Q in one of Q_SLOTS slots (two:
    an item ahead), and loads its K and V tiles into the ring (_load_kv, two items per pass with the two
    sites' descriptors). PV_FP8: V is FP8 V^T (kv head, channel, token) per sequence (dense) or
    packed with each sequence from a 16-token column (quant.vt_columns): its tiles are
    [HEAD_DIM, BLOCK_N]. QUANT: each K tile comes with its keys' scales, stored to ks_smem by this
    warp before K's barrier is armed (whose arrive publishes them): a TMA copy would need 16-byte
    aligned starts, and packed sequences start anywhere. Past the last item the consumers are told
    to stop."""
    (Q, K, V, KS, stride_ksb, stride_kst, stride_ksh, ks_smem, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt,
     stride_kh, stride_vb, stride_vt, stride_vh, n_items, n_m, n_heads, group, head_dim, CU_Q, CU_K, NUM_TARGETS,
     COUNTER, seqlen_q, seqlen_k, left, right, contextual, max_attn_len, sigmoid_bias, q_smem, k_smem, v_smem,
     item_smem, q_bar, q_empty, k_full, v_full, k_empty, v_empty) = args
    item, b, h, q_start, lq, m0 = _with_rows(gl.program_id(0), n_items, n_m, n_heads, CU_Q, seqlen_q, COUNTER,
                                             HAS_RIGHT, HSTU_CAUSAL, IS_VARLEN, BLOCK_M)
    _load_q(args, item, b, h, q_start, lq, m0, 0, 0, BLOCK_M, HEAD_DIM, Q_LAYOUT)
    it = 0  # K/V tiles loaded so far (ring position and phase)
    done = 0  # items loaded so far (Q slot done % Q_SLOTS)
    last_a = -STAGES - 1
    last_b = -STAGES - 1
    while item < n_items:
        item, it, last_a = _load_kv(args, item, it, done, last_a, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL,
                                    HAS_TARGETS, HAS_CONTEXT, HAS_MAX_ATTN, IS_VARLEN, DEFAULT_SIG_BIAS, BLOCK_M,
                                    BLOCK_N, HEAD_DIM, STAGES, PV_FP8, Q_LAYOUT, K_LAYOUT, V_LAYOUT, QUANT, Q_SLOTS,
                                    0)
        done += 1
        if item < n_items:
            item, it, last_b = _load_kv(args, item, it, done, last_b, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL,
                                        HAS_TARGETS, HAS_CONTEXT, HAS_MAX_ATTN, IS_VARLEN, DEFAULT_SIG_BIAS, BLOCK_M,
                                        BLOCK_N, HEAD_DIM, STAGES, PV_FP8, Q_LAYOUT, K_LAYOUT, V_LAYOUT, QUANT,
                                        Q_SLOTS, 1)
            done += 1


@gluon.jit
def _consumer(args, quant_args, WG: gl.constexpr, SCORE: gl.constexpr, MASK_KIND: gl.constexpr,
              HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HSTU_CAUSAL: gl.constexpr,
              HAS_TARGETS: gl.constexpr, HAS_CONTEXT: gl.constexpr, HAS_MAX_ATTN: gl.constexpr,
              HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, IS_VARLEN: gl.constexpr,
              DEFAULT_SIG_BIAS: gl.constexpr, STORE_LSE: gl.constexpr, QK_MODE: gl.constexpr,
              PV_FP8: gl.constexpr, HAS_ROW_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
              O_LAYOUT_SMEM: gl.constexpr, Q_SLOTS: gl.constexpr, O_IN_Q: gl.constexpr):
    """One warpgroup: per work item the producer hands over, HALF_M query rows against the item's
    key tiles, the softmax of tile j overlapping the product of tile j - 1 with V; the output
    leaves by TMA while the next item starts (O_IN_Q: from the item's Q slot, released once the
    output has left it, as 64 KB each for Q and the output would not fit beside K/V at head dim 256).
    ``args``: the run-time arguments, one tuple for both
    warpgroups (constexprs stay separate: inside a tuple they would become run-time values);
    ``quant_args``: the quantized precisions' scales and row terms with their strides."""
    (O, LSE, ALIBI, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_ab, n_items, n_m, n_heads, group,
     head_dim, CU_Q, CU_K, NUM_TARGETS, seqlen_q, seqlen_k, left, right, contextual, max_attn_len, sigmoid_bias,
     scale, softcap, silu_scale, q_smem, o_smem, k_smem, v_smem, item_smem, q_bar, q_empty, k_full, v_full, k_empty,
     v_empty, ks_smem, turn) = args
    (QS, KS, VS, RB, stride_qsb, stride_qst, stride_qsh, stride_ksb, stride_kst, stride_ksh, stride_vsb,
     stride_vsh) = quant_args
    HALF_M: gl.constexpr = BLOCK_M // 2
    QUANT: gl.constexpr = QK_MODE != 0
    K_STEP: gl.constexpr = 32 if QUANT else 16  # the wgmma's K: 32 bytes of each operand row
    PV_K_STEP: gl.constexpr = 32 if PV_FP8 else 16
    # wgmma accumulators of one warpgroup (4 warps along the rows); P feeds the second product from registers
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, K_STEP])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, PV_K_STEP])
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=4 if PV_FP8 else 2)
    p_dtype: gl.constexpr = gl.float8e4nv if PV_FP8 else v_smem.dtype
    o_buf = o_smem.index(WG)  # (O_IN_Q: the item's Q slot instead)
    if QK_MODE == QK_INT8:
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.int32, S_LAYOUT)
    else:
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, S_LAYOUT)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
    qk_scale = scale
    if SCORE == SOFTMAX:
        qk_scale = scale * LOG2E  # the softmax runs in base 2
    # the softmax's exponent multiplier: scale·log2(e) on raw scores, log2(e) on modified ones
    lse_c = qk_scale
    if HAS_SOFTCAP or HAS_ALIBI:
        lse_c = LOG2E
    ITEM_LAYOUT: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    it = 0  # K/V tiles consumed so far (ring position and phase)
    done = 0  # items done so far (Q's phase)
    mbarrier.wait(q_bar.index(0), 0)
    item = gl.max(item_smem.index(0).load(ITEM_LAYOUT), 0)
    while item < n_items:
        b, h, q_start, lq, k_start, lk, m0, shift, max_id, sig_bias, t_lo, n_tiles = _item(
            item, n_m, n_heads, CU_Q, CU_K, NUM_TARGETS, seqlen_q, seqlen_k, left, right, contextual, max_attn_len,
            sigmoid_bias, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_MAX_ATTN,
            IS_VARLEN, DEFAULT_SIG_BIAS, BLOCK_M, BLOCK_N)
        q = q_smem.index(done % Q_SLOTS * 2 + WG)  # this item's Q slot
        b64 = b.to(gl.int64)
        slope = 0.0
        if HAS_ALIBI:
            slope = gl.load(ALIBI + b * stride_ab + h)
        mw = m0 + WG * HALF_M
        rows = mw + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, S_LAYOUT))
        m_i = gl.full([HALF_M], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT))
        l_i = gl.zeros([HALF_M], gl.float32, gl.SliceLayout(1, S_LAYOUT))
        o = gl.zeros([HALF_M, HEAD_DIM], gl.float32, O_LAYOUT)
        row_a = qk_scale
        row_b = 0.0
        rb = 0.0
        if QUANT:  # the rows' scales (and row terms) as the per-row multipliers _tile_p takes
            rows_ok = rows < lq
            qs_rows = b64 * stride_qsb + (q_start + rows) * stride_qst + h * stride_qsh
            row_a = gl.load(QS + qs_rows, mask=rows_ok, other=1.0) * qk_scale  # (rows past lq: never stored)
            if HAS_ROW_BIAS:
                rb = gl.load(RB + qs_rows, mask=rows_ok, other=0.0)
            if SCORE != SOFTMAX:
                row_a = 0.5 * row_a
                row_b = 0.5 * qk_scale * rb
                if SCORE == SIGMOID:
                    row_b = row_b + 0.5 * sig_bias
        # the keys every row of this warpgroup sees: tiles inside [full_lo, full_hi) skip the mask
        mask = (lq, lk, shift, left, right, contextual, max_id, max_attn_len)
        _, _, full_lo, full_hi = key_range(mw, gl.minimum(mw + HALF_M, lq) - 1, *mask,
                                           MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                           HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT,
                                           HAS_MAX_ATTN=HAS_MAX_ATTN)

        # tile 0: scores, then P (its product with V is issued after tile 1's scores)
        mbarrier.wait(k_full.index(it % STAGES), (it // STAGES) & 1)
        s = warpgroup_mma(q, k_smem.index(it % STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        if QUANT:
            s = _scaled_scores(s, ks_smem.index(it % STAGES).load(S_LAYOUT), QK_MODE)
        mbarrier.arrive(k_empty.index(it % STAGES), count=1)
        p, m_i, l_i, alpha = _tile_p(s, t_lo, m_i, l_i, rows, cols, mask, full_lo, full_hi, qk_scale, row_a, row_b,
                                     scale, softcap, slope, sig_bias, silu_scale, SCORE=SCORE, MASK_KIND=MASK_KIND,
                                     HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, HSTU_CAUSAL=HSTU_CAUSAL,
                                     HAS_CONTEXT=HAS_CONTEXT, HAS_MAX_ATTN=HAS_MAX_ATTN, HAS_SOFTCAP=HAS_SOFTCAP,
                                     HAS_ALIBI=HAS_ALIBI, QUANT=QUANT, PV_FP8=PV_FP8, BLOCK_N=BLOCK_N)
        for j in range(1, n_tiles):
            stage = (it + j) % STAGES
            prev = (it + j - 1) % STAGES
            mbarrier.wait(k_full.index(stage), ((it + j) // STAGES) & 1)
            mbarrier.wait(v_full.index(prev), ((it + j - 1) // STAGES) & 1)
            p_op = gl.convert_layout(p.to(p_dtype), P_LAYOUT)
            if PINGPONG:  # the warpgroups take turns to issue, so one's softmax runs under the other's products
                # turns taken so far: it - done before this item (n_tiles - 1 per item); warpgroup 0 goes first
                mbarrier.wait(turn.index(WG), ((it - done + j - 1) & 1) ^ (1 - WG))
            s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if PV_FP8:  # V^T tiles: K-major, as FP8 wgmma reads B
                o = warpgroup_mma(p_op, v_smem.index(prev).permute((1, 0)), o, is_async=True)
            else:
                o = warpgroup_mma(p_op, v_smem.index(prev), o, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - WG), count=1)
            s = warpgroup_mma_wait(1, deps=(s, ))
            if QUANT:
                s = _scaled_scores(s, ks_smem.index(stage).load(S_LAYOUT), QK_MODE)
            mbarrier.arrive(k_empty.index(stage), count=1)
            p, m_i, l_i, alpha = _tile_p(s, t_lo + j, m_i, l_i, rows, cols, mask, full_lo, full_hi, qk_scale, row_a,
                                         row_b, scale, softcap, slope, sig_bias, silu_scale, SCORE=SCORE,
                                         MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                         HSTU_CAUSAL=HSTU_CAUSAL, HAS_CONTEXT=HAS_CONTEXT,
                                         HAS_MAX_ATTN=HAS_MAX_ATTN, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ALIBI=HAS_ALIBI,
                                         QUANT=QUANT, PV_FP8=PV_FP8, BLOCK_N=BLOCK_N)
            o = _pv_wait(o, p_op, PV_FP8)
            mbarrier.arrive(v_empty.index(prev), count=1)
            if SCORE == SOFTMAX:
                o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT)), 1)
        if not O_IN_Q:  # the last scores are done: the slot may refill
            mbarrier.arrive(q_empty.index(done % Q_SLOTS), count=1)
        last = it + n_tiles - 1
        mbarrier.wait(v_full.index(last % STAGES), (last // STAGES) & 1)
        p_op = gl.convert_layout(p.to(p_dtype), P_LAYOUT)
        if PV_FP8:
            o = warpgroup_mma(p_op, v_smem.index(last % STAGES).permute((1, 0)), o, is_async=True)
        else:
            o = warpgroup_mma(p_op, v_smem.index(last % STAGES), o, is_async=True)
        o = _pv_wait(o, p_op, PV_FP8)
        mbarrier.arrive(v_empty.index(last % STAGES), count=1)
        # a sequence without keys multiplied its zero P with a row of another sequence (its
        # descriptor's one valid row): its output is 0 whatever that row holds (DESIGN.md:
        # nothing crosses sequences)
        o = gl.where(lk > 0, o, 0.0)
        if PV_FP8:  # V's per-channel scales; sigmoid's P came x448, SiLU's without its 1/n
            # (softmax's x448 is in its sum)
            channels = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_LAYOUT))
            vs = gl.load(VS + b64 * stride_vsb + (h // group) * stride_vsh + channels, mask=channels < head_dim,
                         other=0.0)
            if SCORE == SIGMOID:
                vs = vs / FP8_MAX
            elif SCORE != SOFTMAX:
                vs = vs * silu_scale
            o = o * gl.expand_dims(vs, 0)

        if SCORE == SOFTMAX:
            has_keys = l_i > 0.0
            l_safe = gl.where(has_keys, l_i, 1.0)
            o = o / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, O_LAYOUT)), 1)
            if STORE_LSE:
                # in base 2: the running max times its multiplier, smoothing's row term, P's x448
                if QUANT:
                    lse2 = m_i * row_a + rb * qk_scale + gl.log2(l_safe)
                    if PV_FP8:
                        lse2 = lse2 - LOG2_FP8_MAX
                else:
                    lse2 = m_i * lse_c + gl.log2(l_safe)
                lse = gl.where(has_keys, lse2 * LN2, float("-inf"))
                gl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + rows, lse, mask=rows < lq)
        # the previous item's output has left this buffer (and its descriptor is free)
        tma.store_wait(0)
        if O_IN_Q:  # (this warpgroup's products have read its half of Q: all were waited for)
            out_buf = q
        else:
            out_buf = o_buf
        out_buf.store(o.to(out_buf.dtype))
        fence_async_shared()
        o_desc = _rows(O + b64 * stride_ob + q_start.to(gl.int64) * stride_ot + h * stride_oh, lq, head_dim,
                       stride_ot, HALF_M, HEAD_DIM, O_LAYOUT_SMEM)
        _tma_store(o_desc, [mw, 0], out_buf)
        if O_IN_Q:  # the output has left the slot: it may refill
            tma.store_wait(0)
            mbarrier.arrive(q_empty.index(done % Q_SLOTS), count=1)
        it += n_tiles
        done += 1
        # the next item's Q (two slots: loaded an item ago), or the end
        mbarrier.wait(q_bar.index(done % Q_SLOTS), (done // Q_SLOTS) & 1)
        item = gl.max(item_smem.index(done % Q_SLOTS).load(ITEM_LAYOUT), 0)
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "contextual", "max_attn_len",
                              "n_seqs"])
def attn_fwd_sm90_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, ALIBI, NUM_TARGETS, COUNTER, QS, KS, VS, RB, stride_ab,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
    stride_qsb, stride_qst, stride_qsh, stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vsh,
    seqlen_q, seqlen_k, n_seqs, n_heads, group, head_dim, scale, softcap, sigmoid_bias, silu_scale, window_left,
    window_right, contextual, max_attn_len,
    SCORE: gl.constexpr, MASK_KIND: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
    HSTU_CAUSAL: gl.constexpr, HAS_TARGETS: gl.constexpr, HAS_CONTEXT: gl.constexpr, HAS_MAX_ATTN: gl.constexpr,
    HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, IS_VARLEN: gl.constexpr, DEFAULT_SIG_BIAS: gl.constexpr,
    STORE_LSE: gl.constexpr, QK_MODE: gl.constexpr, PV_FP8: gl.constexpr, HAS_ROW_BIAS: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
    Q_SLOTS: gl.constexpr, O_IN_Q: gl.constexpr, Q_LAYOUT: gl.constexpr, K_LAYOUT: gl.constexpr,
    V_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr,
):
    """Persistent: each program takes work items (query tiles of one (sequence, head), _item) until
    none is left; COUNTER (int32, zero) hands out the items after the first of every program.
    Quantized (QK_MODE, PV_FP8; else QS, KS, VS, RB are unused): Q and K INT8 or FP8 with float32
    scales per (token, head) in QS / KS, V FP8 V^T with per-channel scales VS, RB the row term."""
    HALF_M: gl.constexpr = BLOCK_M // 2
    n_m = gl.cdiv(seqlen_q, BLOCK_M)
    n_items = n_m * n_seqs * n_heads
    q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [2 * Q_SLOTS, HALF_M, HEAD_DIM], Q_LAYOUT)  # slots x halves
    if O_IN_Q:
        o_smem = q_smem  # (unused: each output leaves from its Q slot)
    else:
        o_smem = gl.allocate_shared_memory(O.dtype.element_ty, [2, HALF_M, HEAD_DIM], O_LAYOUT)
    k_smem = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], K_LAYOUT)
    if PV_FP8:  # V^T tiles
        v_smem = gl.allocate_shared_memory(V.dtype.element_ty, [STAGES, HEAD_DIM, BLOCK_N], V_LAYOUT)
    else:
        v_smem = gl.allocate_shared_memory(V.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], V_LAYOUT)
    item_smem = gl.allocate_shared_memory(gl.int32, [Q_SLOTS, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    q_bar = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ks_smem = turn  # (unused)
    if QK_MODE != 0:  # the key scales of each K tile
        ks_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_N],
                                            gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    for i in gl.static_range(Q_SLOTS):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # released by both consumer warpgroups
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    consumer_args = (O, LSE, ALIBI, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_ab, n_items, n_m,
                     n_heads, group, head_dim, CU_Q, CU_K, NUM_TARGETS, seqlen_q, seqlen_k, window_left, window_right,
                     contextual, max_attn_len, sigmoid_bias, scale, softcap, silu_scale, q_smem, o_smem, k_smem, v_smem,
                     item_smem, q_bar, q_empty, k_full, v_full, k_empty, v_empty, ks_smem, turn)
    quant_args = (QS, KS, VS, RB, stride_qsb, stride_qst, stride_qsh, stride_ksb, stride_kst, stride_ksh, stride_vsb,
                  stride_vsh)
    producer_args = (Q, K, V, KS, stride_ksb, stride_kst, stride_ksh, ks_smem, stride_qb, stride_qt, stride_qh,
                     stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, n_items, n_m, n_heads, group,
                     head_dim, CU_Q, CU_K, NUM_TARGETS, COUNTER, seqlen_q, seqlen_k, window_left, window_right,
                     contextual, max_attn_len, sigmoid_bias, q_smem, k_smem, v_smem, item_smem, q_bar, q_empty, k_full,
                     v_full, k_empty, v_empty)
    # (constexprs written out: concatenated tuples lose them)
    gl.warp_specialize([
        (_consumer, (consumer_args, quant_args, 0, SCORE, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_TARGETS,
                     HAS_CONTEXT, HAS_MAX_ATTN, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN, DEFAULT_SIG_BIAS, STORE_LSE, QK_MODE,
                     PV_FP8, HAS_ROW_BIAS, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, O_LAYOUT, Q_SLOTS,
                     O_IN_Q)),
        (_consumer, (consumer_args, quant_args, 1, SCORE, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_TARGETS,
                     HAS_CONTEXT, HAS_MAX_ATTN, HAS_SOFTCAP, HAS_ALIBI, IS_VARLEN, DEFAULT_SIG_BIAS, STORE_LSE, QK_MODE,
                     PV_FP8, HAS_ROW_BIAS, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, O_LAYOUT, Q_SLOTS,
                     O_IN_Q)),
        (_producer, (producer_args, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_MAX_ATTN,
                     IS_VARLEN, DEFAULT_SIG_BIAS, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, PV_FP8, Q_LAYOUT, K_LAYOUT,
                     V_LAYOUT, QK_MODE != 0, Q_SLOTS)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


BLOCK_M = 128  # two consumer warpgroups of 64 rows
# tiles per head-dim class (descriptors zero-fill the channels past the head dim), H100, bf16, H=16:
# - 72-128: 128-key tiles, K/V buffers of each STAGES = 2 (605 TFLOPS at 1x16384 against 581 with 3;
#   Q's second slot takes the shared memory a third would need: 2 x 32 KB of Q, 32 KB of output,
#   2 x 2 x 32 KB of K/V); PINGPONG: the warpgroups take turns to issue (sigmoid +0-8%, softmax
#   within 1%);
# - 136-256: 64-key tiles (a warpgroup's 64 x 256 float32 output is 128 registers a thread), one
#   Q slot that the output leaves from (64 KB of Q, 2 x 2 x 32 KB of K/V: 192 KB); without turns
#   (2-4% faster at 4x4096 and 16x1024 causal in two runs). At head dim 64 the kernel measured
#   within 2% of the template (6% faster causal): the template keeps it (benchmarks/NOTES.md).
TILES = {128: dict(HEAD_DIM=128, BLOCK_N=128, STAGES=2, Q_SLOTS=2, O_IN_Q=False, PINGPONG=True),
         256: dict(HEAD_DIM=256, BLOCK_N=64, STAGES=2, Q_SLOTS=1, O_IN_Q=True, PINGPONG=False)}
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.int8: gl.int8,
              torch.float8_e4m3fn: gl.float8e4nv}


def head_dim_class(head_dim: int) -> int:
    """The TILES entry a head dim runs with."""
    return min(c for c in TILES if head_dim <= c)


@functools.lru_cache(maxsize=None)
def config(out_dtype, qk_dtype=None, v_dtype=None, pv_fp8: bool = False, head_dim: int = 128) -> dict:
    """The kernel's tiles, shared-memory layouts and launch options (constexprs and kwargs), for
    16-bit calls (the dtype of the output) or quantized ones (Q/K's and V's dtypes; PV_FP8: V^T)."""
    out = _GL_DTYPES[out_dtype]
    qk = _GL_DTYPES[qk_dtype or out_dtype]
    v = _GL_DTYPES[v_dtype or out_dtype]
    tiles = dict(TILES[head_dim_class(head_dim)])
    if qk_dtype is not None:  # quantized: without turns (H100, 4x4096, quantization included: INT8
        # softmax 1.11x faster, causal 1.02x, FP8 1.03x, INT8-FP8, sigmoid and HSTU within 0.5%;
        # 16-bit softmax 0.98x, so it keeps them)
        tiles["PINGPONG"] = False
    d, n = tiles["HEAD_DIM"], tiles["BLOCK_N"]
    q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, d], qk)
    o_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, d], out)
    if tiles["O_IN_Q"] and (qk != out or q_layout != o_layout):
        raise ValueError("an output that leaves from the Q slot needs Q in the output's dtype and layout")
    return dict(BLOCK_M=BLOCK_M, **tiles, Q_LAYOUT=q_layout,
                K_LAYOUT=gl.NVMMASharedLayout.get_default_for([n, d], qk),
                V_LAYOUT=gl.NVMMASharedLayout.get_default_for([d, n] if pv_fp8 else [n, d], v),
                O_LAYOUT=o_layout, num_warps=4, maxnreg=MAXNREG)

"""The relative bias of every visible (query, key) pair, computed once per call for all heads.

Computing HSTU's bias per pair inside the attention kernels (common.rab_tile: a position-weight
load, a time-bucket estimate, an edge comparison and a bucket-weight load) costs about three
times the no-bias forward's instructions per pair, and every head pays it again, as do both
backward kernels. When the weights are shared by the heads, rab_cache_kernel writes the bias
(float32, the same values rab_tile gives) into a (query rows, keys) table once per call (once in
the forward, once in the backward), and the forward and dK/dV kernels load tiles of it with
plain 2-D loads the software pipeliner prefetches. The dQ kernel, which also needs each pair's
time bucket for the bias gradient, measured faster computing the bias itself (benchmarks/NOTES.md,
session 9).

The table costs 4 bytes per (query row, longest key sequence) pair: an (N, N)-sized tensor,
which DESIGN.md's memory contract (O(N), no (Nq, Nk) tensor) rules out by default. So it is
opt-in: OMNIATTN_RAB_CACHE_MB=<budget> builds it for calls whose table fits the budget (2.0 GB at
32 sequences of <= 4096; forward 1.5-1.8x, forward+backward 1.1x faster on an H100, NOTES.md,
session 9); other
calls keep the per-pair path. Only the tiles the forward would visit are written. The kernels'
masked tiles load only allowed pairs; their unmasked tiles are those whose every pair is visible,
hence written; so nothing unwritten is read (the tests poison the table to check it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import (key_range, load_timestamps, next_timestamps, rab_tile, sequence_bounds, sequence_constants,
                     split_range, table_rows)

# tiles of the table kernel: the fastest of 16-128 x 64-128 with 4-8 warps on an H100 (NOTES.md)
CACHE_BLOCK_M = 16
CACHE_BLOCK_N = 128
CACHE_WARPS = 4
TABLE_ALIGN = 16  # row stride in elements (64 bytes): rows start aligned, so tiles load as 16-byte vectors


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "contextual", "max_attn_len", "rab_center", "num_buckets",
                                "window_left", "window_right"])
def rab_cache_kernel(
    CU_Q, CU_K, NUM_TARGETS, POS_W, TS_W, TS, TS_EDGES, BIAS, stride_row,
    seqlen_q, seqlen_k, window_left, window_right, contextual, max_attn_len, rab_center, num_buckets,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HSTU_CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_MAX_ATTN: tl.constexpr,
    BUCKET_LOG: tl.constexpr, GPU_GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (sequences, query tiles) (sequences on axis 0: more than 65535 of them is fine): the
    bias of every pair of the key tiles the query tile's rows may see (key_range: the forward's
    own bounds), at row (sequence's first row + i)."""
    b = tl.program_id(0)
    pid_m = tl.program_id(1)
    q_start, lq = sequence_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
    lk = sequence_bounds(CU_K, b, seqlen_k, IS_VARLEN)[1]
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    ii = offs_m[:, None]
    max_id, tgt_start = sequence_constants(NUM_TARGETS, b, lq, lk, contextual, 0.0, MASK_KIND, HAS_CONTEXT,
                                           HAS_TARGETS, False)[:2]
    ts_base = TS + q_start  # as the attention kernels index timestamps (by the query sequence's start)
    t_next = next_timestamps(ts_base, offs_m, lq, GPU_GATHER)
    m_last = tl.minimum(m0 + BLOCK_M, lq) - 1
    lo, hi, full_lo, full_hi = key_range(m0, m_last, lq, lk, lk - lq, window_left, window_right, contextual, max_id,
                                         max_attn_len, MASK_KIND, HAS_LEFT, HAS_RIGHT, HSTU_CAUSAL, HAS_CONTEXT,
                                         HAS_MAX_ATTN)
    start = split_range(lo, hi, full_lo, full_hi, BLOCK_N)[0]
    rows = BIAS + table_rows(q_start.to(tl.int64), b.to(tl.int64), seqlen_q, offs_m, lq, stride_row, IS_VARLEN)[:, None]
    for start_n in range(start, hi, BLOCK_N):
        offs_n = tl.multiple_of(start_n, BLOCK_N) + tl.arange(0, BLOCK_N)  # aligned: 16-byte stores
        jj = offs_n[None, :]
        t_key = load_timestamps(ts_base + offs_n, offs_n < lk, GPU_GATHER)
        rab = rab_tile(ii, jj, lq, lk, t_next, t_key, POS_W, TS_W, TS_EDGES, rab_center, num_buckets,
                       tgt_start, True, HAS_TARGETS, BUCKET_LOG, GPU_GATHER)[0]
        tl.store(rows + jj, rab, mask=(ii < lq) & (jj < lk))


BUDGET_ENV = "OMNIATTN_RAB_CACHE_MB"


def budget_bytes() -> int:
    """The table's budget: OMNIATTN_RAB_CACHE_MB megabytes; unset or 0, no table (the default)."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    if not value:
        return 0
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb >= 0 or mb == float("inf"):
        raise ValueError(f"{BUDGET_ENV}: expected a number of megabytes >= 0, got {value!r}")
    return round(mb * 2**20)


def table_stride(max_k: int) -> int:
    return triton.cdiv(max_k, TABLE_ALIGN) * TABLE_ALIGN


MAX_ENTRIES = 2**31 - 1  # the dK/dV kernel offsets rows within a sequence in 32 bits (an 8 GB table)


def fits(rows: int, max_k: int, budget: int) -> bool:
    """Whether the table of ``rows`` x ``max_k`` fits ``budget`` bytes and MAX_ENTRIES. (The caller
    builds it only for weights shared by two or more heads: per-head weights would need a table
    per head and save nothing.)"""
    entries = rows * table_stride(max_k)
    return entries <= MAX_ENTRIES and entries * 4 <= budget


def new_table(rows: int, stride: int, device) -> torch.Tensor:
    """The (rows, stride) float32 table, uninitialised: the kernels read only pairs the table
    kernel wrote (the tests poison it)."""
    return torch.empty(rows, stride, dtype=torch.float32, device=device)

"""Tile sizes, warps and pipeline depth per kernel, head dim and device.

The GPU choices come from sweeps on the lent H100 (see benchmarks/NOTES.md); the interpreter
(CPU, TRITON_INTERPRET=1) gets small tiles so tests exercise many of them quickly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> dict:
        if interpreting():
            return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n)
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps, num_stages=self.num_stages)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1): triton.next_power_of_2 without its wrapper's per-call
    cost (microseconds on every launch's host path)."""
    return 1 << (max(n, 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_dim(d: int) -> int:
    """The kernels' power-of-two channel block (at least 16) for head dim d."""
    return max(16, next_pow2(d))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _override(kind: str) -> TileConfig | None:
    """OMNIATTN_<KIND>_CONFIG="BM,BN,WARPS,STAGES" pins a config (used by the tuning sweeps)."""
    value = os.environ.get(f"OMNIATTN_{kind.upper()}_CONFIG")
    if not value:
        return None
    bm, bn, w, s = (int(x) for x in value.split(","))
    return TileConfig(bm, bn, w, s)


INTERPRETER = TileConfig(16, 16, 1, 1)


def _pinned(kind: str) -> TileConfig | None:
    """A config that overrides the tuned ones: the environment's, or the interpreter's small tiles."""
    return _override(kind) or (INTERPRETER if interpreting() else None)


def fwd_config(head_dim: int, dtype_bytes: int, score: int, causal: bool, hstu_long: bool = False,
               tma: bool = False, bias_table: bool = False) -> TileConfig:
    """H100, bf16, D=128 sweeps (benchmarks/NOTES.md): softmax 128x64 w8 (128x128 causal); the
    pointwise scores, with no row statistics to keep, prefer 64x64 w4, except HSTU's jagged
    batches of long sequences (>= 2048), where 128x64 w8 measured 1.5x faster (324 vs 219 TFLOPS
    at 32 x <= 4096). ``tma`` (non-causal, K/V loaded by TMA on Hopper): 128x64 w4 s2 for every
    score, 3-10% faster than the pointer loads' best on the H200 (the copies hold no registers,
    so one warpgroup keeps the 128-row tile). ``bias_table`` (HSTU's bias read from rab_cache's
    table): 2 stages for the 64x64 tiles, whose third stage of float32 bias left one block per SM
    (64 x <= 1024: 0.33 ms against 0.47 with 3 stages, H100)."""
    if pinned := _pinned("fwd"):
        return pinned
    if dtype_bytes > 2 or head_dim > 128:
        return TileConfig(64, 32, 4, 2)
    if head_dim <= 64:
        return TileConfig(128, 64, 4, 3)
    if hstu_long:
        return TileConfig(128, 64, 8, 3)
    if tma and not causal:
        return TileConfig(128, 64, 4, 2)
    if score != 0:
        return TileConfig(64, 64, 4, 2 if bias_table else 3)
    return TileConfig(128, 128, 8, 3) if causal else TileConfig(128, 64, 8, 3)


def quant_fwd_config(head_dim: int, pv_fp8: bool) -> TileConfig:
    """Quantized forward: the quantization groups follow these tiles (per_block scales), so they
    are fixed per head dim rather than per score. 128 keys per tile: the accumulator's rescale and
    the two-level FP8 accumulator's adds are per (row, channel) per tile, so wider key tiles halve
    them per score. H200, 4x4096, H=16, kernel time (benchmarks/NOTES.md): D=128 (K/V by TMA)
    64x128 w4 s2 for INT8 Q.K with 16-bit P.V (561 TOPS; 128x64 w4 s2 526), s3 where P.V runs
    in FP8 (622; s2 565); D=64 (pointer loads) INT8 128x64 w4 s3 (351; 64x128 w4 s2 327), FP8
    P.V 64x128 w4 s2 (365; 128x64 w4 s3 331)."""
    if pinned := _pinned("qfwd"):
        return pinned
    if head_dim > 128:
        return TileConfig(64, 64, 4, 2)
    if head_dim <= 64:
        return TileConfig(64, 128, 4, 2) if pv_fp8 else TileConfig(128, 64, 4, 3)
    return TileConfig(64, 128, 4, 3 if pv_fp8 else 2)


def bwd_dkdv_config(head_dim: int, dtype_bytes: int, causal: bool) -> TileConfig:
    """block_m: the query tile of the inner loop; block_n: the key tile each program owns."""
    if pinned := _pinned("dkdv"):
        return pinned
    if dtype_bytes > 2 or head_dim > 128 or causal:
        return TileConfig(32, 64, 4, 2)
    return TileConfig(64, 64, 4, 2)


def bwd_dq_config(head_dim: int, dtype_bytes: int, rab: bool = False) -> TileConfig:
    """With the relative bias the dQ kernel also reduces the bias gradients per tile and runs at
    2 blocks of 4 warps per SM (255 registers): 64x32 measured 1.2-1.3x faster than 64x64 (H200,
    HSTU (64, 1024) and (32, 4096), benchmarks/NOTES.md)."""
    if pinned := _pinned("dq"):
        return pinned
    return TileConfig(64, 32, 4, 2) if dtype_bytes > 2 or head_dim > 128 or rab else TileConfig(64, 64, 4, 2)


PREPROCESS_BLOCK_M = 64

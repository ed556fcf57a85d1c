"""Quantized precisions: what each name means, how it is configured, what a GPU can run.

SageAttention2's recipe (DESIGN.md): K smoothed by its mean over tokens, Q and K quantized to
INT8 / INT4 / FP8 with float32 scales per group of tokens, P.V in FP8 with V scaled per channel
and a two-level float32 accumulator. Inference only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("exact", "int8", "int8-fp8", "fp8", "int4-fp8", "auto")
QUANTIZED = ("int8", "int8-fp8", "fp8", "int4-fp8")
GRANULARITIES = ("per_block", "per_warp", "per_thread")
PV_ACCUMS = ("fp32+fp32", "fp32")

# Q.K mode of each precision (backends/triton/common.py QK_*) and whether P.V runs in FP8
QK_MODE = {"int8": 1, "int8-fp8": 1, "int4-fp8": 2, "fp8": 3}
PV_FP8 = {"int8": False, "int8-fp8": True, "int4-fp8": True, "fp8": True}
# the largest quantized magnitude of each Q.K mode
QK_LIMIT = {1: 127.0, 2: 7.0, 3: 448.0}
FP8_MAX = 448.0
WARP_ROWS = 16  # rows of one warp's MMA fragment: the "per_warp" group


@dataclass(frozen=True)
class QuantConfig:
    """How quantized precisions quantize (SageAttention2's options).

    granularity: tokens sharing one scale. ``"per_block"``: the kernel's tile (BLOCK_M query rows,
        BLOCK_N keys); ``"per_warp"``: 16 query rows (one warp's MMA fragment), keys per block;
        ``"per_thread"`` (default): every token its own scale. SageAttention2's per-thread groups
        follow the MMA register layout, which Triton does not expose: one scale per token is at
        least as fine. The kernel multiplies each tile by the outer product of its row and column
        scales whatever the grouping, so the finest costs nothing there; on outlier-key inputs it
        is what brings INT8 to cosine >= 0.9999 and relative L1 <= 0.01 (per block: 0.013).
    smooth_k: subtract K's mean over the tokens of each sequence before quantizing. Exact for
        softmax (a per-row constant); for sigmoid and SiLU the row term q . mean(K) is added back
        in float32, so the function is unchanged.
    smooth_q: subtract the mean of each query tile (BLOCK_M rows) before quantizing and add back
        the per-key term mean(Q_tile) . k in float32 (BN x D multiply-adds per tile).
    pv_accum: ``"fp32+fp32"``: each tile's FP8 P.V product starts a fresh float32 accumulator and is
        added to the running one (Hopper's FP8 MMA keeps ~22 mantissa bits); ``"fp32"``: one
        accumulator through all tiles (faster, less accurate).
    """

    granularity: str = "per_thread"
    smooth_k: bool = True
    smooth_q: bool = False
    pv_accum: str = "fp32+fp32"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity: expected one of {list(GRANULARITIES)}, got {self.granularity!r}")
        for name in ("smooth_k", "smooth_q"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {type(getattr(self, name)).__name__}")
        if self.pv_accum not in PV_ACCUMS:
            raise ValueError(f"pv_accum: expected one of {list(PV_ACCUMS)}, got {self.pv_accum!r}")

    def groups(self, block_m: int, block_n: int) -> tuple[int, int]:
        """Tokens per scale for (Q, K)."""
        if self.granularity == "per_block":
            return block_m, block_n
        if self.granularity == "per_warp":
            return min(WARP_ROWS, block_m), block_n
        return 1, 1


DEFAULT = QuantConfig()


def gpu_precisions(device: torch.device) -> tuple[str, ...]:
    """The quantized precisions this CUDA device's tensor cores run (INT8 from sm75's, FP8 from sm89's).
    INT4 Q.K is computed on INT8 units on every GPU (Hopper has no INT4 tensor cores)."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (8, 9):
        return QUANTIZED
    if major >= 8 or (major, minor) >= (7, 5):
        return ("int8",)
    return ()


def resolve(precision: str) -> str:
    """``"auto"``: the fastest precision this device runs that meets omniattn's accuracy bar
    (cosine >= 0.9999 and relative L1 <= 0.01 on outlier-key inputs). Only INT8 Q.K with 16-bit
    P.V meets the bar (FP8 P.V: e4m3's 3 mantissa bits give cosine ~0.9993, relative L1 ~0.037;
    INT4 less), and on the GPU measured (README, benchmarks/NOTES.md) INT8 with its quantization
    is mostly slower than the exact kernel: H100 (session 21) 0.94x at 4x4096, 0.73x causal, 1.06x
    at 1x16384, 0.69x at 16x1024 (H200: 1.00x, 1.02x, 0.82x, 0.64x at 16x1024; the quantization
    passes cost ~0.1 ms). So "auto" is
    exact, on GPUs as on CPUs (where the quantized precisions are an emulation for studying
    accuracy)."""
    if precision != "auto":
        return precision
    return "exact"

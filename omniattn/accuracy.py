"""DESIGN.md's accuracy rule, shared by `omniattn check`, the benchmark and the tests.

A backend's error against the float64 reference must stay within 2x the error of the same maths
done by PyTorch in the inputs' dtype, plus a rounding floor: the backends accumulate in float32
(float64 for float64 inputs), so a few float32 ulps of the problem's magnitude is noise, and the
same-dtype maths can be exact by coincidence (a single key gives dq = dk = 0 exactly).
"""

from __future__ import annotations

import torch

FLOOR_ULPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def magnitude(*tensors) -> float:
    return max([1.0] + [t.abs().max().item() for t in tensors if t is not None and t.numel()])


def bound(ref64: torch.Tensor, ref_same: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> float:
    """Largest error the rule allows for a result whose float64 value is ref64."""
    return 2 * max_err(ref_same, ref64) + FLOOR_ULPS[dtype] * max(scale, magnitude(ref64))


"""O(N) memory: no tensor of size (queries x keys) is allocated, forward or backward.

Every ATen op run inside a TorchDispatchMode reports the tensors it returns; the largest one must
stay far below Nq * Nk and grow linearly, not quadratically, with N.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import omniattn as oa


class LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def largest_allocation(fn, n, heads=2, dim=16, **kw):
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, n, heads, dim, generator=gen).requires_grad_() for _ in range(3))
    with LargestAllocation() as probe:
        out = fn(q, k, v, **kw)
        out.backward(torch.ones_like(out))
    return probe.largest, probe.op


@pytest.mark.parametrize("score,causal", [("softmax", False), ("softmax", True), ("sigmoid", False), ("silu", True)])
def test_torch_backend_memory_is_linear(score, causal):
    sizes = {}
    for n in (2048, 8192):
        sizes[n], op = largest_allocation(oa.attention, n, score=score, causal=causal, backend="torch")
    assert sizes[8192] < 8192 * 8192 // 16, f"{op} allocated {sizes[8192]} elements (N^2 = {8192 * 8192})"
    # 4x the tokens: linear growth allows 4x, quadratic would be 16x
    assert sizes[8192] <= 4 * sizes[2048], sizes


def test_hstu_memory_is_linear():
    """HSTU with targets and the relative bias: the bias is generated per tile, never (N, N)."""
    sizes = {}
    for n in (2048, 8192):
        gen = torch.Generator().manual_seed(n)
        offsets = torch.tensor([0, n // 2, n])
        q, k, v = (torch.randn(n, 2, 16, generator=gen).requires_grad_() for _ in range(3))
        rab = oa.hstu.RelativeBias(n // 2, num_buckets=32)
        ts = torch.arange(n) * 7
        with LargestAllocation() as probe:
            out = oa.hstu_attention(q, k, v, offsets, n // 2, num_targets=torch.tensor([3, 5]), rab=rab,
                                    timestamps=ts, backend="torch")
            out.backward(torch.ones_like(out))
        sizes[n] = probe.largest
    assert sizes[8192] < 4096 * 4096 // 8, f"{probe.op} allocated {sizes[8192]} elements"
    assert sizes[8192] <= 4 * sizes[2048], sizes


def test_probe_detects_a_quadratic_allocation():
    """The probe itself can fail: the materialised reference allocates N^2."""
    largest, _ = largest_allocation(oa.reference.attention, 512)
    assert largest >= 512 * 512

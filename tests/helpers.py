"""Shared test utilities: random problems and DESIGN.md's tolerance rule."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

import omniattn as oa
from omniattn.accuracy import bound, magnitude, max_err  # noqa: F401  (max_err re-exported)

def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh tensor with 0xFF bytes (NaN in every float format, FP8 included; -1 in ints), so
    any element a kernel leaves unwritten shows."""
    if t.numel() and t.dtype != torch.bool:
        t.view(torch.uint8).fill_(0xFF)
    return t


class PoisonedTorch:
    """torch for a module under test, except that empty() / empty_like() return poisoned tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*a, **kw):
        return poison(torch.empty(*a, **kw))

    @staticmethod
    def empty_like(*a, **kw):
        return poison(torch.empty_like(*a, **kw))


def rand(shape, dtype, gen, device="cpu", scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


@dataclass
class Problem:
    """A random attention problem: dense (B, N, H, D) or varlen (T, H, D), with its keywords."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    varlen: tuple | None = None  # (cu_q, cu_k, max_q, max_k)

    def leaves(self):
        return [self.q, self.k, self.v]

    def run(self, fn, **extra):
        if self.varlen is None:
            return fn(self.q, self.k, self.v, **self.kwargs, **extra)
        return fn(self.q, self.k, self.v, *self.varlen, **self.kwargs, **extra)


def dense_problem(b, nq, nk, hq, hkv, d, dv, dtype, gen, device="cpu", **kwargs) -> Problem:
    q = rand((b, nq, hq, d), dtype, gen, device).requires_grad_()
    k = rand((b, nk, hkv, d), dtype, gen, device).requires_grad_()
    v = rand((b, nk, hkv, dv), dtype, gen, device).requires_grad_()
    return Problem(q, k, v, kwargs)


def varlen_problem(lens_q, lens_k, hq, hkv, d, dv, dtype, gen, device="cpu", **kwargs) -> Problem:
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0).tolist()), dtype=torch.int32, device=device)
    q = rand((sum(lens_q), hq, d), dtype, gen, device).requires_grad_()
    k = rand((sum(lens_k), hkv, d), dtype, gen, device).requires_grad_()
    v = rand((sum(lens_k), hkv, dv), dtype, gen, device).requires_grad_()
    return Problem(q, k, v, kwargs, (cu_q, cu_k, max(lens_q, default=0), max(lens_k, default=0)))


def reference_fn(problem: Problem):
    return oa.reference.attention if problem.varlen is None else oa.reference.attention_varlen


def api_fn(problem: Problem):
    return oa.attention if problem.varlen is None else oa.attention_varlen


def assert_tolerance(name: str, got, ref64, ref_same, dtype, scale: float = 1.0) -> None:
    """DESIGN.md: error vs float64 <= 2x the error of the same-dtype PyTorch maths (+ a rounding floor)."""
    assert not torch.isnan(got).any(), f"{name}: NaN in the result"
    err, limit = max_err(got, ref64), bound(ref64, ref_same, dtype, scale)
    assert err <= limit, f"{name}: error {err:.3e} > {limit:.3e} (2x same-dtype torch + floor)"


@contextlib.contextmanager
def float64_leaves(problem: Problem):
    """problem.q, .k, .v as float64 copies while the float64 reference runs: autograd returns a
    leaf's gradient in the leaf's dtype, so a reference fed the 16-bit leaves themselves had its
    float64 gradients rounded back to 16 bits (an error of up to half an ulp in the yardstick, which
    let the same-dtype maths look exact by coincidence)."""
    saved = (problem.q, problem.k, problem.v)
    problem.q, problem.k, problem.v = (t.detach().double().requires_grad_(t.requires_grad) for t in saved)
    try:
        yield problem.leaves()
    finally:
        problem.q, problem.k, problem.v = saved


def check_outputs_and_grads(problem: Problem, backend: str, gen, extra_leaves=(), fn=None, ref=None) -> None:
    """Run backend, fp64 reference and same-dtype reference; compare output and every gradient.
    ``ref(dtype)`` must read the problem's q, k, v at call time (the float64 run swaps them)."""
    dtype = problem.q.dtype
    fn = fn or (lambda *a, **kw: problem.run(api_fn(problem), backend=backend, **kw))
    ref = ref or (lambda dt: problem.run(reference_fn(problem), dtype=dt))
    leaves = problem.leaves() + list(extra_leaves)
    out = fn()
    with float64_leaves(problem) as leaves64:
        out64 = ref(torch.float64)
    out_same = ref(dtype)
    assert out.dtype == dtype and out.shape == out64.shape
    assert_tolerance("out", out, out64, out_same, dtype)
    dout = rand(out.shape, torch.float32, gen, out.device).to(dtype)
    want = [leaf for leaf in leaves if leaf.requires_grad]
    want64 = [leaf for leaf in leaves64 + list(extra_leaves) if leaf.requires_grad]
    grads = torch.autograd.grad(out, want, dout, allow_unused=True)
    grads64 = torch.autograd.grad(out64, want64, dout.double(), allow_unused=True)
    grads_same = torch.autograd.grad(out_same, want, dout, allow_unused=True)
    names = ["dq", "dk", "dv", "d_pos_w", "d_ts_w"]
    scale = magnitude(out64, *grads64)
    for name, g, g64, gs in zip(names, grads, grads64, grads_same):
        if g64 is None:
            assert g is None or not g.abs().any(), f"{name}: gradient where the reference has none"
            continue
        assert g is not None, f"{name}: missing gradient"
        assert_tolerance(name, g, g64, gs, dtype, scale)


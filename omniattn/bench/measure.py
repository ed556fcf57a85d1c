"""Timing, peak memory and accuracy of one built implementation."""

from __future__ import annotations

import ctypes
import platform
import statistics
import time
from typing import Callable, Optional

import torch

import omniattn as oa

from ..accuracy import max_err
from .impls import Inputs, Runner, hstu_kwargs, score_kwargs
from .suites import Case

GPU_REPEATS = 3  # independent timings per row on GPUs: their median is reported, min and max beside it
ROWS_CHECKED = 256  # query rows compared with the float64 reference (the last ones: they see the most keys)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def wall_seconds(fn: Callable, reps: int):
    """Median wall-clock seconds of ``reps`` calls of ``fn`` (the device synchronised around each),
    and the last call's result: for steps too long or too host-heavy for do_bench (model-level
    and long-context rows)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times, result = [], None
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def step(runner: Runner, case: Case, dout: torch.Tensor) -> Callable:
    """What one timed iteration runs: the forward, or forward and backward."""
    if case.mode == "fwd":

        def fwd():
            with torch.no_grad():
                return runner.fn()

        return fwd

    def fwdbwd():
        runner.fn().backward(dout)

    return fwdbwd


def time_ms(fn: Callable, device: torch.device, leaves: list, spread: bool = False):
    """Median milliseconds: triton.testing.do_bench on GPUs; on CPUs a warm-up run, then repeated
    wall-clock runs for about a second (at least two). ``spread``: also return {"ms_min", "ms_max"}
    over GPU_REPEATS independent do_bench medians (the run-to-run spread a reader should expect),
    the reported time being the median of those."""
    if device.type == "cuda":
        from triton.testing import do_bench

        if not spread:
            return float(do_bench(fn, warmup=25, rep=100, grad_to_none=leaves, return_mode="median"))
        runs = sorted(float(do_bench(fn, warmup=10 if i else 25, rep=30, grad_to_none=leaves, return_mode="median"))
                      for i in range(GPU_REPEATS))
        return runs[len(runs) // 2], {"ms_min": round(runs[0], 4), "ms_max": round(runs[-1], 4)}
    if spread:
        return time_ms(fn, device, leaves), {}
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < 1.0 and len(times) < 20):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_peak_mb(fn: Callable) -> Optional[float]:
    """Peak resident memory one call adds (Linux + glibc). glibc keeps freed memory mapped and
    reuses it, which would hide allocations from the resident-set peak; during the measurement
    every allocation of 64 KiB or more gets its own mapping, returned on free, so the peak (VmHWM,
    reset by writing 5 to clear_refs) follows the live bytes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 10)
    libc.mallopt(m_trim_threshold, 64 << 10)
    libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
    finally:  # back to thresholds near glibc's adaptive ones, so later timings are unaffected
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 64 << 20)
    return None if base is None or peak is None else max(peak - base, 0) / 1024


def peak_memory_mb(fn: Callable, device: torch.device, leaves: list) -> Optional[float]:
    """Extra memory one iteration needs at its peak, beyond the inputs already allocated."""
    for t in leaves:
        t.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return _cpu_peak_mb(fn)


class ReferenceRows:
    """float64 reference output (and dq) for the last query rows of the first sequence."""

    def __init__(self, case: Case, x: Inputs, dout: torch.Tensor):
        if case.op == "hstu":
            self._hstu(case, x, dout)
            return
        if x.cu is not None:
            lq = case.lens[0]
            self.rows = slice(max(0, lq - ROWS_CHECKED), lq)
            q, k, v, d = x.q[None, : lq], x.k[None, : case.lens[0]], x.v[None, : case.lens[0]], dout[None, :lq]
        else:
            self.rows = slice(max(0, case.seqlen - ROWS_CHECKED), case.seqlen)
            q, k, v, d = x.q[:1], x.k[:1], x.v[:1], dout[:1]
        # bottom-right aligned masks make the last rows with every key exactly the full problem's rows
        q = q[:, self.rows].detach().requires_grad_()
        out = oa.reference.attention(q, k.detach(), v.detach(), causal=case.causal, **score_kwargs(case))
        self.out = out[0].detach()
        self.dq = None
        if case.mode == "fwdbwd":
            (dq,) = torch.autograd.grad(out, q, d[:, self.rows].double())
            self.dq = dq[0]

    def _hstu(self, case: Case, x: Inputs, dout: torch.Tensor) -> None:
        """The whole first sequence (targets make row subsets differ from the full problem)."""
        n = case.lens[0]
        self.rows = slice(max(0, n - ROWS_CHECKED), n)
        kw = hstu_kwargs(case, x)
        if kw["num_targets"] is not None:
            kw["num_targets"] = kw["num_targets"][:1]
        if kw["timestamps"] is not None:
            kw["timestamps"] = kw["timestamps"][:n]
        q = x.q[:n].detach().requires_grad_()
        offsets = torch.tensor([0, n], device=q.device)
        out = oa.reference.hstu_attention(q, x.k[:n].detach(), x.v[:n].detach(), offsets, case.seqlen, **kw)
        self.out = out[self.rows].detach()
        self.dq = None
        if case.mode == "fwdbwd":
            (dq,) = torch.autograd.grad(out, q, dout[:n].double())
            self.dq = dq[self.rows]

    def similarity(self, runner: Runner, case: Case) -> dict:
        """Cosine similarity and relative L1 error of the checked output rows (quantized cases)."""
        with torch.no_grad():
            got = self._first(runner.fn(), case).double().flatten()
        want = self.out.double().flatten()
        cos = float(got @ want / (got.norm() * want.norm()).clamp(min=1e-300))
        rel_l1 = float((got - want).abs().sum() / want.abs().sum().clamp(min=1e-300))
        return {"cos": float(f"{cos:.7f}"), "rel_l1": float(f"{rel_l1:.3g}")}

    def _first(self, t: torch.Tensor, case: Case) -> torch.Tensor:
        return t[self.rows] if case.lens else t[0, self.rows]

    def error(self, runner: Runner, case: Case, dout: torch.Tensor) -> Optional[float]:
        """Largest error of the output (and dq) rows; None for a runner of other maths (a speed reference)."""
        for t in runner.leaves:
            t.grad = None
        if not runner.comparable:
            runner.fn()  # still compiles / warms up like the others
            return None
        if case.mode == "fwd":
            with torch.no_grad():
                return max_err(self._first(runner.fn(), case), self.out)
        out = runner.fn()
        out.backward(dout)
        return max(max_err(self._first(out.detach(), case), self.out), max_err(self._first(runner.dq(), case), self.dq))

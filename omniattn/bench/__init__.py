"""`omniattn bench`: omniattn against PyTorch's own attention on this device, same inputs, same run.

Each row: median time, TFLOPS (DESIGN.md's FLOP count), max error of the output (and, for
forward+backward, of dq) against the float64 reference on the last query rows, and peak memory.
"""

from __future__ import annotations

import gc
from typing import Optional

import torch

from .impls import IMPLS, impls_for, make_inputs
from .measure import ReferenceRows, device_name, peak_memory_mb, step, time_ms
from .report import Progress, plot, table, write_json
from .suites import SUITES, Case, default_suite

__all__ = ["run_bench", "SUITES", "Case", "IMPLS", "table", "plot", "write_json", "device_name", "default_suite"]


# The precision each peer computes at, for the op name of its rows in quantized cases.
_PEER_PRECISION = {"sageattention": "int8"}


def _op_name(case: Case, impl: str) -> str:
    """DESIGN.md: "<score>-<precision>" for quantized rows (the baselines of a quantized case keep
    the plain name: they compute exactly, on the same outlier-key inputs)."""
    precision = case.options.get("precision")
    if impl == "omniattn" and precision:
        return f"{case.op}-{precision}"
    if impl in _PEER_PRECISION:
        return f"{case.op}-{_PEER_PRECISION[impl]}"
    return case.op


def _row(case: Case, impl: str, ms: Optional[float], err: Optional[float], peak: Optional[float], **extra) -> dict:
    row = {
        "op": _op_name(case, impl),
        "impl": impl,
        "mode": case.mode,
        "dtype": case.dtype,
        "batch": case.batch,
        "seqlen": case.seqlen,
        "heads": case.heads,
        "head_dim": case.head_dim,
        "causal": case.causal,
        "ms": None if ms is None else round(ms, 4),
        # three significant digits, not two decimals: a CPU's 0.004 TFLOPS must not round to 0
        "tflops": None if not ms else float(f"{case.flops() / (ms * 1e-3) / 1e12:.3g}"),
        "max_err": None if err is None else float(f"{err:.3g}"),
    }
    if case.kv_heads:
        row["kv_heads"] = case.kv_heads
    if case.lens:
        row["varlen"] = True
        row["total_tokens"] = sum(case.lens)
    row.update(case.options)
    if peak is not None:
        row["peak_mb"] = round(peak, 1)
    row.update(extra)
    return row


def run_bench(cases: list[Case], device: torch.device, only: Optional[list[str]] = None, progress: bool = True,
              on_rows=None, extra: Optional[dict] = None) -> list[dict]:
    """Time every usable implementation on every case; a failing implementation gives a row with
    its error message instead of stopping the run. ``on_rows(rows)`` is called after each case
    (the CLI prints the case's rows and rewrites its JSON and plot there, so an interrupted run
    keeps what it measured). ``extra``: keys added to every row (e.g. threads, background_load)."""
    plan = [(case, impls_for(case, device, only)) for case in cases]
    bar = Progress(sum(len(i) for _, i in plan)) if progress else None
    rows = []
    for case, impls in plan:
        x = make_inputs(case, device)
        out_shape = x.q.shape[:-1] + (case.head_dim,)
        dout = torch.randn(out_shape, device=device, dtype=case.torch_dtype, generator=torch.Generator(device).manual_seed(1))
        ref = ReferenceRows(case, x, dout)
        for impl in impls:
            if bar:
                bar.update(f"{case.label()} {impl.name}")
            try:
                runner = impl.build(case, x)
                child = getattr(runner, "result", None)  # a peer timed in its own process
                if child is not None:
                    rows.append(_row(case, impl.name, child["ms"], None, None, process="child", **(extra or {})))
                    continue
                err = ref.error(runner, case, dout)
                info = ref.similarity(runner, case) if case.options.get("precision") else {}
                fn = step(runner, case, dout)
                ms, spread = time_ms(fn, device, runner.leaves, spread=True)
                info.update(spread)
                peak = peak_memory_mb(fn, device, runner.leaves)
                if impl.name == "omniattn":
                    from ..backends import resolve_for_tensor

                    info["backend"] = resolve_for_tensor(x.q)
                rows.append(_row(case, impl.name, ms, err, peak, **info, **(extra or {})))
            except Exception as e:  # keep the run going; the row says what broke
                rows.append(_row(case, impl.name, None, None, None, **(extra or {}),
                                 error=f"{type(e).__name__}: {str(e)[:200]}"))
            finally:
                runner = fn = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if on_rows:
            if bar:
                bar.clear()
            on_rows(rows)
    if bar:
        bar.close()
    return rows

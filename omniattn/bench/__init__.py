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


def _row(case: Case, impl: str, ms: Optional[float], err: Optional[float], peak: Optional[float], **extra) -> dict:
    row = {
        "op": case.op,
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
                err = ref.error(runner, case, dout)
                fn = step(runner, case, dout)
                ms = time_ms(fn, device, runner.leaves)
                peak = peak_memory_mb(fn, device, runner.leaves)
                info = {}
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

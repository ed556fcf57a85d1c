"""Bench output: a progress line while it runs, a table, DESIGN.md's JSON results, a PNG chart."""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections import defaultdict
from typing import Iterable, Optional

import torch

ROW_KEYS = ("op", "impl", "mode", "dtype", "batch", "seqlen", "heads", "head_dim", "causal", "ms", "tflops", "max_err")


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 30):
        self.total, self.done, self.stream, self.width = max(total, 1), 0, stream, width
        self.start = time.perf_counter()

    def update(self, label: str) -> None:
        self.done += 1
        filled = int(self.width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {elapsed:5.0f}s  {label[:60]:<60}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def results_document(device_name: str, rows: list[dict]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name,
        "torch": torch.__version__.split("+")[0],
        "triton": triton_version,
        "date": datetime.date.today().isoformat(),
        "rows": rows,
    }


def write_json(path: str, device_name: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(results_document(device_name, rows), f, indent=1)
        f.write("\n")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: Iterable[dict]) -> str:
    """Rows grouped by problem, with each implementation's speed relative to the problem's baseline
    (SDPA where it ran, else the first non-omniattn implementation)."""
    groups = defaultdict(list)
    for r in rows:
        key = (r["op"], r.get("varlen", False), r["batch"], r["seqlen"], r["heads"], r.get("kv_heads"), r["head_dim"],
               r["causal"], r["mode"], r["dtype"], r.get("rab"), r.get("targets"))
        groups[key].append(r)
    lines = [
        f"{'problem':<50} {'impl':<15} {'ms':>9} {'TFLOPS':>8} {'vs base':>8} {'max_err':>9} {'peak MB':>9}"
    ]
    for key, rs in groups.items():
        op, varlen, b, n, h, hkv, d, causal, mode, dtype, rab, targets = key
        problem = f"{op} {'varlen ' if varlen else ''}{b}x{n} h{h}{'/' + str(hkv) if hkv else ''} d{d} {dtype}"
        problem += (" causal" if causal else "") + (" rab" if rab else "") + (f" t{targets}" if targets else "") + f" {mode}"
        base = next((r for r in rs if r["impl"].startswith("sdpa")), None) or next((r for r in rs if r["impl"] != "omniattn"), None)
        for r in rs:
            ratio = base["ms"] / r["ms"] if base and r["ms"] else None
            lines.append(
                f"{problem:<50} {r['impl']:<15} {_fmt(r['ms'], '9.3f'):>9} {_fmt(r['tflops'], '8.1f'):>8} "
                f"{_fmt(ratio, '7.2f') + 'x' if ratio else '-':>8} {_fmt(r['max_err'], '9.1e'):>9} "
                f"{_fmt(r.get('peak_mb'), '9.1f'):>9}"
            )
            problem = ""
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: Optional[str] = None) -> None:
    """Grouped bars of TFLOPS per problem and implementation, one panel per (op, mode)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'omniattn[plot]'") from e
    panels = defaultdict(list)
    for r in rows:
        panels[(r["op"], r["mode"])].append(r)
    keys = sorted(panels)
    fig, axes = plt.subplots(len(keys), 1, figsize=(12, 2.8 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        rs = panels[key]
        problems = list(dict.fromkeys(_problem_label(r) for r in rs))
        impls = list(dict.fromkeys(r["impl"] for r in rs))
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, p in enumerate(problems):
                hit = next((r for r in rs if r["impl"] == impl and _problem_label(r) == p), None)
                if hit and hit["tflops"]:
                    xs.append(j + i * width)
                    ys.append(hit["tflops"])
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(problems))])
        ax.set_xticklabels(problems, fontsize=7)
        ax.set_ylabel("TFLOPS")
        ax.set_title(f"{key[0]} {key[1]}", fontsize=9)
        ax.legend(fontsize=7, ncol=len(impls))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _problem_label(r: dict) -> str:
    shape = f"{'varlen ' if r.get('varlen') else ''}{r['batch']}x{r['seqlen']}"
    return shape + (" causal" if r["causal"] else "") + (" rab" if r.get("rab") else "") + (f" t{r['targets']}" if r.get("targets") else "")

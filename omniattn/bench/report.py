"""Bench output: a progress line while it runs, a table, DESIGN.md's JSON results, a PNG chart."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
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

    def clear(self) -> None:
        """Erase the bar, so that lines printed to the same terminal are not mixed into it."""
        self.stream.write("\r" + " " * (self.width + 90) + "\r")
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


def _atomic_write(path: str, write) -> None:
    """``write(tmp_path)``, then rename over ``path``: an interrupted run never leaves half a file."""
    tmp = f"{path}.partial"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, device_name: str, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(results_document(device_name, rows), f, indent=1)
            f.write("\n")

    _atomic_write(path, write)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# The ratio column has one meaning everywhere (table, README): this row's time divided by the time
# of PyTorch's SDPA on the same shape. Below 1.00x omniattn is faster, above it slower. Sigmoid and
# SiLU rows are divided by SDPA's softmax time (the speed a user gives up by changing the score
# function); HSTU rows by SDPA with HSTU's mask materialised (sdpa-masked).
BASELINES = ("sdpa", "sdpa-flash", "sdpa-masked")
RATIO = "time/SDPA"

LEGEND = f"""\
columns: ms = median time of one call (fwd: forward; fwdbwd: forward + backward), milliseconds;
  TFLOPS = DESIGN.md's FLOP count / time; {RATIO} = this time / the time of PyTorch's SDPA on the same
  shape ({'/'.join(BASELINES[:2])}; for sigmoid/silu SDPA's softmax, for hstu sdpa-masked): 0.50x = twice
  as fast as SDPA, 2.00x = twice as slow; max_err = largest error of the output (and dq) against the
  float64 reference; peak MB = memory one call adds at its peak."""

HEADER = f"{'problem':<50} {'impl':<15} {'ms':>9} {'TFLOPS':>8} {RATIO:>9} {'max_err':>9} {'peak MB':>9}"


def problem_key(r: dict) -> tuple:
    """Rows of one problem share this key (implementation aside)."""
    return (r["op"], r.get("varlen", False), r["batch"], r["seqlen"], r["heads"], r.get("kv_heads"), r["head_dim"],
            r["causal"], r["mode"], r["dtype"], r.get("rab"), r.get("targets"), r.get("pv_accum"))


def _shape_key(r: dict) -> tuple:
    """The problem without its score function: softmax, sigmoid and silu rows of one shape match."""
    op = "hstu" if r["op"] == "hstu" else "attention"
    return (op,) + problem_key(r)[1:]


def baseline(r: dict, rows: Iterable[dict]) -> Optional[dict]:
    """The SDPA row ``r`` is compared with (see BASELINES), if this run measured one."""
    same = [x for x in rows if x.get("ms") and _shape_key(x) == _shape_key(r)]
    for name in BASELINES:
        hit = next((x for x in same if x["impl"] == name), None)
        if hit:
            return hit
    return None


def problem_label(r: dict) -> str:
    hkv = r.get("kv_heads")
    label = (f"{r['op']} {'varlen ' if r.get('varlen') else ''}{r['batch']}x{r['seqlen']} h{r['heads']}"
             f"{'/' + str(hkv) if hkv else ''} d{r['head_dim']} {r['dtype']}")
    label += (" causal" if r["causal"] else "") + (" rab" if r.get("rab") else "")
    label += (f" t{r['targets']}" if r.get("targets") else "") + (f" pv {r['pv_accum']}" if r.get("pv_accum") else "")
    return label + f" {r['mode']}"


def problem_lines(rs: list[dict], context: Iterable[dict]) -> list[str]:
    """Table lines of one problem's rows; ``context`` (all rows so far) supplies the SDPA baseline."""
    context = list(context)
    lines, label = [], problem_label(rs[0])
    for r in rs:
        base = baseline(r, context)
        ratio = r["ms"] / base["ms"] if base and r.get("ms") else None
        lines.append(
            f"{label:<50} {r['impl']:<15} {_fmt(r['ms'], '9.3f'):>9} {_fmt(r['tflops'], '8.3g'):>8} "
            f"{_fmt(ratio, '8.2f') + 'x' if ratio else '-':>9} {_fmt(r['max_err'], '9.1e'):>9} "
            f"{_fmt(r.get('peak_mb'), '9.1f'):>9}"
        )
        label = ""
    return lines


def table(rows: Iterable[dict]) -> str:
    """Rows grouped by problem, each with its time relative to SDPA's (see LEGEND)."""
    rows = list(rows)
    groups = defaultdict(list)
    for r in rows:
        groups[problem_key(r)].append(r)
    lines = [HEADER]
    for rs in groups.values():
        lines += problem_lines(rs, rows)
    return "\n".join(lines)


def choose_metric(rows: list[dict], metric: str = "auto") -> str:
    """``ms`` or ``tflops``; auto: TFLOPS where they are large enough to compare (GPUs), else ms
    (a CPU's 0.05 TFLOPS bars are too small to read, its milliseconds are not)."""
    if metric != "auto":
        return metric
    tflops = sorted(r["tflops"] for r in rows if r.get("tflops"))
    return "tflops" if tflops and tflops[len(tflops) // 2] >= 1.0 else "ms"


OP_ORDER = {"softmax": 0, "sigmoid": 1, "silu": 2, "hstu": 3}


def plot(rows: list[dict], path: str, title: Optional[str] = None, metric: str = "auto") -> None:
    """Grouped bars per problem and implementation, one panel per (op, mode) that has numbers:
    milliseconds (log scale, lower is better) or TFLOPS (higher is better). One colour per
    implementation across panels, one legend above them, the title above the legend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'omniattn[plot]'") from e
    metric = choose_metric(rows, metric)
    panels = defaultdict(list)
    for r in rows:
        if r.get(metric):
            panels[(r["op"], r["mode"])].append(r)
    keys = sorted(panels, key=lambda k: (OP_ORDER.get(k[0], len(OP_ORDER)), k))
    # omniattn first, then the SDPA baselines, then the rest: the comparison reads left to right
    impls = sorted(dict.fromkeys(r["impl"] for k in keys for r in panels[k]),
                   key=lambda i: 0 if i == "omniattn" else 1 if i.startswith("sdpa") else 2)
    colours = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(max(len(keys), 1), 1, figsize=(12, 1.2 + 2.4 * max(len(keys), 1)), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes[:, 0], keys):
        _panel(ax, panels[key], key, metric, colours)
    if keys:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in impls]
        fig.legend(handles, impls, loc="outside lower center", ncol=len(impls), fontsize=8, frameon=False)
    else:
        axes[0, 0].text(0.5, 0.5, "no measurements yet", ha="center", va="center")
        axes[0, 0].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _panel(ax, rs: list[dict], key: tuple, metric: str, colours: dict) -> None:
    from matplotlib.ticker import FuncFormatter

    with_dim = len({r.get("head_dim") for r in rs}) > 1  # (else D=64 and D=128 rows would share a bar group)
    problems = list(dict.fromkeys(_problem_label(r, with_dim) for r in rs))
    impls = [i for i in colours if any(r["impl"] == i for r in rs)]
    width = 0.8 / max(len(impls), 1)
    values = []
    for j, p in enumerate(problems):
        hits = [r for i in impls for r in rs if r["impl"] == i and _problem_label(r, with_dim) == p]
        for k, r in enumerate(hits):  # the problem's bars side by side, centred on its tick
            bar = ax.bar(j + (k - (len(hits) - 1) / 2) * width, r[metric], width, color=colours[r["impl"]])
            ax.bar_label(bar, labels=[_short(r[metric])], fontsize=6, padding=1)
            values.append(r[metric])
    ax.set_xticks(range(len(problems)))
    ax.set_xticklabels(problems, fontsize=7)
    ax.set_xlim(-0.5, max(len(problems), 3) - 0.5)  # a lone problem gets bars of normal width
    if metric == "ms":
        # Log scale: one panel holds N=1024 and N=16384 (300x apart). Bars start well below the
        # smallest value so that every bar is visible; plain numbers on the axis, not powers of 10.
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 4, max(values) * 3)
        plain = FuncFormatter(lambda y, _: f"{y:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
        ax.set_ylabel("ms (log; lower is better)", fontsize=8)
    else:
        ax.set_ylim(0, max(values) * 1.2)
        ax.set_ylabel("TFLOPS (higher is better)", fontsize=8)
    ax.set_title(f"{key[0]} {key[1]}", fontsize=9)


def _short(x: float) -> str:
    """Three significant digits without exponents: 1270, 13.6, 0.0401."""
    return f"{x:.0f}" if x >= 1000 else f"{x:.3g}"


def _problem_label(r: dict, with_dim: bool = False) -> str:
    shape = f"{'varlen ' if r.get('varlen') else ''}{r['batch']}x{r['seqlen']}"
    shape += f" d{r.get('head_dim')}" if with_dim else ""
    return shape + (" causal" if r["causal"] else "") + (" rab" if r.get("rab") else "") + (f" t{r['targets']}" if r.get("targets") else "")

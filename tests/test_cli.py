"""The `omniattn` command: info, check (must fail on a wrong backend), bench and its outputs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from omniattn import cli
from omniattn.backends import torch_tiled

KEYS = {"op", "impl", "mode", "dtype", "batch", "seqlen", "heads", "head_dim", "causal", "ms", "tflops", "max_err"}


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "auto       -> torch" in out and "HSTU relative position" in out


def test_check_passes(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "match the reference" in out


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    real = torch_tiled._forward

    def off_by_a_little(*args):
        out, lse = real(*args)
        return out * 1.001, lse

    monkeypatch.setattr(torch_tiled, "_forward", off_by_a_little)
    assert cli.main(["check"]) == 1
    assert "MISMATCH (out)" in capsys.readouterr().out


def test_bench_writes_results_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "cpu.json", tmp_path / "cpu.png"
    assert cli.main(["bench", "--suite", "smoke", "--no-progress", "--json", str(path), "--plot", str(png)]) == 0
    doc = json.loads(path.read_text())
    assert {"device", "torch", "triton", "date", "rows"} <= set(doc)
    rows = doc["rows"]
    assert {r["impl"] for r in rows} >= {"omniattn", "sdpa", "torch-eager"}
    for r in rows:
        assert KEYS <= set(r) and "error" not in r, r
        if r["impl"] == "sdpa-masked":  # softmax with HSTU's mask: a speed reference, no error reported
            assert r["max_err"] is None
        else:
            assert r["ms"] > 0 and r["max_err"] < 1e-4, r
    assert {r["impl"] for r in rows if r["op"] == "hstu"} == {"omniattn", "sdpa-masked", "torch-eager"}
    assert any(r.get("varlen") and r["kv_heads"] == 2 for r in rows)
    assert png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "omniattn" in table and "TFLOPS" in table
    assert cli.main(["plot", str(path), str(tmp_path / "again.png")]) == 0


def test_bench_reports_a_wrong_result_as_a_large_error(monkeypatch, tmp_path):
    real = torch_tiled._forward
    monkeypatch.setattr(torch_tiled, "_forward", lambda *a: (real(*a)[0] + 0.1, real(*a)[1]))
    path = tmp_path / "bad.json"
    cli.main(["bench", "--suite", "smoke", "--op", "silu", "hstu", "--impl", "omniattn", "--no-progress", "--json",
              str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["max_err"] >= 0.09 for r in rows)


def test_entry_point_runs_as_module():
    done = subprocess.run([sys.executable, "-m", "omniattn.cli", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "omniattn" in done.stdout


def test_bench_cases_count_flops_like_design():
    from omniattn.bench.suites import Case

    full = Case("softmax", 4, 4096, 16, 128, False, "fwd")
    assert full.flops() == 4 * 4 * 16 * 4096**2 * 128
    assert Case("softmax", 4, 4096, 16, 128, True, "fwdbwd").flops() == full.flops() / 2 * 3.5
    assert torch.bfloat16 == full.torch_dtype


# ----------------------------------------------------------------- issue 14: a CLI that speaks plainly


def _one_line(text: str) -> str:
    assert "Traceback" not in text and text.strip() and "\n" not in text.strip(), text
    return text.strip()


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a mistake only on machines without a GPU")

MISTAKES = [
    pytest.param(["check", "--backend", "triton"], "--backend triton: not available here", marks=NO_CUDA),
    pytest.param(["info", "--device", "cuda"], "--device cuda: this machine has no CUDA GPU", marks=NO_CUDA),
    (["info", "--device", "tpu9"], "--device tpu9: expected a device such as cpu"),
    (["bench", "--impl", "omniattn", "nope"], "--impl nope: unknown; expected some of omniattn"),
    (["bench", "--suite", "smoke", "--op", "hstu", "--max-seqlen", "8"], "has no problems"),
    (["bench", "--json", "/nonexistent-folder/x.json"], "the folder /nonexistent-folder does not exist"),
    (["plot", "/nonexistent.json", "out.png"], "/nonexistent.json: no such results file"),
    (["recsys", "train", "--resume"], "--resume: continues from --checkpoint PATH"),
    (["recsys", "eval", "--checkpoint", "/nonexistent.pt"], "/nonexistent.pt: no such checkpoint file"),
    (["recsys", "train", "--model", "sasrec", "--heads", "3"], "--heads 3: SASRec splits --dim 50"),
]


@pytest.mark.parametrize("argv, words", MISTAKES, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_user_mistakes_end_in_one_line_and_exit_2(monkeypatch, capsys, argv, words):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU as users have it: no interpreter
    assert cli.main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("omniattn: error: ") and words in err, err


@pytest.mark.parametrize("argv, words", [
    (["bench", "--threads", "0"], "argument --threads: expected an int >= 1, got '0'"),
    (["recsys", "train", "--lr", "nan"], "argument --lr: expected a number > 0, got 'nan'"),
    (["recsys", "train", "--dropout", "1.5"], "expected a number >= 0 and < 1, got '1.5'"),
    (["check", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["bench", "--background-load", "-1"], "expected an int >= 0"),
])
def test_bad_argument_values_are_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = _one_line(capsys.readouterr().err)
    assert words in err and "--help" in err, err


def test_plot_of_a_broken_results_file(tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text('{"rows": [')
    assert cli.main(["plot", str(bad), str(tmp_path / "o.png")]) == 2
    assert f"{bad}:1: expected a results JSON file, found invalid JSON" in _one_line(capsys.readouterr().err)


def test_help_shows_defaults(capsys):
    for argv, defaults in ((["recsys", "train"], ["(default: 20)", "(default: synthetic)", "(default: 0.05)"]),
                           (["bench"], ["(default: 0)"]), (["check"], ["(default: fp32)"])):
        with pytest.raises(SystemExit):
            cli.main(argv + ["--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert all(d in out for d in defaults), (argv, out)


def test_bench_prints_and_saves_each_problem_as_it_finishes(tmp_path, monkeypatch, capsys):
    """Rows appear (and the JSON and the plot are rewritten) after every problem, not at the end."""
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "r.json", tmp_path / "r.png"
    seen = []
    real = cli._LiveOutput.__call__

    def spy(self, rows):
        real(self, rows)
        seen.append((capsys.readouterr().out, len(json.loads(path.read_text())["rows"]), png.exists(), len(rows)))

    monkeypatch.setattr(cli._LiveOutput, "__call__", spy)
    argv = ["bench", "--suite", "smoke", "--op", "softmax", "sigmoid", "--impl", "omniattn", "sdpa", "--no-progress",
            "--json", str(path), "--plot", str(png)]
    assert cli.main(argv) == 0
    assert len(seen) == 5  # softmax fwd, fwdbwd, sigmoid fwd, fwdbwd, softmax varlen fwdbwd
    first_out = seen[0][0]
    assert "time/SDPA = this time / the time of PyTorch's SDPA" in first_out  # the legend, before any row
    assert "softmax 1x128 h2 d32 fp32 causal fwd " in first_out and "sigmoid 1x128" not in first_out
    for out, saved, plotted, total in seen:
        assert saved == total and plotted  # the files hold every row measured so far


def test_ratio_column_is_time_over_sdpa_time():
    from omniattn.bench.report import table

    base = dict(op="softmax", mode="fwd", dtype="fp32", batch=1, seqlen=64, heads=2, head_dim=8, causal=True,
                tflops=0.01, max_err=0.0)
    rows = [dict(base, impl="omniattn", ms=3.0), dict(base, impl="sdpa", ms=2.0),
            dict(base, op="sigmoid", impl="omniattn", ms=1.0)]
    lines = table(rows).splitlines()
    assert "time/SDPA" in lines[0]
    assert "1.50x" in lines[1] and "1.00x" in lines[2]  # 3 ms vs SDPA's 2 ms: takes 1.5x SDPA's time
    assert "0.50x" in lines[3]  # sigmoid against SDPA's softmax of the same shape


def test_bench_threads_and_background_load(tmp_path):
    import multiprocessing

    path = tmp_path / "r.json"
    threads = torch.get_num_threads()
    argv = ["bench", "--suite", "smoke", "--op", "softmax", "--impl", "omniattn", "--max-seqlen", "128",
            "--threads", "1", "--background-load", "1", "--no-progress", "--json", str(path)]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["threads"] == 1 and r["background_load"] == 1 for r in rows)
    assert torch.get_num_threads() == threads  # main() as a function restores it
    assert not multiprocessing.active_children()  # the busy workers stopped with the run


def test_background_load_keeps_the_cores_busy():
    import time

    from omniattn.bench.load import background_load

    def cpu_seconds(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("needs Linux /proc")
    with background_load(2) as workers:
        start = [cpu_seconds(w.pid) for w in workers]
        time.sleep(0.5)
        used = [cpu_seconds(w.pid) - s for w, s in zip(workers, start)]
    assert all(u > 0.1 for u in used), used  # each worker computed, not slept
    assert not any(w.is_alive() for w in workers)


def test_cpu_plot_shows_milliseconds_in_every_panel_and_the_titles_apart(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    from omniattn.bench import report

    rows = []
    for op, mode in (("softmax", "fwd"), ("softmax", "fwdbwd"), ("silu", "fwd")):
        for impl, ms in (("omniattn", 40.0), ("torch-eager", 90.0)):
            for n in (1024, 16384):
                rows.append(dict(op=op, mode=mode, impl=impl, batch=1, seqlen=n, heads=8, head_dim=64, causal=False,
                                 dtype="fp32", ms=ms * n / 1024, tflops=0.0, max_err=1e-6))  # 0.0: rounded away
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    report.plot(rows, str(tmp_path / "p.png"), title="a CPU (2 threads)")
    (fig,) = figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(axes) == 3
    for ax in axes:
        assert len(ax.patches) == 4 and "ms" in ax.get_ylabel()  # every bar drawn, in milliseconds
    top = fig._suptitle.get_window_extent(renderer)
    for ax in axes:
        assert not top.overlaps(ax.title.get_window_extent(renderer)), ax.get_title()
    assert (tmp_path / "p.png").stat().st_size > 10_000



def test_plot_keeps_head_dims_apart(tmp_path, monkeypatch):
    """Rows of one shape at two head dims are two bar groups, each labelled with its dim."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from omniattn.bench import report

    rows = [dict(op="softmax", mode="fwd", impl=impl, batch=4, seqlen=4096, heads=16, head_dim=d, causal=False,
                 dtype="bf16", ms=1.0, tflops=t, max_err=1e-3)
            for d, t in ((128, 600.0), (64, 400.0)) for impl in ("omniattn", "sdpa-cudnn")]
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    report.plot(rows, str(tmp_path / "p.png"))
    (ax,) = [ax for ax in figures[0].axes if ax.get_title()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4x4096 d128", "4x4096 d64"]
    assert len(ax.patches) == 4

NO_TRITON = """
import sys
sys.modules["triton"] = None  # as on a machine without triton: import fails, find_spec() is None
import torch, omniattn as oa
from omniattn import cli
import omniattn.bench, omniattn.recsys
q = torch.randn(1, 33, 2, 16)
assert oa.attention(q, q, q, causal=True).shape == q.shape
assert cli.main(["info"]) == 0
assert cli.main(["check", "--backend", "triton"]) == 2
assert sys.modules["triton"] is None
"""


def test_works_without_triton_installed():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "triton     unavailable: triton is not installed" in done.stdout
    assert "--backend triton: not available here (triton is not installed)" in done.stderr


def test_triton_is_an_extra_and_numpy_a_dependency():
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = lambda reqs: {r.split(";")[0].split(">")[0].split("=")[0].strip() for r in reqs}  # noqa: E731
    assert "triton" not in names(project["dependencies"]) and "numpy" in names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "triton" in names(extras["triton"]) and "triton" in names(extras["test"])  # CI's '.[test]' keeps it

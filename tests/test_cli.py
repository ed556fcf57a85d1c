"""The `omniattn` command: info, check (must fail on a wrong backend), bench and its outputs."""

import json
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

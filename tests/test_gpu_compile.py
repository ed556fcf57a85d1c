"""The Triton kernels compiled for the H100 (sm_90) on a machine without a GPU.

The interpreter runs kernels as Python and never type-checks them, so variants that only the GPU
builds can break unseen (two such bugs: returns of different types under a constexpr branch, for
non-square tiles and for 64-bit offsets). ``benchmarks/aot_compile.py`` builds those variants ahead
of time with a stand-in launcher (no kernel runs; the compile must succeed), in a fresh process:
whether a kernel is interpreted is fixed when it is defined, and this suite defines them under
TRITON_INTERPRET=1.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _compile(*args: str) -> list[list[str]]:
    """Run benchmarks/aot_compile.py with ``args`` in a fresh process; the VARIANT lines it prints."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_compile.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("VARIANT ")]


@pytest.mark.parametrize("addressing", ["int32", "int64"])
def test_hstu_with_bias_compiles_for_sm90_on_long_sequences(addressing):
    """Sequences >= 2048 take 128x64 tiles (non-square); the relative bias, read from the call's
    table (rab_cache) and per pair; 64-bit addressing; the dK/dV kernel over query windows
    (context-parallel HSTU)."""
    variants = _compile("--hstu-long", addressing)
    names = {v[0] for v in variants}
    assert {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "rab_cache_kernel"} <= names
    for cached in (True, False):  # with the bias: read from the table, computed per pair
        assert ["attn_fwd_kernel", "128x64", f"INT64_OFFSETS={addressing == 'int64'}", "HAS_Q_WIN=None",
                "HAS_RAB=True", f"RAB_CACHED={cached}"] in variants
        assert any(v[0] == "attn_bwd_dkdv_kernel" and v[-2:] == ["HAS_RAB=True", f"RAB_CACHED={cached}"]
                   for v in variants)
    assert any(v[0] == "attn_bwd_dkdv_kernel" and v[-3] == "HAS_Q_WIN=True" for v in variants)  # query windows


def test_tma_forward_compiles_for_sm90():
    """Hopper's forward loads K/V through tensor descriptors made in the kernel (softmax and
    sigmoid, dense and varlen, a head dim below the tile's; the quantized precisions with their
    quantization kernels): the interpreter never takes the GPU's path."""
    variants = _compile("--tma")
    kernels = [v[:6] for v in variants]  # without the byte-store count
    for varlen in ("False", "True"):
        for score in ("0", "1"):  # softmax, sigmoid
            assert ["attn_fwd_kernel", "USE_TMA=True", f"IS_VARLEN={varlen}", f"SCORE={score}", "QK_MODE=0",
                    "PV_FP8=False"] in kernels
    for mode, fp8 in (("1", "False"), ("1", "True"), ("3", "True"), ("2", "True")):  # int8, int8-fp8, fp8, int4-fp8
        assert ["attn_fwd_kernel", "USE_TMA=True", "IS_VARLEN=False", "SCORE=0", f"QK_MODE={mode}",
                f"PV_FP8={fp8}"] in kernels
    # packed FP8 V^T (sequences on 16-byte columns), whose quantization stores whole 16-byte
    # columns: with a per-token mask it stored single bytes, 18x slower on the H100
    assert ["attn_fwd_kernel", "USE_TMA=True", "IS_VARLEN=True", "SCORE=0", "QK_MODE=1", "PV_FP8=True"] in kernels
    assert {"kv_stats_kernel", "kv_stats_finish_kernel", "quant_kv_kernel", "quant_q_kernel"} <= {v[0] for v in variants}
    packed_vt = [v for v in variants if v[0] == "quant_kv_kernel" and v[2] == "IS_VARLEN=True" and v[5] == "PV_FP8=True"]
    assert packed_vt and all(v[6] == "BYTE_STORES=0" for v in packed_vt)


def test_hopper_gluon_kernels_compile_for_sm90():
    """Hopper's Gluon forward and backward (fwd_sm90, bwd_sm90: warp-specialized, TMA, asynchronous
    wgmma, dQ by TMA reductions): every score function, causal or not, dense and packed, a sliding
    window, softcap and ALiBi (forward), HSTU's masks and the quantized precisions (forward),
    reached through the public API with the launch rules forced (no GPU here, so the rules
    themselves would say no)."""
    try:
        from omniattn.backends.triton import fwd_sm90  # noqa: F401
    except (ImportError, AttributeError):
        pytest.skip("this Triton has no Gluon for Hopper")
    variants = _compile("--sm90")
    window = [v[:7] for v in variants if v[7] == "MASK_KIND=0"]
    for score in ("0", "1", "2"):
        for causal in ("False", "True"):
            for varlen in ("False", "True"):
                assert ["attn_fwd_sm90_kernel", f"SCORE={score}", "HAS_LEFT=False", f"HAS_RIGHT={causal}",
                        "HAS_SOFTCAP=False", "HAS_ALIBI=False", f"IS_VARLEN={varlen}"] in window
    for left, right, softcap, alibi in (("True", "True", "False", "False"), ("True", "True", "True", "False"),
                                         ("False", "True", "False", "True")):
        assert ["attn_fwd_sm90_kernel", "SCORE=0", f"HAS_LEFT={left}", f"HAS_RIGHT={right}", f"HAS_SOFTCAP={softcap}",
                f"HAS_ALIBI={alibi}", "IS_VARLEN=False"] in window
    hstu = [v[7:12] for v in variants if v[7] == "MASK_KIND=1" and v[1] == "SCORE=2" and v[6] == "IS_VARLEN=True"]
    for causal, targets, context in (("True", "False", "False"), ("True", "True", "False"), ("False", "False", "True")):
        assert ["MASK_KIND=1", f"HSTU_CAUSAL={causal}", f"HAS_TARGETS={targets}", f"HAS_CONTEXT={context}",
                f"HAS_MAX_ATTN={context}"] in hstu
    # quantized forwards: INT8 Q.K with 16-bit or FP8 P.V, FP8 Q.K, every score, causal or not; packed; HSTU
    quant = [(v[1], v[3], v[6], v[12], v[13]) for v in variants
             if v[0] == "attn_fwd_sm90_kernel" and v[12] != "QK_MODE=0"]
    for mode, fp8 in (("1", "False"), ("1", "True"), ("3", "True")):
        for score in ("0", "1", "2"):
            for causal in ("False", "True"):
                assert (f"SCORE={score}", f"HAS_RIGHT={causal}", "IS_VARLEN=False", f"QK_MODE={mode}",
                        f"PV_FP8={fp8}") in quant
    assert ("SCORE=0", "HAS_RIGHT=True", "IS_VARLEN=True", "QK_MODE=1", "PV_FP8=True") in quant
    assert any(v[7:9] == ["MASK_KIND=1", "HSTU_CAUSAL=True"] and v[12] == "QK_MODE=1" for v in variants)
    # head dim 256 (one Q slot, 64-key tiles): every score, causal or not, dense; packed causal
    wide = [(v[1], v[3], v[6]) for v in variants if v[0] == "attn_fwd_sm90_kernel" and v[15] == "HEAD_DIM=256"]
    for score in ("0", "1", "2"):
        for causal in ("False", "True"):
            assert (f"SCORE={score}", f"HAS_RIGHT={causal}", "IS_VARLEN=False") in wide
    assert ("SCORE=0", "HAS_RIGHT=True", "IS_VARLEN=True") in wide
    # the backward (bwd_sm90) of every call above but softcap's and ALiBi's (the template's)
    backward = [v[1:12] for v in variants if v[0] == "attn_bwd_sm90_kernel"]
    for score in ("0", "1", "2"):
        for causal in ("False", "True"):
            for varlen in ("False", "True"):
                assert [f"SCORE={score}", "HAS_LEFT=False", f"HAS_RIGHT={causal}", "HAS_SOFTCAP=None", "HAS_ALIBI=None",
                        f"IS_VARLEN={varlen}", "MASK_KIND=0", "HSTU_CAUSAL=False", "HAS_TARGETS=False",
                        "HAS_CONTEXT=False", "HAS_MAX_ATTN=False"] in backward
    assert any(v[1] == "HAS_LEFT=True" and v[2] == "HAS_RIGHT=True" for v in backward)  # the sliding window
    for causal, targets, context in (("True", "False", "False"), ("True", "True", "False"), ("False", "False", "True")):
        assert ["SCORE=2", "HAS_LEFT=False", "HAS_RIGHT=False", "HAS_SOFTCAP=None", "HAS_ALIBI=None", "IS_VARLEN=True",
                "MASK_KIND=1", f"HSTU_CAUSAL={causal}", f"HAS_TARGETS={targets}", f"HAS_CONTEXT={context}",
                f"HAS_MAX_ATTN={context}"] in backward

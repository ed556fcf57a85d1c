"""The Triton kernels compiled for the H100 (sm_90) on a machine without a GPU.

The interpreter runs kernels as Python and never type-checks them, so variants that only the GPU
builds can break unseen (two such bugs: returns of different types under a constexpr branch, for
non-square tiles and for 64-bit offsets). This builds those variants ahead of time with
``benchmarks/aot_compile.py``'s stand-in launcher: no kernel runs, the compile must succeed.
"""

import importlib.util
import os
import pathlib

import pytest
import torch

import omniattn as oa

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def aot(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("aot_compile", ROOT / "benchmarks" / "aot_compile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from omniattn import backends
    from omniattn.backends import triton as tb
    from omniattn.backends.triton import bwd, fwd, launch

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    for m, name in ((fwd, "attn_fwd_kernel"), (bwd, "attn_bwd_dkdv_kernel"), (bwd, "attn_bwd_dq_kernel"),
                    (bwd, "attn_bwd_preprocess_kernel"), (bwd, "rab_grad_reduce_kernel")):
        monkeypatch.setattr(launch, name, mod.Compiling(getattr(m, name)))
    monkeypatch.setattr(tb, "supported", lambda device, explicit=False: (True, ""))
    monkeypatch.setattr(backends, "triton_supported", lambda device, explicit=False: (True, ""))
    mod.SEEN.clear()
    return mod, launch


@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64-offsets"])
def test_hstu_with_bias_compiles_for_sm90_on_long_sequences(aot, monkeypatch, int64):
    """Sequences >= 2048 take 128x64 tiles (non-square); the relative bias; 64-bit addressing."""
    mod, launch = aot
    if int64:
        monkeypatch.setattr(launch, "_needs_int64", lambda *args: True)
    n = 2100
    offsets = torch.tensor([0, n, n + 50])
    q = torch.randn(n + 50, 2, 128).to(torch.bfloat16).requires_grad_()
    rab = oa.hstu.RelativeBias(n, 16)
    out = oa.hstu_attention(q, q, q, offsets, n, backend="triton", rab=rab, timestamps=torch.arange(n + 50))
    out.sum().backward()
    names = {key[0] for key in mod.SEEN}
    assert {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"} <= names
    assert any(dict(key[1]).get("BLOCK_M") == "128" and dict(key[1]).get("BLOCK_N") == "64" for key in mod.SEEN)
    assert all(dict(key[1]).get("INT64_OFFSETS", "False") == str(int64) for key in mod.SEEN if key[0] == "attn_fwd_kernel")

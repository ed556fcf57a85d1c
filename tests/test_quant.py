"""Quantized precisions: the quantization kernels against the PyTorch maths (tight), the Triton
quantized attention against the CPU emulation (tight), every precision x score against exact
attention on outlier-key inputs (cosine), and the errors a user can hit.

Triton runs under TRITON_INTERPRET=1 on CI (fp8 and int8 products are exact there)."""


import pytest
import torch

import omniattn as oa
from omniattn.backends.triton import supported
from omniattn.quant.config import QK_MODE, QuantConfig
from omniattn.quant.quantize import VT_ALIGN, _layout, packed_vt_tokens, quantize_torch, quantize_triton, unpack_int4
from .helpers import PoisonedTorch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_ok = supported(torch.device(DEVICE), explicit=True)[0]
PRECISIONS = ["int8", "int8-fp8", "fp8", "int4-fp8"]
# What each precision reaches on outlier-key inputs (per-token scales; CPU emulation, the same
# maths): INT8 meets the bar (cosine >= 0.9999, relative L1 <= 0.01); FP8 P.V is bounded by
# e4m3's 3 mantissa bits (~0.9993 / 0.037); INT4 Q.K by its 15 levels (~0.985 / 0.17). Each bar
# sits just below the measured level, so a real defect (wrong scale, wrong channel) still fails.
ACCURACY = {"int8": (0.9999, 0.0105), "int8-fp8": (0.999, 0.045), "fp8": (0.998, 0.06), "int4-fp8": (0.98, 0.2)}


def offset_keys(shape_q, shape_k, gen, dtype=torch.float16, device=DEVICE, varlen_lens=None):
    """q, k, v with a per-channel key offset of std 3 (the outlier pattern real LLM keys have)."""
    q = torch.randn(shape_q, generator=gen) .to(dtype).to(device)
    k = torch.randn(shape_k, generator=gen)
    k = (k + 3 * torch.randn(k.shape[-1], generator=gen)).to(dtype).to(device)
    v = torch.randn(shape_k, generator=gen).to(dtype).to(device)
    return q, k, v


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


@pytest.mark.skipif(not triton_ok, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig("per_warp", smooth_q=True), QuantConfig("per_thread", False)],
                         ids=["block", "warp-smoothq", "thread-nosmooth"])
@pytest.mark.parametrize("varlen", [False, True])
def test_quantization_kernels_match_the_pytorch_maths(monkeypatch, precision, cfg, varlen):
    from omniattn.quant import quantize

    monkeypatch.setattr(quantize, "torch", PoisonedTorch())
    gen = torch.Generator().manual_seed(QK_MODE[precision] * 7 + varlen)
    lens = [37, 5, 50]
    if varlen:
        q, k, v = offset_keys((sum(lens), 4, 32), (sum(lens), 2, 32), gen)
        cu, args = _cu(lens), (lens, lens, max(lens), max(lens))
    else:
        q, k, v = offset_keys((2, 45, 4, 32), (2, 45, 2, 32), gen)
        cu, args = None, ((45, 45), (45, 45), 45, 45)
    kw = dict(precision=precision, cfg=cfg, block_m=16, block_n=16, row_bias=True)
    got = quantize_triton(q, k, v, cu, cu, *args, **kw)
    want = quantize_torch(q, k, v, cu, cu, args[0], args[1], block_d=16 if precision == "int4-fp8" else 32, **kw)
    for name in ("q_scale", "k_scale", "v_scale", "row_bias", "q_mean"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:  # float32 sums in another order: ~1e-7 of the largest term
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6 * max(b.abs().max().item(), 1.0), msg=name)
    for name in ("q", "k", "v"):
        a, b = getattr(got, name), getattr(want, name)
        if name == "v" and varlen and a.dtype == torch.float8_e4m3fn:
            assert a.shape == b.shape and a.stride(-2) % VT_ALIGN == 0
            # each sequence's columns up to its next multiple of 16 are written, zeros past its end
            # (the attention kernel reads whole 16-token columns there); the columns between
            # sequences stay unwritten
            for s, n in enumerate(lens):
                first = (int(cu[s]) // VT_ALIGN + s) * VT_ALIGN
                pad = a[:, :, first + n:first - (-n // VT_ALIGN) * VT_ALIGN]
                assert pad.numel() and (pad.float() == 0).all()
            _, seq, pos = _layout(k, cu, lens)
            a, b = (packed_vt_tokens(t, cu, seq, pos).to(torch.float8_e4m3fn) for t in (a, b))
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.float(), b.float()
            # fp32 sums in another order may move an element across a rounding boundary: one step at most
            step = torch.maximum(a.abs(), b.abs()) / 8 + 2 ** -9
            assert ((a - b).abs() <= step).all() and (a != b).float().mean() < 1e-3, name
        else:
            a, b = (unpack_int4(a), unpack_int4(b)) if precision == "int4-fp8" else (a, b)
            assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 1e-3, name


@pytest.mark.skipif(not triton_ok, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
def test_statistics_over_many_chunks(monkeypatch):
    """K's mean and V's scales combine kv_stats_kernel's chunks in blocks of 16: 2-token chunks
    make 25 of them per sequence (the GPU's 256-token chunks do so above 4096 tokens)."""
    from omniattn.quant import quantize

    monkeypatch.setattr(quantize, "STATS_CHUNK", 2)
    gen = torch.Generator().manual_seed(11)
    lens = [37, 5, 50]
    q, k, v = offset_keys((sum(lens), 4, 32), (sum(lens), 2, 32), gen)
    cu, args = _cu(lens), (lens, lens, max(lens), max(lens))
    kw = dict(precision="int8-fp8", cfg=QuantConfig(), block_m=16, block_n=16, row_bias=True)
    got = quantize_triton(q, k, v, cu, cu, *args, **kw)
    want = quantize_torch(q, k, v, cu, cu, args[0], args[1], block_d=32, **kw)
    for name in ("v_scale", "row_bias"):
        b = getattr(want, name)
        torch.testing.assert_close(getattr(got, name), b, rtol=2e-6, atol=1e-6 * max(b.abs().max().item(), 1.0))


@pytest.fixture
def kernel_tiles(monkeypatch):
    """The tiled backend on the interpreter kernel's tiles (16 rows x 16 keys), so the emulation
    rounds P with the same running maxima as the kernel."""
    from omniattn.backends import torch_tiled

    monkeypatch.setattr(torch_tiled, "BLOCK_Q", 16)
    monkeypatch.setattr(torch_tiled, "TILE_ELEMS", 1)
    monkeypatch.setattr(torch_tiled, "MIN_BLOCK_K", 16)
    yield


@pytest.mark.skipif(not triton_ok or DEVICE != "cpu", reason="interpreter comparison (GPU: tests/gpu)")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_triton_quantized_attention_matches_the_emulation(kernel_tiles, precision, score):
    gen = torch.Generator().manual_seed(len(precision) * 3 + len(score))
    q, k, v = offset_keys((1, 40, 4, 32), (1, 40, 2, 32), gen, dtype=torch.float32)
    kw = dict(score=score, causal=True, precision=precision)
    got = oa.attention(q, k, v, backend="triton", **kw)
    emu = oa.attention(q, k, v, backend="torch", **kw)
    exact = oa.reference.attention(q, k, v, score=score, causal=True)
    gap = (got - emu).abs().max().item()
    err = (emu.double() - exact).abs().max().item()
    assert gap <= 0.01 * err + 1e-5, f"kernel vs emulation {gap:.2e}, emulation vs exact {err:.2e}"


@pytest.mark.skipif(not triton_ok or DEVICE != "cpu", reason="interpreter comparison (GPU: tests/gpu)")
@pytest.mark.parametrize("precision", ["int8", "int8-fp8"])
@pytest.mark.parametrize("varlen", [False, True])
def test_a_kept_quantized_plan_serves_new_tensors_and_holds_none(kernel_tiles, precision, varlen):
    """A quantized call signature's second call takes the plans the first made (its quantization
    passes' and its forward's) and computes with its own tensors (fresh inputs match the emulation);
    a kept plan holds none of a call's tensors (they are freed once the caller drops them)."""
    import gc
    import weakref

    from omniattn.backends.triton import launch

    gen = torch.Generator().manual_seed(31 + varlen)
    lens = [29, 3, 40]
    cu = _cu(lens)

    def call(backend, q, k, v):
        kw = dict(causal=True, precision=precision, backend=backend)
        if varlen:
            return oa.attention_varlen(q, k, v, cu, cu, 40, 40, **kw)
        return oa.attention(q, k, v, **kw)

    def fresh():
        return offset_keys((72, 4, 32) if varlen else (2, 36, 4, 32), (72, 2, 32) if varlen else (2, 36, 2, 32),
                           gen, dtype=torch.float32)

    kept, gone = None, []
    for _ in range(2):
        q, k, v = fresh()
        gone += [weakref.ref(t) for t in (q, k, v)]  # the first call's tensors made the plans
        got = call("triton", q, k, v)
        emu = call("torch", q, k, v)
        exact = (oa.reference.attention_varlen(q, k, v, cu, cu, 40, 40, causal=True) if varlen
                 else oa.reference.attention(q, k, v, causal=True))
        assert (got - emu).abs().max() <= 0.01 * (emu.double() - exact).abs().max() + 1e-5
        plans = dict(launch._PLANS)
        assert {key[0] for key in plans} == {"quantize", "forward"}
        assert kept is None or (plans.keys() == kept.keys() and all(plans[key] is kept[key] for key in kept))
        kept = plans
    del q, k, v, got, emu
    gc.collect()
    assert all(ref() is None for ref in gone)


@pytest.mark.skipif(not triton_ok or DEVICE != "cpu", reason="interpreter comparison (GPU: tests/gpu)")
@pytest.mark.parametrize("precision", ["int8", "int8-fp8"])
def test_triton_quantized_varlen_and_hstu_match_the_emulation(kernel_tiles, precision):
    gen = torch.Generator().manual_seed(7)
    lens = [37, 5, 21]
    cu = _cu(lens)
    q, k, v = offset_keys((63, 4, 32), (63, 2, 32), gen, dtype=torch.float32)
    kw = dict(causal=True, precision=precision)
    got = oa.attention_varlen(q, k, v, cu, cu, 37, 37, backend="triton", **kw)
    emu = oa.attention_varlen(q, k, v, cu, cu, 37, 37, backend="torch", **kw)
    exact = oa.reference.attention_varlen(q, k, v, cu, cu, 37, 37, causal=True)
    assert (got - emu).abs().max() <= 0.01 * (emu.double() - exact).abs().max() + 1e-5
    hq = q.repeat(1, 1, 1)
    kh = torch.cat([k, k], 1)
    with torch.no_grad():
        got = oa.hstu_attention(hq, kh, kh, cu, 40, num_targets=torch.tensor([2, 1, 3]), precision=precision,
                                backend="triton")
        emu = oa.hstu_attention(hq, kh, kh, cu, 40, num_targets=torch.tensor([2, 1, 3]), precision=precision,
                                backend="torch")
    assert (got - emu).abs().max() <= 1e-4 * max(emu.abs().max().item(), 1.0)


@pytest.mark.skipif(not triton_ok or DEVICE != "cpu", reason="interpreter comparison (GPU: tests/gpu)")
@pytest.mark.parametrize("precision", ["int8", "int8-fp8", "int4-fp8"])
def test_tma_loads_give_the_pointer_loads_results(monkeypatch, precision):
    """Hopper's quantized forward loads K and V (FP8's V^T included) by TMA; the interpreter runs
    that path when told to (a V head dim below the tile: zero-filled columns) and must give the
    pointer loads' results."""
    import triton

    from omniattn.backends.triton import launch

    gen = torch.Generator().manual_seed(11)
    q, k, v = offset_keys((1, 48, 4, 128), (1, 48, 2, 128), gen, dtype=torch.float32)
    v = v[..., :112].contiguous()
    asked = []
    with torch.no_grad():
        for score in ("softmax", "silu"):
            pointers = oa.attention(q, k, v, score=score, precision=precision, backend="triton")
            monkeypatch.setattr(launch, "_tma_ok", lambda *tensors: asked.append(tensors) or True)
            monkeypatch.setattr(launch, "_ensure_allocator", lambda: None)
            triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
            launch._PLANS.clear()  # the pointer-load call's plan is kept: the patched rule needs a new one
            tma = oa.attention(q, k, v, score=score, precision=precision, backend="triton")
            monkeypatch.undo()
            torch.testing.assert_close(tma, pointers, rtol=0, atol=1e-6)
    assert len(asked) == 2 and asked[0][0].dtype != torch.float32  # the quantized K went by TMA


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("layout", ["causal-gqa", "varlen"])
def test_every_precision_and_score_is_accurate_on_outlier_keys(precision, score, layout):
    gen = torch.Generator().manual_seed(11 + len(precision) + len(score) + len(layout))
    kw = dict(score=score, precision=precision, backend="torch")
    if layout == "varlen":
        lens = [70, 33, 90]
        q, k, v = offset_keys((sum(lens), 4, 64), (sum(lens), 4, 64), gen, device="cpu")
        cu = torch.tensor([0, 70, 103, 193])
        before = [t.clone() for t in (q, k, v)]
        got = oa.attention_varlen(q, k, v, cu, cu, 90, 90, causal=True, **kw)
        want = oa.reference.attention_varlen(q, k, v, cu, cu, 90, 90, score=score, causal=True)
    else:
        q, k, v = offset_keys((2, 120, 8, 64), (2, 120, 2, 64), gen, device="cpu")
        before = [t.clone() for t in (q, k, v)]
        got = oa.attention(q, k, v, causal=True, **kw)
        want = oa.reference.attention(q, k, v, score=score, causal=True)
    assert cosine(got, want) >= ACCURACY[precision][0]
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v))), "inputs modified"


def test_hstu_quantized_with_rab_and_targets():
    gen = torch.Generator().manual_seed(5)
    q, k, v = offset_keys((101, 2, 32), (101, 2, 32), gen, dtype=torch.float32, device="cpu")
    off = torch.tensor([0, 60, 101])
    rab = oa.hstu.RelativeBias(64, 32)
    ts = torch.randint(0, 10_000, (101,), generator=gen).sort().values
    kw = dict(num_targets=torch.tensor([3, 2]), rab=rab, timestamps=ts)
    with torch.no_grad():
        got = oa.hstu_attention(q, k, v, off, 64, precision="int8", backend="torch", **kw)
        want = oa.reference.hstu_attention(q, k, v, off, 64, **kw)
    assert cosine(got, want) >= 0.9999


def test_lse_of_smoothed_softmax_is_the_exact_lse():
    gen = torch.Generator().manual_seed(6)
    q, k, v = offset_keys((1, 50, 2, 32), (1, 50, 2, 32), gen, dtype=torch.float32, device="cpu")
    _, lse = oa.attention(q, k, v, precision="int8", backend="torch", return_lse=True)
    _, want = oa.reference.attention(q, k, v, return_lse=True)
    assert (lse.double() - want).abs().max() < 0.05


def test_quantized_calls_refuse_gradients_and_bad_choices():
    q = torch.randn(1, 20, 2, 32, requires_grad=True)
    with pytest.raises(ValueError, match="inference only"):
        oa.attention(q, q, q, precision="int8", backend="torch")
    with torch.no_grad():
        with pytest.raises(ValueError, match="int8-fp8"):
            x = torch.randn(1, 20, 2, 48)
            oa.attention(x, x, x, precision="int4-fp8", backend="torch")
        with pytest.raises(ValueError, match="backend='reference'"):
            oa.attention(q, q, q, precision="int8", backend="reference")
        with pytest.raises(ValueError, match="precision"):
            oa.attention(q, q, q, precision="int3")
        with pytest.raises(TypeError, match="quant_config"):
            oa.attention(q, q, q, precision="int8", quant_config={"granularity": "per_block"})
        with pytest.raises(ValueError, match="quant_config"):
            oa.attention(q, q, q, quant_config=oa.QuantConfig())
    with pytest.raises(ValueError, match="granularity"):
        oa.QuantConfig(granularity="per_row")


def test_auto_is_exact_on_the_cpu():
    q = torch.randn(1, 20, 2, 32)
    assert torch.equal(oa.attention(q, q, q, precision="auto", backend="torch"), oa.attention(q, q, q, backend="torch"))


@pytest.mark.skipif(not triton_ok, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("precision", ["int8", "int8-fp8"])
def test_inputs_whose_channels_are_strided(precision):
    """q, k and v whose last dimension is not contiguous give the same output as contiguous copies
    (the quantization kernels and the 16-bit P.V read rows whole)."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = offset_keys((1, 40, 2, 64), (1, 40, 2, 64), gen, dtype=torch.float32)
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
    assert all(t.stride(-1) != 1 for t in strided)
    with torch.no_grad():
        got = oa.attention(*strided, precision=precision, backend="triton")
        want = oa.attention(q, k, v, precision=precision, backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0)

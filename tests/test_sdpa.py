"""The SDPA drop-in: computes what users pass (padding masks as varlen, any mask, dropout, top-left
causal), never recurses once patched in, and falls back to PyTorch only for the truly
unsupported, warning once per reason and counting it."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import omniattn as oa
from omniattn import spec as _spec
from omniattn.api import _torch_sdpa
from omniattn.usage import stats

from .helpers import assert_tolerance, magnitude, rand


@pytest.fixture(autouse=True)
def fresh_stats():
    stats(reset=True)
    yield
    stats(reset=True)


def _qkv(gen, b, hq, hk, nq, nk, d, dv, dtype=torch.float32):
    q = rand((b, hq, nq, d), dtype, gen).requires_grad_()
    k = rand((b, hk, nk, d), dtype, gen).requires_grad_()
    v = rand((b, hk, nk, dv), dtype, gen).requires_grad_()
    return q, k, v


def _check_against_torch(q, k, v, gen, **kw):
    """Output and gradients of the drop-in vs PyTorch's own SDPA in float64 (DESIGN's tolerance rule:
    2x the error of PyTorch's same-dtype maths)."""
    got = oa.scaled_dot_product_attention(q, k, v, **kw)
    ref64 = _torch_sdpa(q.double(), k.double(), v.double(), **_cast_mask(kw, torch.float64))
    ref_same = _torch_sdpa(q, k, v, **kw)
    assert got.shape == ref64.shape and got.dtype == q.dtype
    assert_tolerance("out", got, ref64, ref_same, q.dtype)
    dout = rand(got.shape, q.dtype, gen)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    g64 = torch.autograd.grad(ref64, (q, k, v), dout.double())
    gs = torch.autograd.grad(ref_same, (q, k, v), dout)
    scale = magnitude(ref64, *g64)
    for name, g, r64, rs in zip(("dq", "dk", "dv"), grads, g64, gs):
        assert_tolerance(name, g, r64, rs, q.dtype, scale)


def _cast_mask(kw, dtype):
    m = kw.get("attn_mask")
    if m is None or m.dtype == torch.bool:
        return kw
    return {**kw, "attn_mask": m.to(dtype)}


def test_patched_in_never_recurses():
    """The issue's minimal case: with F.scaled_dot_product_attention replaced by the drop-in, a call
    that falls back (here a mask that needs a gradient) and a masked call both work."""
    gen = torch.Generator().manual_seed(11)
    q = rand((1, 2, 4, 8), torch.float32, gen)
    mask = torch.ones(4, 4, dtype=torch.bool)
    grad_mask = torch.zeros(4, 4, requires_grad=True)
    original = F.scaled_dot_product_attention
    try:
        F.scaled_dot_product_attention = oa.scaled_dot_product_attention
        got = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        with pytest.warns(UserWarning, match="requires grad"):
            fell = F.scaled_dot_product_attention(q, q, q, attn_mask=grad_mask)
    finally:
        F.scaled_dot_product_attention = original
    want = original(q, q, q, attn_mask=mask)
    assert (got - want).abs().max() < 1e-6
    assert torch.equal(fell, original(q, q, q, attn_mask=grad_mask))
    assert stats()["sdpa.fallback"] == 1 and stats()["sdpa"] == 1


@pytest.mark.parametrize("form", ["bool-b11k", "bool-b1qk", "float-inf", "float-min", "bool-11k"])
def test_key_padding_masks_run_as_varlen(form):
    gen = torch.Generator().manual_seed(12)
    b, hq, hk, nq, nk = 3, 4, 2, 13, 17
    q, k, v = _qkv(gen, b, hq, hk, nq, nk, 16, 12)
    keep = torch.rand(b, nk, generator=gen) > 0.35
    keep[:, 0] = True
    keep[1, 5:9] = False  # a hole inside a row: still only keys
    if form == "bool-11k":
        mask = keep[:1].view(1, 1, 1, nk)
    elif form == "bool-b11k":
        mask = keep.view(b, 1, 1, nk)
    elif form == "bool-b1qk":
        mask = keep.view(b, 1, 1, nk).expand(b, 1, nq, nk).contiguous()
    else:
        low = -math.inf if form == "float-inf" else torch.finfo(torch.float32).min
        mask = torch.zeros(b, 1, nq, nk).masked_fill(~keep.view(b, 1, 1, nk), low)
    _check_against_torch(q, k, v, gen, attn_mask=mask, enable_gqa=True, scale=0.3)
    s = stats()
    assert s["sdpa.varlen"] == 1 and s["sdpa"] == 1 and "sdpa.fallback" not in s


def test_a_batch_entry_with_no_key():
    """Bool mask: PyTorch gives 0 for a row with no allowed key, as omniattn does."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = _qkv(gen, 2, 2, 2, 5, 6, 8, 8)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1] = False
    got = oa.scaled_dot_product_attention(q, k, v, attn_mask=keep.view(2, 1, 1, 6))
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert (got - _torch_sdpa(q, k, v, attn_mask=keep.view(2, 1, 1, 6))).abs().max() < 1e-6


def test_float_mask_with_a_fully_masked_entry_is_not_padding():
    """finfo.min everywhere in one entry: PyTorch averages every value there (uniform weights); that
    is not a padding mask, and omniattn must not answer 0."""
    gen = torch.Generator().manual_seed(14)
    q, k, v = _qkv(gen, 2, 2, 2, 5, 6, 8, 8)
    mask = torch.zeros(2, 1, 1, 6)
    mask[1] = torch.finfo(torch.float32).min
    assert oa.padding.key_padding(mask, 2, 5, 6) is None


@pytest.mark.parametrize("kind", ["bool-causal-like", "bool-per-head", "float-bias"])
def test_other_masks_run_in_the_backend(kind):
    gen = torch.Generator().manual_seed(15)
    b, h, nq, nk = 2, 3, 19, 23
    q, k, v = _qkv(gen, b, h, h, nq, nk, 16, 16)
    if kind == "bool-causal-like":
        mask = torch.rand(nq, nk, generator=gen) > 0.4
        mask[:, 0] = True
    elif kind == "bool-per-head":
        mask = torch.rand(b, h, nq, nk, generator=gen) > 0.5
        mask[..., 3] = True
    else:
        mask = torch.randn(b, 1, nq, nk, generator=gen)
    _check_against_torch(q, k, v, gen, attn_mask=mask)
    s = stats()
    assert s["sdpa.masked"] == 1 and "sdpa.fallback" not in s


@pytest.mark.parametrize("nq,nk", [(7, 19), (19, 7), (11, 11)])
def test_is_causal_is_top_left_like_pytorch(nq, nk):
    gen = torch.Generator().manual_seed(16)
    q, k, v = _qkv(gen, 2, 4, 2, nq, nk, 16, 16)
    _check_against_torch(q, k, v, gen, is_causal=True, enable_gqa=True)
    assert "sdpa.fallback" not in stats()


def test_unbatched_inputs():
    gen = torch.Generator().manual_seed(17)
    q, k, v = (rand((3, 9, 8), torch.float32, gen) for _ in range(3))
    got = oa.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got.shape == (3, 9, 8) and (got - _torch_sdpa(q, k, v, is_causal=True)).abs().max() < 1e-5


def test_dropout_matches_the_counter_based_hash():
    """dropout_p > 0: the seed comes from torch's default generator, so torch.manual_seed
    reproduces a call; the dropped elements are DESIGN.md's hash of that seed (reference)."""
    gen = torch.Generator().manual_seed(18)
    q, k, v = _qkv(gen, 2, 2, 2, 9, 11, 8, 8, torch.float64)
    torch.manual_seed(5)
    a = oa.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    b = oa.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    seed = _spec.draw_dropout_seed()
    c = oa.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    spec, call = _spec.dense_call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score="softmax", causal=False,
                                  window=(-1, -1), scale=None, sigmoid_bias=None, silu_norm=None, softcap=0.0,
                                  precision="exact", backend="reference", return_lse=False, dropout_p=0.3, dropout_seed=seed)
    want = call.unpack(oa.reference.run(spec, call, torch.float64)[0]).transpose(1, 2)
    assert (a - want).abs().max() < 1e-12
    assert (a - _torch_sdpa(q, k, v)).abs().max() > 1e-3  # dropout did something


def test_errors_and_gqa():
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        oa.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="attn_mask: pass either"):
        oa.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="attn_mask: shape"):
        oa.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask: expected dtype bool"):
        oa.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="dropout_p"):
        oa.scaled_dot_product_attention(q, q, q, dropout_p=1.0)


def test_fallbacks_warn_once_per_reason_and_are_counted():
    q = torch.randn(2, 1, 2, 5, 8)  # 5-D: PyTorch broadcasts extra batch dims, omniattn does not
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            got = oa.scaled_dot_product_attention(q, q, q)
    assert sum("not all 3-D" in str(w.message) for w in seen) == 1
    assert torch.equal(got, _torch_sdpa(q, q, q))
    s = stats(reset=True)
    assert s["sdpa.fallback"] == 3 and sum(v for key, v in s.items() if key.startswith("sdpa.fallback[")) == 3
    assert stats() == {}


def test_causal_with_any_right_window_is_clipped():
    """DESIGN wave 2: causal=True accepts any window right (transformers passes (w-1, w-1))."""
    gen = torch.Generator().manual_seed(19)
    q, k, v = (rand((2, 13, 2, 8), torch.float32, gen) for _ in range(3))
    a = oa.attention(q, k, v, causal=True, window=(4, 4), backend="torch")
    b = oa.attention(q, k, v, causal=True, window=(4, 0), backend="torch")
    assert torch.equal(a, b)


def test_autocast_runs_attention_in_its_dtype_like_pytorch():
    """Inside an autocast region attention is a lower-precision op, as PyTorch's SDPA: float32 (and
    mixed) q, k, v run as the region's dtype, the output comes in it, gradients reach the float32
    inputs in float32; float64 stays float64; outside the region nothing changes."""
    gen = torch.Generator().manual_seed(31)
    q, k, v = (rand((2, 3, 37, 16), torch.float32, gen) for _ in range(3))
    as_bf16 = oa.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = oa.scaled_dot_product_attention(*leaves, is_causal=True)
        mixed = oa.scaled_dot_product_attention(q, k, v.bfloat16(), is_causal=True)
        dense = oa.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True)
        wide = oa.attention(*(t.transpose(1, 2).double() for t in (q, k, v)), causal=True)
    assert got.dtype == mixed.dtype == dense.dtype == want.dtype == torch.bfloat16
    assert wide.dtype == torch.float64
    torch.testing.assert_close(got, as_bf16, rtol=0, atol=0)
    torch.testing.assert_close(mixed, as_bf16, rtol=0, atol=0)
    torch.testing.assert_close(dense.transpose(1, 2), as_bf16, rtol=0, atol=0)
    ref64 = F.scaled_dot_product_attention(*(t.bfloat16().double() for t in (q, k, v)), is_causal=True)
    assert_tolerance("autocast", got, ref64, want, torch.bfloat16)
    got.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 and t.grad.isfinite().all() for t in leaves)
    assert oa.scaled_dot_product_attention(q, k, v, is_causal=True).dtype == torch.float32  # no region: float32
    # the packed entry points too: varlen (mixed inputs) and HSTU (its bias weights stay float32)
    cu = torch.tensor([0, 20, 37], dtype=torch.int32)
    qv, kv, vv = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (37, 3, 16)
    rab = oa.hstu.RelativeBias(37, num_buckets=8)
    ts = torch.arange(37) * 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        varlen = oa.attention_varlen(qv, kv, vv.bfloat16(), cu, cu, 20, 20, causal=True)
        hstu = oa.hstu_attention(qv, kv, vv, cu, 20, rab=rab, timestamps=ts)
    want_varlen = oa.attention_varlen(qv.bfloat16(), kv.bfloat16(), vv.bfloat16(), cu, cu, 20, 20, causal=True)
    want_hstu = oa.hstu_attention(qv.bfloat16(), kv.bfloat16(), vv.bfloat16(), cu, 20, rab=rab, timestamps=ts)
    torch.testing.assert_close(varlen, want_varlen, rtol=0, atol=0)
    torch.testing.assert_close(hstu, want_hstu, rtol=0, atol=0)
    hstu.float().sum().backward()
    assert rab.pos_w.grad is not None and rab.pos_w.grad.dtype == torch.float32

"""GPU-only: the quantized precisions in bf16 at real sizes, every score, against the exact reference
on outlier-key inputs (cosine and relative L1), plus the emulation agreement at kernel tiles."""

import pytest
import torch

import omniattn as oa

from ..test_quant import ACCURACY, cosine, offset_keys

DEV = "cuda"


def rel_l1(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().sum() / b.abs().sum())


@pytest.mark.parametrize("precision", ["int8", "int8-fp8", "fp8", "int4-fp8"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("causal,d", [(False, 128), (True, 64)])
def test_quantized_bf16(precision, score, causal, d):
    gen = torch.Generator().manual_seed(d + causal)
    q, k, v = offset_keys((2, 1031, 8, d), (2, 1031, 2, d), gen, dtype=torch.bfloat16, device=DEV)
    before = [t.clone() for t in (q, k, v)]
    got = oa.attention(q, k, v, score=score, causal=causal, precision=precision)
    want = oa.reference.attention(q.float(), k.float(), v.float(), score=score, causal=causal, dtype=torch.float32)
    cos_bar, l1_bar = ACCURACY[precision]
    assert cosine(got, want) >= cos_bar and rel_l1(got, want) <= l1_bar
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


def test_quantized_varlen_and_hstu(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 700, 733, 1933], device=DEV, dtype=torch.int32)
    q, k, v = offset_keys((1933, 8, 128), (1933, 8, 128), gen, dtype=torch.bfloat16, device=DEV)
    for causal, precision in ((True, "int8-fp8"), (False, "int8-fp8"), (False, "fp8"), (False, "int4-fp8")):
        # non-causal: packed FP8 V^T by TMA; lengths off the 16-token columns
        got = oa.attention_varlen(q, k, v, cu, cu, 1200, 1200, causal=causal, precision=precision)
        want = oa.reference.attention_varlen(q.float(), k.float(), v.float(), cu, cu, 1200, 1200, causal=causal,
                                             dtype=torch.float32)
        assert cosine(got, want) >= ACCURACY[precision][0], (causal, precision)
    rab = oa.hstu.RelativeBias(1200, 64).to(DEV)
    ts = torch.randint(0, 10**6, (1933,), device=DEV).sort().values
    kw = dict(num_targets=torch.tensor([5, 1, 9], device=DEV), rab=rab, timestamps=ts)
    want = oa.reference.hstu_attention(q.float(), k.float(), v.float(), cu, 1200, dtype=torch.float32, **kw)
    from omniattn.backends.triton import rab_cache

    built = []
    table = rab_cache.new_table
    monkeypatch.setattr(rab_cache, "new_table", lambda *a: built.append(a) or table(*a))
    for table_mb in ("0", "64"):  # the bias per pair (the default), then from the opt-in table (rab_cache)
        monkeypatch.setenv(rab_cache.BUDGET_ENV, table_mb)
        with torch.no_grad():
            got = oa.hstu_attention(q, k, v, cu, 1200, precision="int8-fp8", **kw)
        assert cosine(got, want) >= 0.999, table_mb
        assert len(built) == (table_mb != "0"), built


def test_auto_is_exact_where_int8_is_not_faster():
    from omniattn.quant.config import resolve

    q = torch.randn(1, 256, 2, 64, device=DEV, dtype=torch.float16)
    assert resolve("auto") == "exact"
    assert torch.equal(oa.attention(q, q, q, precision="auto"), oa.attention(q, q, q))

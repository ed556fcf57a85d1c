"""omniattn.compat.flash_attn: flash-attn 2.8's signatures, and every function against the reference."""

import inspect
import math

import pytest
import torch

import omniattn as oa
from omniattn.compat import flash_attn as fa

from .helpers import check_outputs_and_grads, dense_problem, max_err, rand, varlen_problem

# Parameter names and defaults of flash_attn/flash_attn_interface.py at tag v2.8.3, read from the
# source (flash-attn does not install on this machine).
_DENSE_TAIL = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
               ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
_REQ = inspect.Parameter.empty
FLASH_ATTN_2_8_SIGNATURES = {
    "flash_attn_func": [("q", _REQ), ("k", _REQ), ("v", _REQ)] + _DENSE_TAIL,
    "flash_attn_qkvpacked_func": [("qkv", _REQ)] + _DENSE_TAIL,
    "flash_attn_kvpacked_func": [("q", _REQ), ("kv", _REQ)] + _DENSE_TAIL,
    "flash_attn_varlen_func": [("q", _REQ), ("k", _REQ), ("v", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
                               ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ)] + _DENSE_TAIL + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _REQ), ("cu_seqlens", _REQ), ("max_seqlen", _REQ)] + _DENSE_TAIL,
    "flash_attn_varlen_kvpacked_func": [("q", _REQ), ("kv", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
                                        ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ)] + _DENSE_TAIL,
    "flash_attn_with_kvcache": [
        ("q", _REQ), ("k_cache", _REQ), ("v_cache", _REQ), ("k", None), ("v", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
        ("block_table", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_2_8_SIGNATURES))
def test_signature_is_flash_attn_2_8(name):
    params = list(inspect.signature(getattr(fa, name)).parameters.values())
    assert [(p.name, p.default) for p in params] == FLASH_ATTN_2_8_SIGNATURES[name]
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


@pytest.mark.parametrize(
    "kw,ref_kw",
    [
        (dict(causal=True), dict(causal=True)),
        (dict(causal=True, window_size=(5, 5)), dict(causal=True, window=(5, 0))),  # right clipped under causal
        (dict(window_size=(3, 2), softcap=4.0), dict(window=(3, 2), softcap=4.0)),
        (dict(window_size=(-7, 40)), dict()),  # negative or >= seqlen_k: unbounded, as flash-attn's C++
        (dict(softmax_scale=0.2, causal=True), dict(scale=0.2, causal=True)),
    ],
)
def test_flash_attn_func(kw, ref_kw):
    gen = torch.Generator().manual_seed(31)
    p = dense_problem(2, 17, 23, 4, 2, 16, 16, torch.float32, gen)
    check_outputs_and_grads(
        p, "auto", gen,
        fn=lambda: fa.flash_attn_func(p.q, p.k, p.v, **kw),
        ref=lambda dt: oa.reference.attention(p.q, p.k, p.v, dtype=dt, **ref_kw),
    )


def test_return_attn_probs_and_alibi():
    gen = torch.Generator().manual_seed(32)
    q, k, v = (rand((2, 9, 4, 8), torch.float64, gen) for _ in range(3))
    slopes = torch.rand(2, 4, generator=gen)
    out, lse, probs = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, return_attn_probs=True)
    ref, ref_lse = oa.reference.attention(q, k, v, causal=True, alibi_slopes=slopes, return_lse=True)
    assert probs is None and lse.shape == (2, 4, 9) and lse.dtype == torch.float64
    assert max_err(out, ref) < 1e-12 and max_err(lse, ref_lse) < 1e-12


def test_packed_variants_share_the_gradient_of_the_packed_tensor():
    gen = torch.Generator().manual_seed(33)
    qkv = rand((2, 11, 3, 4, 8), torch.float64, gen).requires_grad_()
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    assert max_err(out, oa.reference.attention(q, k, v, causal=True)) < 1e-12
    out.sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    q2 = rand((2, 7, 4, 8), torch.float64, gen)
    kv = rand((2, 11, 2, 2, 8), torch.float64, gen)
    got = fa.flash_attn_kvpacked_func(q2, kv, window_size=(2, 1))
    assert max_err(got, oa.reference.attention(q2, kv[:, :, 0], kv[:, :, 1], window=(2, 1))) < 1e-12


def test_varlen_functions():
    gen = torch.Generator().manual_seed(34)
    p = varlen_problem([5, 0, 12, 7], [9, 3, 12, 7], 4, 2, 16, 16, torch.float32, gen)
    cu_q, cu_k, mq, mk = p.varlen
    check_outputs_and_grads(
        p, "auto", gen,
        fn=lambda: fa.flash_attn_varlen_func(p.q, p.k, p.v, cu_q, cu_k, mq, mk, causal=True, window_size=(3, 3)),
        ref=lambda dt: oa.reference.attention_varlen(p.q, p.k, p.v, cu_q, cu_k, mq, mk, causal=True, window=(3, 0), dtype=dt),
    )
    qkv = rand((int(cu_q[-1]), 3, 4, 8), torch.float64, gen)
    out, lse, _ = fa.flash_attn_varlen_qkvpacked_func(qkv, cu_q, mq, causal=True, return_attn_probs=True)
    ref, ref_lse = oa.reference.attention_varlen(*qkv.unbind(1), cu_q, cu_q, mq, mq, causal=True, return_lse=True)
    assert max_err(out, ref) < 1e-12 and max_err(lse, ref_lse) < 1e-12 and lse.shape == (4, qkv.shape[0])
    q = rand((int(cu_q[-1]), 4, 8), torch.float64, gen)
    kv = rand((int(cu_k[-1]), 2, 2, 8), torch.float64, gen)
    got = fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, mq, mk, softcap=3.0)
    assert max_err(got, oa.reference.attention_varlen(q, kv[:, 0], kv[:, 1], cu_q, cu_k, mq, mk, softcap=3.0)) < 1e-12


def test_varlen_with_a_paged_kv():
    gen = torch.Generator().manual_seed(35)
    lens_k, page = [10, 6], 4
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 10, 16], dtype=torch.int32)
    k = rand((16, 2, 8), torch.float64, gen)
    v = rand((16, 2, 8), torch.float64, gen)
    q = rand((7, 2, 8), torch.float64, gen)
    pages = torch.full((8, page, 2, 8), math.nan, dtype=torch.float64)  # unwritten slots poison the result
    vpages = pages.clone()
    table = torch.tensor([[5, 1, 6], [2, 7, 0]], dtype=torch.int32)
    for b, (s, n) in enumerate(zip([0, 10], lens_k)):
        for t in range(n):
            pages[table[b, t // page], t % page] = k[s + t]
            vpages[table[b, t // page], t % page] = v[s + t]
    got = fa.flash_attn_varlen_func(q, pages, vpages, cu_q, cu_k, 4, 10, causal=True, block_table=table)
    assert max_err(got, oa.reference.attention_varlen(q, k, v, cu_q, cu_k, 4, 10, causal=True)) < 1e-12


def _cache_reference(q, keys, values, lens, **kw):
    """Per entry: attention of q[b] over its first lens[b] keys (bottom-right), float64."""
    outs, lses = [], []
    for b, n in enumerate(lens):
        o, lse = oa.reference.attention(q[b : b + 1], keys[b][None, :n], values[b][None, :n], return_lse=True, **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("layout", ["dense", "batch_idx", "paged"])
@pytest.mark.parametrize("nq", [1, 3, 20])
def test_kvcache_appends_and_attends(layout, nq):
    gen = torch.Generator().manual_seed(36)
    b, hq, hk, d, cap, page = 3, 4, 2, 16, 32, 8
    q = rand((b, nq, hq, d), torch.float64, gen)
    knew, vnew = rand((b, 2, hk, d), torch.float64, gen), rand((b, 2, hk, d), torch.float64, gen)
    seqlens = torch.tensor([5, 0, 9], dtype=torch.int32)
    full_k, full_v = rand((b, cap, hk, d), torch.float64, gen), rand((b, cap, hk, d), torch.float64, gen)
    kw = dict(cache_seqlens=seqlens, causal=True, window_size=(6, 6), return_softmax_lse=True)
    if layout == "dense":
        kc, vc = full_k.clone(), full_v.clone()
        read = lambda c: c  # noqa: E731
    elif layout == "batch_idx":
        idx = torch.tensor([2, 0, 3], dtype=torch.int32)  # rows of a larger cache
        kc, vc = torch.zeros(4, cap, hk, d, dtype=torch.float64), torch.zeros(4, cap, hk, d, dtype=torch.float64)
        kc[idx.long()], vc[idx.long()] = full_k, full_v
        kw["cache_batch_idx"] = idx
        read = lambda c: c[idx.long()]  # noqa: E731
    else:
        table = torch.tensor([[7, 1, 4, 10], [3, 8, 0, 11], [2, 5, 9, 6]], dtype=torch.int32)
        kc, vc = torch.zeros(12, page, hk, d, dtype=torch.float64), torch.zeros(12, page, hk, d, dtype=torch.float64)
        for i in range(b):
            kc[table[i].long()] = full_k[i].view(4, page, hk, d)
            vc[table[i].long()] = full_v[i].view(4, page, hk, d)
        kw["block_table"] = table
        read = lambda c: torch.stack([c[table[i].long()].reshape(cap, hk, d) for i in range(b)])  # noqa: E731
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, knew, vnew, **kw)
    want_k, want_v = full_k.clone(), full_v.clone()
    for i, s in enumerate(seqlens.tolist()):
        want_k[i, s : s + 2], want_v[i, s : s + 2] = knew[i], vnew[i]
    assert torch.equal(read(kc), want_k) and torch.equal(read(vc), want_v)  # appended in place, nothing else touched
    ref, ref_lse = _cache_reference(q, want_k, want_v, (seqlens + 2).tolist(), causal=True, window=(6, 0))
    assert max_err(out, ref) < 1e-12
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and max_err(lse[finite], ref_lse[finite]) < 1e-6  # lse is float32


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary(interleaved, causal):
    gen = torch.Generator().manual_seed(37)
    b, nq, h, d, rd, cap = 2, 2, 2, 16, 8, 12
    q = rand((b, nq, h, d), torch.float64, gen)
    knew, vnew = rand((b, nq, h, d), torch.float64, gen), rand((b, nq, h, d), torch.float64, gen)
    kc, vc = rand((b, cap, h, d), torch.float64, gen), rand((b, cap, h, d), torch.float64, gen)
    k0 = kc.clone()
    ang = torch.rand(cap, rd // 2, generator=gen, dtype=torch.float64) * 6
    cos, sin = ang.cos(), ang.sin()
    seqlens = torch.tensor([3, 7], dtype=torch.int32)
    out = fa.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cos, sin, cache_seqlens=seqlens, causal=causal,
                                     rotary_interleaved=interleaved)

    def rotate(x, pos):  # complex-number form of rotary: an independent formulation
        xr = x[..., :rd]
        if interleaved:
            z = torch.complex(xr[..., 0::2], xr[..., 1::2])
        else:
            z = torch.complex(xr[..., : rd // 2], xr[..., rd // 2 :])
        z = z * torch.polar(torch.ones_like(ang[pos]), ang[pos]).unsqueeze(-2)
        rot = torch.stack([z.real, z.imag], -1).flatten(-2) if interleaved else torch.cat([z.real, z.imag], -1)
        return torch.cat([rot, x[..., rd:]], -1)

    for i, s in enumerate(seqlens.tolist()):
        kpos = torch.arange(s, s + nq)
        qpos = kpos if causal else torch.full((nq,), s)
        keys = torch.cat([k0[i, :s], rotate(knew[i], kpos)])
        assert max_err(kc[i, : s + nq], keys) < 1e-12
        ref = oa.reference.attention(rotate(q[i], qpos)[None], keys[None], torch.cat([vc[i, :s], vnew[i]])[None], causal=causal)
        assert max_err(out[i : i + 1], ref) < 1e-12


def test_kvcache_errors():
    q = torch.randn(1, 1, 2, 8)
    kc = torch.zeros(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="cache_leftpad"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_leftpad=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens: required"):
        fa.flash_attn_with_kvcache(q, kc, kc, torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8))
    with pytest.raises(ValueError, match="overflows"):
        fa.flash_attn_with_kvcache(q, kc.clone(), kc.clone(), torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), cache_seqlens=3)
    with pytest.raises(ValueError, match="window_size"):
        fa.flash_attn_func(q, q, q, window_size=(1.5, 2))


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_is_passed_on(monkeypatch, deterministic):
    """flash-attn's ``deterministic`` reaches omniattn's keyword of the same name (dense and varlen)."""
    seen = []
    for name in ("attention", "attention_varlen"):
        real = getattr(fa, name)
        monkeypatch.setattr(fa, name, lambda *a, real=real, **kw: seen.append(kw["deterministic"]) or real(*a, **kw))
    q = torch.randn(1, 6, 2, 16)
    fa.flash_attn_func(q, q, q, deterministic=deterministic)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 6, 6, deterministic=deterministic)
    assert seen == [deterministic, deterministic]

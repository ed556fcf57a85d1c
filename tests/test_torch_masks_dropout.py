"""Issue 13, backend side: explicit masks (Call.attn_mask) and dropout (Spec.dropout_p) on the
tiled backend against the reference, and the dropout hash against DESIGN.md's formula."""

import math

import pytest
import torch

import omniattn as oa
from omniattn import backends, reference, spec as _spec

from .helpers import check_outputs_and_grads, dense_problem, max_err, rand, varlen_problem
from .test_memory import LargestAllocation

# --------------------------------------------------------------------- DESIGN.md's hash, by hand

M32 = 0xFFFFFFFF


def fmix32_py(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    x ^= x >> 16
    return x


def kept_py(seed: int, b: int, h: int, i: int, j: int, p: float, hq: int) -> bool:
    """DESIGN.md, "Explicit masks and dropout", in plain Python integers (uint32 by masking)."""
    base = fmix32_py(seed + 0x9E3779B9 * (b * hq + h + 1))
    row = fmix32_py(base ^ ((i * 0x85EBCA77) & M32))
    u = fmix32_py(row + j * 0xC2B2AE3D)
    return u >= min(math.floor(p * 2**32), 2**32 - 1)


def test_fmix32_known_values():
    """MurmurHash3's finaliser: fmix32(0) = 0, and published values of the constants' mixing."""
    assert fmix32_py(0) == 0 and reference.fmix32(0) == 0
    for x in (1, 2, 0xDEADBEEF, M32, 123456789):
        assert reference.fmix32(x) == fmix32_py(x)
        assert int(reference.fmix32(torch.tensor([x], dtype=torch.int64))[0]) == fmix32_py(x)


def test_dropout_hash_matches_the_design_formula():
    gen = torch.Generator().manual_seed(0)
    hq = 12
    points = [(0, 0, 0, 0, 0), (2**32 - 1, 1000, 11, 70000, 123456), (7, 3, 5, 2**31 - 1, 2**31 - 1)]
    points += [tuple(int(x) for x in torch.randint(0, 2**31 - 1, (5,), generator=gen)) for _ in range(300)]
    points = [(s % 2**32, b % 5000, h % hq, i, j) for s, b, h, i, j in points]
    for p in (0.1, 0.5, 0.9):
        want = [kept_py(s, b, h, i, j, p, hq) for s, b, h, i, j in points]
        t = torch.tensor(points, dtype=torch.int64)
        got = [reference.dropout_keep(int(s), b, h, i, j, p, hq) for (s, *_), b, h, i, j in
               zip(points, t[:, 1], t[:, 2], t[:, 3], t[:, 4])]
        assert [bool(x) for x in got] == want


def test_drop_fraction_is_p_and_seeds_differ():
    i = torch.arange(256).view(-1, 1)
    j = torch.arange(256).view(1, -1)
    for p in (0.1, 0.3, 0.75):
        kept = reference.dropout_keep(1234, 0, 3, i, j, p, 8)
        # 65536 Bernoulli draws: the standard deviation of the fraction is < 0.002
        assert abs(1 - kept.double().mean().item() - p) < 0.01
    a = reference.dropout_keep(1, 0, 0, i, j, 0.5, 8)
    b = reference.dropout_keep(2, 0, 0, i, j, 0.5, 8)
    c = reference.dropout_keep(1, 0, 1, i, j, 0.5, 8)
    assert (a != b).double().mean() > 0.4 and (a != c).double().mean() > 0.4


# --------------------------------------------------------------------- masks, tiled vs reference


def _mask(shape, dtype, gen, b, h, n_q, n_k):
    """A random mask of the given broadcast shape: bool ~25% disallowed, float N(0, 1) with ~20%
    -inf; query row 2 of every batch entry and head fully disallowed (when rows are explicit)."""
    if dtype == torch.bool:
        m = torch.rand(shape, generator=gen) > 0.25
        fill = False
    else:
        m = torch.randn(shape, generator=gen, dtype=torch.float32)
        m = m.masked_fill(torch.rand(shape, generator=gen) < 0.2, -math.inf).to(dtype)
        fill = -math.inf
    if len(shape) >= 2 and shape[-2] == n_q:
        m[..., 2, :] = fill
    return m


def _full_shapes(b, h, nq, nk):
    return [(b, h, nq, nk), (b, 1, nq, nk), (1, h, nq, nk), (b, 1, 1, nk), (nq, nk), (nk,), (1, 1, nq, 1),
            (b, h, nq, 1), (h, nq, nk)]


def _problem_fns(p, **kw):
    def fn():
        return oa.attention(p.q, p.k, p.v, backend="torch", **p.kwargs, **kw)

    def ref(dtype):
        return oa.reference.attention(p.q, p.k, p.v, dtype=dtype, **p.kwargs, **kw)

    return fn, ref


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.float16])
@pytest.mark.parametrize("shape_index", range(9))
def test_every_mask_shape_and_dtype(small_tiles, mask_dtype, shape_index):
    gen = torch.Generator().manual_seed(shape_index * 10 + (mask_dtype == torch.bool))
    b, hq, nq, nk = 2, 4, 37, 45
    shape = _full_shapes(b, hq, nq, nk)[shape_index]
    p = dense_problem(b, nq, nk, hq, 2, 16, 16, torch.float32, gen)
    mask = _mask(shape, mask_dtype, gen, b, hq, nq, nk)
    fn, ref = _problem_fns(p, attn_mask=mask)
    check_outputs_and_grads(p, "torch", gen, fn=fn, ref=ref)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64])
@pytest.mark.parametrize("causal,window,nq,nk", [(True, (-1, 0), 40, 53), (False, (5, 3), 29, 29), (True, (7, 0), 33, 20)])
def test_masks_combine_with_causal_and_window(small_tiles, score, mask_dtype, causal, window, nq, nk):
    gen = torch.Generator().manual_seed(nq + nk + len(score))
    p = dense_problem(2, nq, nk, 2, 1, 16, 8, torch.float64, gen, score=score, causal=causal, window=window)
    mask = _mask((2, 1, nq, nk), mask_dtype, gen, 2, 2, nq, nk)
    fn, ref = _problem_fns(p, attn_mask=mask)
    check_outputs_and_grads(p, "torch", gen, fn=fn, ref=ref)


def test_masks_on_packed_short_sequences(poisoned):
    """Dense batches of short sequences share a query block: each row reads its own entry."""
    gen = torch.Generator().manual_seed(4)
    p = dense_problem(5, 13, 11, 3, 3, 8, 8, torch.float64, gen, causal=True)
    for mask_dtype in (torch.bool, torch.float64):
        mask = _mask((5, 3, 13, 11), mask_dtype, gen, 5, 3, 13, 11)
        out, lse = oa.attention(p.q, p.k, p.v, causal=True, attn_mask=mask, backend="torch", return_lse=True)
        want, want_lse = oa.reference.attention(p.q, p.k, p.v, causal=True, attn_mask=mask, return_lse=True)
        assert max_err(out, want) < 1e-12 and torch.equal(lse.isinf(), want_lse.isinf())
        assert max_err(lse.masked_fill(lse.isinf(), 0), want_lse.masked_fill(want_lse.isinf(), 0)) < 1e-12


def test_fully_masked_rows_give_zero_and_minus_inf(poisoned):
    gen = torch.Generator().manual_seed(6)
    q, k, v = (rand((2, 20, 2, 8), torch.float32, gen).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 2, 20, 20, dtype=torch.bool)
    mask[1, 0, 5] = False
    fmask = torch.zeros(2, 2, 20, 20).masked_fill(~mask, -math.inf)
    for m in (mask, fmask):
        for backend in ("torch", "auto", "reference"):
            out, lse = oa.attention(q, k, v, attn_mask=m, backend=backend, return_lse=True)
            assert (out[1, 5, 0] == 0).all() and lse[1, 0, 5] == -math.inf, backend
            assert torch.isfinite(lse[0]).all() and torch.isfinite(out).all()
            grads = torch.autograd.grad((out.sum() + lse[lse.isfinite()].sum()), (q, k, v))
            assert all(torch.isfinite(g).all() for g in grads), backend
            assert (grads[0][1, 5, 0] == 0).all()


def test_masks_are_read_tile_by_tile_in_linear_memory():
    """A (B, 1, 1, N) padding mask and a (N,) float mask: no tensor of size N^2 is made."""
    n = 4096
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, 16, generator=gen).requires_grad_() for _ in range(3))
    for mask in (torch.rand(1, 1, 1, n, generator=gen) > 0.1, torch.randn(n, generator=gen)):
        with LargestAllocation() as probe:
            out = oa.attention(q, k, v, attn_mask=mask, backend="torch")
            out.backward(torch.ones_like(out))
        assert probe.largest < n * n // 16, f"{probe.op} allocated {probe.largest} elements"


def test_mask_on_packed_sequences_is_a_clear_error():
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    spec, call = _spec.varlen_call(q, q, q, cu, cu, 6, 6, score="softmax", causal=False, window=(-1, -1),
                                   scale=None, sigmoid_bias=None, silu_norm=None, softcap=0.0, precision="exact",
                                   backend="torch", return_lse=False)
    call.attn_mask = torch.ones(6, 6, dtype=torch.bool)
    for backend in ("torch", "reference", "auto"):
        with pytest.raises(ValueError, match="attn_mask: only dense"):
            backends.run(spec, call, backend)


# --------------------------------------------------------------------- dropout


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_matches_the_reference(small_tiles, score, dtype):
    gen = torch.Generator().manual_seed(len(score))
    p = dense_problem(2, 41, 50, 4, 2, 16, 16, dtype, gen, score=score, causal=True)

    def fn():
        spec, call = _spec.dense_call(p.q, p.k, p.v, score=score, causal=True, window=(-1, -1), scale=None,
                                      sigmoid_bias=None, silu_norm=None, softcap=0.0, precision="exact",
                                      backend="torch", return_lse=False, dropout_p=0.3, dropout_seed=2**32 - 5)
        return backends.run(spec, call, "torch")[0]

    def ref(dt):
        return oa.reference.attention(p.q, p.k, p.v, score=score, causal=True, dropout_p=0.3,
                                      dropout_seed=2**32 - 5, dtype=dt)

    check_outputs_and_grads(p, "torch", gen, fn=fn, ref=ref)


def test_dropout_with_a_mask_varlen_and_hstu(small_tiles):
    gen = torch.Generator().manual_seed(12)
    p = dense_problem(2, 30, 30, 2, 2, 8, 8, torch.float64, gen)
    mask = _mask((2, 1, 30, 30), torch.float64, gen, 2, 2, 30, 30)
    spec, call = _spec.dense_call(p.q, p.k, p.v, score="softmax", causal=False, window=(-1, -1), scale=None,
                                  sigmoid_bias=None, silu_norm=None, softcap=0.0, precision="exact", backend="torch",
                                  return_lse=True, attn_mask=mask, dropout_p=0.5, dropout_seed=99)
    out, lse = backends.run(spec, call, "torch")
    want, want_lse = oa.reference.attention(p.q, p.k, p.v, attn_mask=mask, dropout_p=0.5, dropout_seed=99,
                                            return_lse=True)
    assert max_err(out, want) < 1e-12
    assert max_err(lse.masked_fill(lse.isinf(), 0), want_lse.masked_fill(want_lse.isinf(), 0)) < 1e-12
    # lse ignores dropout: the same as without it
    _, plain_lse = oa.reference.attention(p.q, p.k, p.v, attn_mask=mask, return_lse=True)
    assert torch.equal(want_lse.isinf(), plain_lse.isinf())
    # varlen
    v = varlen_problem([7, 0, 20, 3], [9, 4, 20, 3], 2, 1, 8, 8, torch.float64, gen, causal=True)

    def fn():
        return backends.run(*_varlen(v, 0.4, 7), "torch")[0]

    def ref(dt):
        return oa.reference.attention_varlen(v.q, v.k, v.v, *v.varlen, causal=True, dropout_p=0.4, dropout_seed=7,
                                             dtype=dt)

    check_outputs_and_grads(v, "torch", gen, fn=fn, ref=ref)
    # HSTU
    h = varlen_problem([12, 5, 30], [12, 5, 30], 2, 2, 8, 8, torch.float64, gen)
    offsets = h.varlen[0]
    rab = oa.hstu.RelativeBias(30, num_buckets=6, dtype=torch.float64)
    ts = torch.arange(47) * 100
    spec, call = _spec.hstu_call(h.q, h.k, h.v, offsets, 30, alpha=None, causal=True, num_targets=torch.tensor([2, 1, 3]),
                                 contextual_seq_len=0, max_attn_len=0, rab=rab, timestamps=ts, silu_norm=None,
                                 precision="exact", backend="torch")
    spec = _with_dropout(spec, 0.25)
    call.dropout_seed = 31
    out = backends.run(spec, call, "torch")[0]
    want = reference.run(spec, call)[0]
    assert max_err(out, want) < 1e-12
    grads = torch.autograd.grad(out.sum(), [h.q, h.k, h.v, rab.pos_w, rab.ts_w])
    grads_r = torch.autograd.grad(want.sum(), [h.q, h.k, h.v, rab.pos_w, rab.ts_w])
    for g, gr in zip(grads, grads_r):
        assert max_err(g, gr) < 1e-10


def _with_dropout(spec, p):
    import dataclasses

    return dataclasses.replace(spec, dropout_p=p)


def _varlen(problem, p, seed):
    spec, call = _spec.varlen_call(problem.q, problem.k, problem.v, *problem.varlen, score="softmax", causal=True,
                                   window=(-1, -1), scale=None, sigmoid_bias=None, silu_norm=None, softcap=0.0,
                                   precision="exact", backend="torch", return_lse=False, dropout_p=p,
                                   dropout_seed=seed)
    return spec, call


def test_same_seed_same_result_and_the_fraction_dropped():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (rand((1, 200, 2, 16), torch.float32, gen) for _ in range(3))
    torch.manual_seed(5)
    a = oa.attention(q, k, v, score="sigmoid", dropout_p=0.4, backend="torch")
    torch.manual_seed(5)
    b = oa.attention(q, k, v, score="sigmoid", dropout_p=0.4, backend="torch")
    c = oa.attention(q, k, v, score="sigmoid", dropout_p=0.4, backend="torch")
    assert torch.equal(a, b) and not torch.equal(a, c)
    # V = identity rows: the output is the dropped attention matrix itself, row by row
    n = 64
    q = rand((1, n, 1, 8), torch.float32, gen)
    eye = torch.eye(n).view(1, n, 1, n)
    spec, call = _spec.dense_call(q, q, eye, score="sigmoid", causal=False, window=(-1, -1), scale=None,
                                  sigmoid_bias=None, silu_norm=None, softcap=0.0, precision="exact", backend="torch",
                                  return_lse=False, dropout_p=0.3, dropout_seed=11)
    weights = backends.run(spec, call, "torch")[0][0, :, 0]  # (n, n): sigmoid(s) / 0.7 or 0
    dropped = (weights == 0).double().mean().item()
    assert abs(dropped - 0.3) < 0.03  # 4096 draws: sd 0.007
    spec0, call0 = _spec.dense_call(q, q, eye, score="sigmoid", causal=False, window=(-1, -1), scale=None,
                                    sigmoid_bias=None, silu_norm=None, softcap=0.0, precision="exact", backend="torch",
                                    return_lse=False)
    plain = backends.run(spec0, call0, "torch")[0][0, :, 0]
    kept = weights != 0
    assert torch.allclose(weights[kept], plain[kept] / 0.7, rtol=1e-6)

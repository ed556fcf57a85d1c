"""Issue 14: backend="auto" on CPUs runs PyTorch's fused kernel for the calls it computes exactly
(omniattn.backends.torch_sdpa); everything else, and backend="torch", runs the tiled path."""

import math

import pytest
import torch

import omniattn as oa
from omniattn import backends, spec as _spec

from .helpers import check_outputs_and_grads, dense_problem, max_err, rand


def _resolve(q, k, v, **kw):
    args = dict(score="softmax", causal=False, window=(-1, -1), scale=None, sigmoid_bias=None, silu_norm=None,
                softcap=0.0, precision="exact", backend="auto", return_lse=False)
    args.update(kw)
    spec, call = _spec.dense_call(q, k, v, **args)
    return backends.resolve("auto", spec, call), backends.resolve("torch", spec, call)


def test_which_calls_take_the_fused_kernel():
    q = k = v = torch.randn(2, 16, 4, 8)
    long_k = torch.randn(2, 20, 4, 8)
    assert _resolve(q, k, v) == ("sdpa", "torch")
    assert _resolve(q, k, v, causal=True)[0] == "sdpa"
    assert _resolve(q, long_k, long_k)[0] == "sdpa"  # no mask: any lengths
    assert _resolve(q, k[:, :, :2], v[:, :, :2], scale=0.3)[0] == "sdpa"  # GQA, a scale
    assert _resolve(q, k, v, attn_mask=torch.randn(2, 1, 16, 16))[0] == "sdpa"  # a float mask of q's dtype
    not_fused = [
        dict(causal=True, window=(5, 0)), dict(window=(3, 3)), dict(softcap=5.0), dict(score="sigmoid"),
        dict(score="silu"), dict(alibi_slopes=torch.rand(4)), dict(dropout_p=0.1),
        dict(attn_mask=torch.ones(16, 16, dtype=torch.bool)),  # its kernel takes float masks only
        dict(attn_mask=torch.randn(16, 16, dtype=torch.float64)),  # another dtype than q's
        dict(attn_mask=torch.randn(16, 16), causal=True),
    ]
    for kw in not_fused:
        assert _resolve(q, k, v, **kw)[0] == "torch", kw
    assert _resolve(q, long_k, long_k, causal=True)[0] == "torch"  # its causal is top-left aligned
    wide = torch.randn(2, 16, 4, 16)
    assert _resolve(wide[..., ::2], k, v)[0] == "torch"  # it reads the last dim as contiguous
    assert _resolve(q, wide[..., ::2], v)[0] == "torch"
    assert _resolve(q, k, v, attn_mask=torch.randn(2, 1, 16, 32)[..., ::2])[0] == "torch"
    assert _resolve(q, k, torch.randn(2, 16, 4, 6))[0] == "torch"  # Dv != D
    assert _resolve(q[:, :0], k, v)[0] == "torch" and _resolve(q, k[:, :0], v[:, :0])[0] == "torch"


def test_last_dim_strided_inputs_are_computed_right():
    """Slices along the head dim (stride 2) and an expanded mask column: right answers, outputs and grads."""
    gen = torch.Generator().manual_seed(31)
    q, k, v = (rand((2, 23, 4, 32), torch.float32, gen, "cpu")[..., ::2].requires_grad_() for _ in range(3))
    mask = rand((2, 1, 23, 46), torch.float32, gen, "cpu")[..., ::2]
    for kw in ({}, dict(attn_mask=mask)):
        out = oa.attention(q, k, v, **kw)
        want = oa.reference.attention(*(t.double() for t in (q, k, v)), **{n: m.double() for n, m in kw.items()})
        assert max_err(out, want) < 1e-5
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        want_grads = torch.autograd.grad(want.sum(), (q, k, v))
        assert all(max_err(g, w) < 1e-5 for g, w in zip(grads, want_grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,causal,hkv", [((2, 77, 77), True, 2), ((1, 40, 129), False, 4), ((3, 19, 19), False, 1)])
def test_fused_path_matches_the_reference(dtype, shape, causal, hkv):
    gen = torch.Generator().manual_seed(shape[1] + hkv)
    b, nq, nk = shape
    p = dense_problem(b, nq, nk, 4, hkv, 32, 32, dtype, gen, causal=causal)
    assert _resolve(p.q, p.k, p.v, causal=causal)[0] == "sdpa"
    check_outputs_and_grads(p, "auto", gen)


def test_float_mask_and_lse_with_its_gradient():
    gen = torch.Generator().manual_seed(3)
    p = dense_problem(2, 33, 45, 4, 2, 16, 16, torch.float64, gen)
    mask = torch.randn(2, 1, 33, 45, generator=gen, dtype=torch.float64)
    mask[0, 0, 4] = -math.inf  # a fully masked row: 0 and lse -inf, as every backend
    mask[1, 0, :, 3] = -math.inf
    out, lse = oa.attention(p.q, p.k, p.v, attn_mask=mask, return_lse=True)
    want, want_lse = oa.reference.attention(p.q, p.k, p.v, attn_mask=mask, return_lse=True)
    assert lse[0, :, 4].eq(-math.inf).all() and (out[0, 4] == 0).all()
    assert max_err(out, want) < 1e-12
    assert torch.equal(lse.isinf(), want_lse.isinf())
    finite = lse.isfinite()
    assert max_err(lse[finite], want_lse[finite]) < 1e-12
    w = rand(lse.shape, torch.float64, gen)
    loss = (out * out).sum() + (lse[finite] * w[finite]).sum()
    loss_r = (want * want).sum() + (want_lse[finite] * w[finite]).sum()
    for g, gr in zip(torch.autograd.grad(loss, p.leaves()), torch.autograd.grad(loss_r, p.leaves())):
        assert max_err(g, gr) < 1e-10


def test_block_primitives_and_second_derivatives():
    gen = torch.Generator().manual_seed(4)
    p = dense_problem(1, 7, 7, 1, 1, 4, 4, torch.float64, gen, causal=True)
    spec, call = _spec.dense_call(p.q, p.k, p.v, score="softmax", causal=True, window=(-1, -1), scale=None,
                                  sigmoid_bias=None, silu_norm=None, softcap=0.0, precision="exact", backend="auto",
                                  return_lse=True)
    out, lse = backends.forward(spec, call)
    dout = rand(out.shape, torch.float64, gen)
    grads = backends.backward(spec, call, out, lse, dout)
    want = oa.reference.attention(p.q, p.k, p.v, causal=True)
    for g, gr in zip(grads, torch.autograd.grad(want, p.leaves(), dout)):
        assert max_err(g, gr) < 1e-10
    assert torch.autograd.gradgradcheck(lambda q, k, v: oa.attention(q, k, v, causal=True), tuple(p.leaves()),
                                        eps=1e-6, atol=1e-7)


def test_a_nan_upstream_gradient_follows_the_rule():
    """The fused kernel's backward lets 0 * NaN through masked pairs; the tiled backward does not."""
    gen = torch.Generator().manual_seed(5)
    p = dense_problem(2, 30, 30, 2, 2, 8, 8, torch.float64, gen, causal=True)
    dout = rand((2, 30, 2, 8), torch.float64, gen)
    dout[0, 10, 1, 3] = math.nan
    got = torch.autograd.grad(oa.attention(p.q, p.k, p.v, causal=True), p.leaves(), dout)
    want = torch.autograd.grad(oa.reference.attention(p.q, p.k, p.v, causal=True), p.leaves(), dout)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and torch.allclose(g, w, rtol=1e-9, atol=1e-11, equal_nan=True)
    assert got[2][0, 11:].isfinite().all() and got[2][1].isfinite().all()


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_one_tensor_in_three_roles(backend):
    """attention(x, x, x): autograd adds the three roles' gradients (the reference's rule wrapper
    once gave every role the summed gradient: 3x)."""
    gen = torch.Generator().manual_seed(6)
    x = rand((1, 13, 2, 8), torch.float64, gen).requires_grad_()
    (got,) = torch.autograd.grad(oa.attention(x, x, x, causal=True, backend=backend).sum(), x)
    roles = [x.detach().clone().requires_grad_() for _ in range(3)]
    want = sum(torch.autograd.grad(oa.reference.attention(*roles, causal=True).sum(), roles))
    assert max_err(got, want) < 1e-12

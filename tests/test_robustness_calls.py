"""Issue 14, items C and D and double backward: strided offsets, a batch of no sequences, second
derivatives. The Triton tests run under TRITON_INTERPRET=1 on CPU machines (float16/float32)."""

import pytest
import torch

import omniattn as oa
from omniattn.backends.triton import supported

from .helpers import check_outputs_and_grads, max_err, rand, varlen_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not supported(torch.device(DEVICE), explicit=True)[0],
                                  reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")


def _strided(cu: torch.Tensor) -> torch.Tensor:
    """The same offsets as a non-contiguous view (every other element of a longer tensor)."""
    wide = torch.zeros(2 * cu.numel() - 1, dtype=cu.dtype, device=cu.device)
    wide[::2] = cu
    wide[1::2] = 10_000  # garbage between: read only by a kernel that ignores the stride
    view = wide[::2]
    assert not view.is_contiguous() and torch.equal(view, cu)
    return view


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_varlen_takes_strided_cu_seqlens(dtype):
    gen = torch.Generator().manual_seed(21)
    p = varlen_problem([5, 0, 19], [7, 3, 19], 2, 1, 16, 16, dtype, gen, DEVICE, causal=True)
    cu_q, cu_k, max_q, max_k = p.varlen
    p.varlen = (_strided(cu_q), _strided(cu_k), max_q, max_k)
    check_outputs_and_grads(p, "triton", gen)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_hstu_takes_strided_seq_offsets(dtype):
    gen = torch.Generator().manual_seed(22)
    p = varlen_problem([6, 17, 2], [6, 17, 2], 2, 2, 16, 16, dtype, gen, DEVICE)
    offsets = _strided(p.varlen[0].long())
    targets = _strided(torch.tensor([1, 2, 0], device=DEVICE))

    def fn():
        return oa.hstu_attention(p.q, p.k, p.v, offsets, 20, num_targets=targets, backend="triton")

    def ref(dt):
        return oa.reference.hstu_attention(p.q, p.k, p.v, offsets.contiguous(), 20, num_targets=targets, dtype=dt)

    check_outputs_and_grads(p, "triton", gen, fn=fn, ref=ref)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_batch_of_no_sequences_backpropagates(backend):
    """Dense B=0, varlen and HSTU with no sequences: an output in the graph, zero-size gradients."""
    q = torch.randn(0, 9, 2, 8, requires_grad=True)
    out, lse = oa.attention(q, q, q, backend=backend, return_lse=True)
    assert out.grad_fn is not None and lse.shape == (0, 2, 9)
    (out.sum() + lse.sum()).backward()
    assert q.grad.shape == q.shape
    packed = torch.randn(0, 2, 8, requires_grad=True)
    none = torch.zeros(1, dtype=torch.int32)
    out = oa.attention_varlen(packed, packed, packed, none, none, 0, 0, backend=backend, score="sigmoid")
    hstu = oa.hstu_attention(packed, packed, packed, none, 0, backend=backend)
    (grad,) = torch.autograd.grad(out.sum() + hstu.sum(), packed)
    assert grad.shape == packed.shape


@needs_triton
def test_triton_double_backward_says_it_is_not_supported():
    gen = torch.Generator().manual_seed(23)
    q, k, v = (rand((1, 20, 2, 16), torch.float32, gen, DEVICE).requires_grad_() for _ in range(3))
    out = oa.attention(q, k, v, causal=True, backend="triton")
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)  # first order: fine
    (want,) = torch.autograd.grad(oa.reference.attention(q, k, v, causal=True).sum(), q)
    assert max_err(g, want) < 1e-4
    with pytest.raises(RuntimeError, match="double backward through omniattn's Triton kernels is not supported"):
        g.pow(2).sum().backward()


@needs_triton
def test_triton_gradient_when_q_k_v_are_one_tensor():
    """Self-attention written as attention(x, x, x): autograd must add the three roles' gradients."""
    gen = torch.Generator().manual_seed(24)
    x = rand((1, 20, 2, 16), torch.float32, gen, DEVICE).requires_grad_()
    (got,) = torch.autograd.grad(oa.attention(x, x, x, causal=True, backend="triton").sum(), x)
    (want,) = torch.autograd.grad(oa.reference.attention(x, x, x, causal=True).sum(), x)
    assert max_err(got, want) < 1e-4

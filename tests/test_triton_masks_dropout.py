"""Explicit masks and dropout in the Triton kernels against the reference (outputs and gradients).

Under TRITON_INTERPRET=1 on CI (float32/float16); the tiled backend's own tests are in
tests/test_torch_masks.py."""

import pytest
import torch

import omniattn as oa
from omniattn.backends.triton import supported

from .helpers import check_outputs_and_grads, dense_problem, rand

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not supported(torch.device(DEVICE), explicit=True)[0],
                                reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")


def _mask(kind: str, shape, gen):
    if kind == "bool":
        m = torch.rand(shape, generator=gen) > 0.3
        m[..., 0] = True  # no fully masked row (those give 0, tested separately)
        return m.to(DEVICE)
    m = rand(shape, torch.float32, gen) * 2
    m[torch.rand(shape, generator=gen) < 0.2] = float("-inf")
    m[..., 0] = 0.0
    return m.to(DEVICE)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("kind,shape", [("bool", (2, 3, 29, 41)), ("float", (1, 1, 29, 41)), ("bool", (2, 1, 1, 41)),
                                        ("float", (3, 29, 41))])
def test_attention_mask_matches_reference(score, kind, shape, monkeypatch):
    gen = torch.Generator().manual_seed(len(shape) * 10 + len(score))
    mask = _mask(kind, shape, gen)
    p = dense_problem(2, 29, 41, 3, 1, 16, 16, torch.float32, gen, DEVICE, score=score, causal=score == "sigmoid",
                      attn_mask=mask)
    check_outputs_and_grads(p, "triton", gen)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_dropout_matches_reference(score):
    gen = torch.Generator().manual_seed(3 + len(score))
    p = dense_problem(2, 33, 45, 4, 2, 16, 16, torch.float32, gen, DEVICE, score=score, causal=True, dropout_p=0.3)

    def fn():
        torch.manual_seed(1234)  # the call draws its seed from torch's default generator
        return oa.attention(p.q, p.k, p.v, backend="triton", **p.kwargs)

    def ref(dtype):
        torch.manual_seed(1234)
        return oa.reference.attention(p.q, p.k, p.v, dtype=dtype, **p.kwargs)

    check_outputs_and_grads(p, "triton", gen, fn=fn, ref=ref)


def test_fully_masked_rows_give_zero():
    gen = torch.Generator().manual_seed(9)
    q = rand((1, 20, 2, 16), torch.float32, gen, DEVICE)
    mask = torch.ones(1, 1, 20, 30, dtype=torch.bool, device=DEVICE)
    mask[0, 0, 5] = False
    out, lse = oa.attention(q, q.repeat(1, 2, 1, 1)[:, :30], q.repeat(1, 2, 1, 1)[:, :30], attn_mask=mask,
                            backend="triton", return_lse=True)
    assert out[0, 5].abs().max() == 0 and torch.isinf(lse[0, :, 5]).all()

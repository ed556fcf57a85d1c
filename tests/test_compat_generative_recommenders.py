"""omniattn.compat.generative_recommenders.hstu_mha against generative-recommenders' PyTorch reference:
a committed fixture of their outputs (always), and their live code when a checkout is configured."""

import inspect
import os

import pytest
import torch

from omniattn.compat.generative_recommenders import hstu_mha

from .fixtures.make_hstu_mha_fixture import CASES, case_kwargs, inputs
from .gr_reference import ENV, load
from .helpers import max_err

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hstu_mha_reference.pt")

# generative_recommenders/ops/hstu_attention.py::hstu_mha (main, 2026-11), names and defaults; their
# `kernel` default is HammerKernel.PYTORCH, ours None (the argument is ignored).
THEIR_SIGNATURE = [
    ("max_seq_len", inspect.Parameter.empty), ("alpha", inspect.Parameter.empty), ("q", inspect.Parameter.empty),
    ("k", inspect.Parameter.empty), ("v", inspect.Parameter.empty), ("seq_offsets", inspect.Parameter.empty),
    ("causal", True), ("dropout_pr", 0.0), ("training", True), ("num_targets", None), ("max_attn_len", 0),
    ("contextual_seq_len", 0), ("min_full_attn_seq_len", 0), ("sort_by_length", False), ("kernel", None),
    ("enable_tma", False),
]


def test_signature_matches_theirs():
    params = [(p.name, p.default) for p in inspect.signature(hstu_mha).parameters.values()]
    assert params[: len(THEIR_SIGNATURE)] == THEIR_SIGNATURE
    assert params[len(THEIR_SIGNATURE):] == [("attn_scale", None)]  # from their CUDA kernel's signature


@pytest.mark.parametrize("index", range(len(CASES)))
def test_matches_their_reference_fixture(index):
    saved = torch.load(FIXTURE)
    x = saved["inputs"]
    assert saved["cases"][index] == CASES[index]
    got = hstu_mha(x["max_seq_len"], x["alpha"], x["q"], x["k"], x["v"], x["seq_offsets"], **case_kwargs(x, CASES[index]))
    assert got.shape == saved["outputs"][index].shape
    assert max_err(got, saved["outputs"][index]) < 1e-12


def test_min_full_attn_seq_len_changes_the_rows_it_should():
    """The fixture cases with min_full_attn_seq_len only test it if it changes something."""
    x = inputs()
    base = dict(num_targets=x["num_targets"], max_attn_len=2)
    a = hstu_mha(x["max_seq_len"], x["alpha"], x["q"], x["k"], x["v"], x["seq_offsets"], **base)
    b = hstu_mha(x["max_seq_len"], x["alpha"], x["q"], x["k"], x["v"], x["seq_offsets"], min_full_attn_seq_len=3, **base)
    changed = (a - b).abs().amax((1, 2)) > 0
    assert changed.any() and not changed.all()


def test_attn_scale_dropout_and_gradients():
    x = inputs(1)
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    scale = torch.tensor([0.25], dtype=torch.float32)
    a = hstu_mha(16, 0.4, q, k, v, x["seq_offsets"], attn_scale=scale)
    b = hstu_mha(16, 0.4, q, k, v, x["seq_offsets"])
    assert max_err(a, b * 16 * 0.25) < 1e-12  # attn_scale replaces 1 / max_seq_len
    torch.autograd.grad(a.sum(), (q, k, v))
    torch.manual_seed(0)
    dropped = hstu_mha(16, 0.4, q, k, v, x["seq_offsets"], dropout_pr=0.5)
    assert max_err(dropped, b) > 1e-3
    assert torch.equal(hstu_mha(16, 0.4, q, k, v, x["seq_offsets"], dropout_pr=0.5, training=False), b)


@pytest.mark.skipif(load() is None, reason=f"no generative-recommenders checkout ({ENV} unset)")
@pytest.mark.parametrize("causal", [True, False])
def test_matches_their_live_reference(causal):
    reference = load()
    gen = torch.Generator().manual_seed(7)
    lens = [13, 1, 7, 0, 10]
    offsets = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q, k = (torch.randn(sum(lens), 3, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(sum(lens), 3, 8, generator=gen, dtype=torch.float64)
    nt = torch.tensor([3, 0, 2, 0, 1])
    for kw in [dict(), dict(num_targets=nt, max_attn_len=4, min_full_attn_seq_len=2), dict(contextual_seq_len=2, num_targets=nt)]:
        want = reference(20, 0.3, q, k, v, offsets, causal=causal, **kw)
        assert max_err(hstu_mha(20, 0.3, q, k, v, offsets, causal=causal, **kw), want) < 1e-12

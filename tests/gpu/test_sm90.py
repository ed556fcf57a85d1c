"""GPU-only: Hopper's Gluon forward (fwd_sm90) — taken where its rule says so, equal to the reference,
every output element written (outputs poisoned with NaN first), gradients through the template's
backward from its output and lse."""

import pytest
import torch

import omniattn as oa
from omniattn.backends.triton import launch

from ..helpers import (PoisonedTorch, api_fn, assert_tolerance, check_outputs_and_grads, dense_problem, float64_leaves,
                       reference_fn, varlen_problem)

DEV = "cuda"
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9 or launch._sm90_kernel() is None,
    reason="Hopper (sm_90) with Triton's Gluon only")


@pytest.fixture
def sm90_calls(monkeypatch):
    """Counts the calls that took the Hopper kernel; every tensor launch.py allocates starts as NaN."""
    calls = []
    real = launch._forward_sm90

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "_forward_sm90", counting)
    monkeypatch.setattr(launch, "torch", PoisonedTorch())
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 777, 1333, 8, 2, 128), (1, 1500, 700, 4, 4, 96), (3, 129, 129, 2, 1, 128)])
def test_dense(sm90_calls, dtype, score, causal, shape):
    """Odd lengths (a last tile crossing the end), GQA, Lq > Lk under causal (rows with no key: 0,
    lse -inf) and Lq < Lk, head dim 96 (channels zero-filled by the descriptors)."""
    b, nq, nk, hq, hkv, d = shape
    gen = torch.Generator().manual_seed(nq * 7 + nk + d + causal)
    p = dense_problem(b, nq, nk, hq, hkv, d, d, dtype, gen, DEV, score=score, causal=causal)
    check_outputs_and_grads(p, "triton", gen)
    assert sm90_calls


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("mods", [dict(), dict(causal=True), dict(window=(50, 0), softcap=10.0)])
def test_packed_with_empty_sequences(sm90_calls, score, mods):
    """Packed sequences, one without queries and one without keys (its descriptor reads one masked
    row at the tensor's start), lengths off the 128-row tiles; a window with softcap per sequence."""
    gen = torch.Generator().manual_seed(11 + len(mods))
    lens_q = [0, 300, 1, 129, 200, 517]
    lens_k = [5, 0, 77, 129, 400, 517]
    p = varlen_problem(lens_q, lens_k, 6, 3, 128, 128, torch.bfloat16, gen, DEV, score=score, **mods)
    check_outputs_and_grads(p, "triton", gen)
    assert sm90_calls


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_sequence_without_keys_ignores_other_sequences(sm90_calls, score):
    """A sequence without keys reads its descriptor's one row from another sequence: infinite values
    there must not reach its output (0, DESIGN.md: nothing crosses sequences)."""
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 4, 4], dtype=torch.int32, device=DEV)
    q = torch.randn(9, 2, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(4, 2, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(4, 2, 128, device=DEV, dtype=torch.bfloat16)
    v[0] = float("inf")
    out = oa.attention_varlen(q, k, v, cu_q, cu_k, 5, 4, score=score)
    assert sm90_calls
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))


def test_misaligned_output_heads_take_the_template(sm90_calls):
    """Inputs sliced to head dim 100 from padded storage pass the input checks of TMA, but the
    output's heads (a fresh tensor of head dim 100) start off 16 bytes: the template takes them."""
    gen = torch.Generator().manual_seed(3)
    p = dense_problem(2, 300, 300, 2, 2, 104, 104, torch.bfloat16, gen, DEV)
    p.q, p.k, p.v = (t.detach()[..., :100].requires_grad_() for t in (p.q, p.k, p.v))
    check_outputs_and_grads(p, "triton", gen)
    assert not sm90_calls


def test_more_than_65535_sequence_heads_take_the_template(sm90_calls):
    """The kernel's grid puts (sequence, head) pairs on its second axis (at most 65535): such calls
    take the template's forward (a tile list). Forward only: the template's backward has the same
    limit in its delta kernel's grid (a known gap, benchmarks/NOTES.md session 10)."""
    gen = torch.Generator().manual_seed(4)
    p = varlen_problem([2] * 4100, [2] * 4100, 16, 16, 128, 128, torch.bfloat16, gen, DEV)
    with torch.no_grad():
        out = p.run(api_fn(p), backend="triton")
        with float64_leaves(p):
            out64 = p.run(reference_fn(p), dtype=torch.float64)
        out_same = p.run(reference_fn(p), dtype=torch.bfloat16)
    assert_tolerance("out", out, out64, out_same, torch.bfloat16)
    assert not sm90_calls


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("mods", [dict(window=(100, 0)), dict(window=(64, 64)), dict(window=(-1, 50)),
                                  dict(window=(300, -1)), dict(softcap=5.0), dict(causal=True, alibi=True),
                                  dict(window=(200, 0), softcap=20.0, alibi=True)])
def test_windows_softcap_alibi(sm90_calls, score, mods):
    """Sliding windows (left only, right only, both; tiles skipped before the window's start),
    softcap and ALiBi (DESIGN.md's order), on lengths off the tiles with Lq != Lk and GQA."""
    mods = dict(mods)
    gen = torch.Generator().manual_seed(len(str(mods)) + len(score))
    if mods.pop("alibi", False):
        mods["alibi_slopes"] = torch.rand(2, 6, generator=gen).to(DEV) * 0.1
    p = dense_problem(2, 700, 901, 6, 2, 128, 128, torch.bfloat16, gen, DEV, score=score, **mods)
    check_outputs_and_grads(p, "triton", gen)
    assert sm90_calls


def test_sigmoid_bias_and_scale(sm90_calls):
    gen = torch.Generator().manual_seed(5)
    p = dense_problem(2, 400, 300, 4, 2, 128, 128, torch.bfloat16, gen, DEV, score="sigmoid", sigmoid_bias=-2.5,
                      scale=0.05)
    check_outputs_and_grads(p, "triton", gen)
    assert sm90_calls


@pytest.mark.parametrize("kwargs,taken", [
    (dict(), True),
    (dict(causal=True), True),
    (dict(window=(64, 0)), True),
    (dict(softcap=30.0), True),
    (dict(attn_mask=True), False),
    (dict(dropout_p=0.1), False),
    (dict(dtype=torch.float32), False),
    (dict(d=64), False),
    (dict(scale=-0.1), False),
])
def test_rule(sm90_calls, kwargs, taken):
    """Which calls take the Hopper kernel: attention masks, dropout, float32, head dims of 64 and
    below and scales <= 0 stay on the template."""
    dtype = kwargs.pop("dtype", torch.bfloat16)
    d = kwargs.pop("d", 128)
    q = torch.randn(1, 256, 2, d, device=DEV, dtype=dtype)
    if kwargs.pop("attn_mask", False):
        kwargs["attn_mask"] = torch.rand(256, 256, device=DEV) > 0.3
    out = oa.attention(q, q, q, **kwargs)
    assert torch.isfinite(out).all()
    assert bool(sm90_calls) == taken


def test_switch_off_gives_the_template(sm90_calls, monkeypatch):
    """OMNIATTN_SM90=0 sends the call to the template; both agree within 16-bit rounding."""
    q, k, v = (torch.randn(2, 1000, 4, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    fast = oa.attention(q, k, v, causal=True)
    assert len(sm90_calls) == 1
    monkeypatch.setenv("OMNIATTN_SM90", "0")
    slow = oa.attention(q, k, v, causal=True)
    assert len(sm90_calls) == 1
    assert (fast.float() - slow.float()).abs().max().item() < 2e-2

"""GPU-only: Hopper's Gluon forward (fwd_sm90) and backward (bwd_sm90) — taken where their rules
say so, equal to the reference, every output element written (outputs poisoned with NaN first),
gradients from the Gluon backward (or the template's where its rule sends them)."""

import pytest
import torch

import omniattn as oa
from omniattn.backends.triton import launch

from ..helpers import PoisonedTorch, check_outputs_and_grads, dense_problem, varlen_problem

DEV = "cuda"
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9 or launch._sm90_kernel() is None,
    reason="Hopper (sm_90) with Triton's Gluon only")


class _Calls(list):
    """The forwards that took the Hopper kernel; ``bwd``: the backwards that did."""

    def __init__(self):
        super().__init__()
        self.bwd = []


@pytest.fixture
def sm90_calls(monkeypatch):
    """Counts the calls that took the Hopper kernels; every tensor launch.py allocates starts as NaN."""
    calls = _Calls()
    real_fwd, real_bwd = launch._sm90_forward_plan, launch._sm90_backward_plan

    def counting_fwd(*args, **kwargs):  # a plan whose every run counts (plans are kept per signature)
        run = real_fwd(*args, **kwargs)
        return lambda q, *rest: calls.append(q.shape) or run(q, *rest)

    def counting_bwd(*args, **kwargs):
        run = real_bwd(*args, **kwargs)
        return lambda dout, q, *rest: calls.bwd.append(q.shape) or run(dout, q, *rest)

    monkeypatch.setattr(launch, "_sm90_forward_plan", counting_fwd)
    monkeypatch.setattr(launch, "_sm90_backward_plan", counting_bwd)
    monkeypatch.setattr(launch, "torch", PoisonedTorch())
    # the kernel on short causal calls too (the rule sends them to the template: faster there)
    monkeypatch.setattr(launch, "SM90_BWD_CAUSAL_MIN_KEYS", 0)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 777, 1333, 8, 2, 128), (1, 1500, 700, 4, 4, 96), (3, 129, 129, 2, 1, 128),
                                   (2, 333, 1000, 4, 2, 256), (1, 900, 450, 2, 2, 200)])
def test_dense(sm90_calls, dtype, score, causal, shape):
    """Odd lengths (a last tile crossing the end), GQA, Lq > Lk under causal (rows with no key: 0,
    lse -inf) and Lq < Lk, head dims 96 and 200 (channels zero-filled by the descriptors); head
    dims past 128 (one Q slot the output leaves from, 64-key tiles) take the template's backward."""
    b, nq, nk, hq, hkv, d = shape
    gen = torch.Generator().manual_seed(nq * 7 + nk + d + causal)
    p = dense_problem(b, nq, nk, hq, hkv, d, d, dtype, gen, DEV, score=score, causal=causal)
    check_outputs_and_grads(p, "triton", gen)
    assert sm90_calls and bool(sm90_calls.bwd) == (d <= 128)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("mods", [dict(), dict(causal=True), dict(window=(50, 0), softcap=10.0)])
@pytest.mark.parametrize("d", [128, 256])
def test_packed_with_empty_sequences(sm90_calls, score, mods, d):
    """Packed sequences, one without queries and one without keys (its descriptor reads one masked
    row at the tensor's start), lengths off the 128-row tiles; a window with softcap per sequence."""
    gen = torch.Generator().manual_seed(11 + len(mods) + d)
    lens_q = [0, 300, 1, 129, 200, 517]
    lens_k = [5, 0, 77, 129, 400, 517]
    p = varlen_problem(lens_q, lens_k, 6, 3, d, d, torch.bfloat16, gen, DEV, score=score, **mods)
    check_outputs_and_grads(p, "triton", gen)
    assert sm90_calls
    assert bool(sm90_calls.bwd) == ("softcap" not in mods and d <= 128)  # softcap's backward: the template


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


def test_more_than_65535_sequence_heads(sm90_calls):
    """More (sequence, head) pairs than a grid axis holds (65535): the persistent Hopper forward
    walks them all, the backward's delta kernel too (its grid had that limit on a second axis until
    session 10)."""
    gen = torch.Generator().manual_seed(4)
    p = varlen_problem([2] * 4100, [2] * 4100, 16, 16, 128, 128, torch.bfloat16, gen, DEV)
    check_outputs_and_grads(p, "triton", gen)
    assert sm90_calls and sm90_calls.bwd


HSTU_CASES = [
    # lengths (an empty and a one-token sequence, lengths off the 128-row tiles), targets, causal,
    # contextual prefix, max_attn_len, head dim
    ([700, 1, 0, 1024, 33, 257], [20, 0, 0, 20, 5, 0], True, 0, 0, 128),
    ([700, 1, 0, 1024, 33, 257], None, True, 0, 0, 96),
    ([513, 300, 129, 64], [7, 297, 1, 0], True, 3, 100, 128),
    ([513, 300, 129, 64], [7, 0, 1, 0], False, 2, 130, 128),
    ([390, 256], None, False, 0, 0, 128),
    ([700, 1, 0, 300, 33], [20, 0, 0, 7, 5], True, 0, 0, 256),
]


@pytest.mark.parametrize("lens, targets, causal, contextual, max_attn_len, d", HSTU_CASES)
def test_hstu_masks(sm90_calls, lens, targets, causal, contextual, max_attn_len, d):
    """HSTU's masks in the Hopper kernel (targets see the history and themselves, a contextual
    prefix, max_attn_len, causal or not): outputs and gradients against the reference."""
    from ..test_torch_tiled import hstu_problem

    case = dict(lens=lens, causal=causal, contextual=contextual, targets=targets, max_attn_len=max_attn_len,
                rab=None, bucketization="log", heads=4, d=d, dv=d, extra_len=3, dtype=torch.bfloat16,
                seed=len(lens) * 31 + d + max_attn_len)
    p, offsets, max_len, kw, _, gen = hstu_problem(case)
    p.q, p.k, p.v = (t.detach().to(DEV).requires_grad_() for t in (p.q, p.k, p.v))
    offsets = offsets.to(DEV)
    kw = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

    def fn():
        return oa.hstu_attention(p.q, p.k, p.v, offsets, max_len, backend="triton", **kw)

    def ref(dtype):
        return oa.reference.hstu_attention(p.q, p.k, p.v, offsets, max_len, dtype=dtype, **kw)

    check_outputs_and_grads(p, "triton", gen, fn=fn, ref=ref)
    assert sm90_calls and bool(sm90_calls.bwd) == (d <= 128)


def test_hstu_with_relative_bias_takes_the_template(sm90_calls):
    from ..test_torch_tiled import hstu_problem

    case = dict(lens=[300, 77], causal=True, contextual=0, targets=[5, 0], max_attn_len=0, rab="shared",
                bucketization="log", heads=2, d=128, dv=128, extra_len=0, dtype=torch.bfloat16, seed=8)
    p, offsets, max_len, kw, _, _ = hstu_problem(case)
    kw = {k: (v.to(DEV) if isinstance(v, (torch.Tensor, torch.nn.Module)) else v) for k, v in kw.items()}
    oa.hstu_attention(p.q.detach().to(DEV), p.k.detach().to(DEV), p.v.detach().to(DEV), offsets.to(DEV), max_len,
                      backend="triton", **kw)
    assert not sm90_calls


def _chain_problem(case, gen):
    """Problems whose items differ in key tiles (odd and even counts), for test_programs_chain_items."""
    bf16 = torch.bfloat16
    if case == "silu-causal-gqa":
        return dense_problem(2, 700, 900, 4, 2, 128, 128, bf16, gen, DEV, score="silu", causal=True)
    if case == "sigmoid-fp16-d96":
        return dense_problem(1, 1000, 1000, 4, 4, 96, 96, torch.float16, gen, DEV, score="sigmoid")
    if case == "softmax-d256-causal-gqa":  # one Q slot: each item's Q waits for the previous item's output
        return dense_problem(2, 700, 900, 4, 2, 256, 256, bf16, gen, DEV, causal=True)
    if case == "sigmoid-d256-packed":
        return varlen_problem([0, 300, 1, 129, 200, 517], [5, 0, 77, 129, 400, 517], 4, 2, 256, 256, bf16, gen, DEV,
                              score="sigmoid")
    if case == "softmax-alibi-causal":
        return dense_problem(2, 333, 333, 2, 1, 128, 128, bf16, gen, DEV, causal=True,
                             alibi_slopes=torch.rand(2, device=DEV))
    return varlen_problem([0, 300, 1, 129, 200, 517], [5, 0, 77, 129, 400, 517], 6, 3, 128, 128, bf16, gen, DEV,
                          window=(50, 0), softcap=10.0)


@pytest.mark.parametrize("programs", [1, 3])
@pytest.mark.parametrize("case", ["silu-causal-gqa", "sigmoid-fp16-d96", "softmax-alibi-causal", "packed-window-softcap",
                                  "hstu", "softmax-d256-causal-gqa", "sigmoid-d256-packed"])
def test_programs_chain_items(sm90_calls, monkeypatch, programs, case):
    """One or three programs for every item of the call: each runs a long chain of items with
    different key-tile counts (the K/V ring's position and the ping-pong turns carried across
    items, the output buffer and the descriptors reused while the previous item's store and loads
    may be in flight; padding items of packed sequences skipped between them)."""
    monkeypatch.setattr(launch, "sm90_programs", lambda device, items: min(items, programs))
    gen = torch.Generator().manual_seed(programs * 13 + len(case))
    if case == "hstu":
        lens, targets, causal, contextual, max_attn_len, d = HSTU_CASES[2]
        test_hstu_masks(sm90_calls, lens, targets, causal, contextual, max_attn_len, d)
        return
    check_outputs_and_grads(_chain_problem(case, gen), "triton", gen)
    assert sm90_calls


def test_more_work_items_than_the_kernel_counts_take_the_template(sm90_calls, monkeypatch):
    """The kernel counts its work items in 32 bits: calls with more (SM90_MAX_ITEMS, lowered here)
    take the template."""
    monkeypatch.setattr(launch, "SM90_MAX_ITEMS", 7)
    gen = torch.Generator().manual_seed(5)
    p = dense_problem(1, 1024, 1024, 1, 1, 128, 128, torch.bfloat16, gen, DEV)  # 8 query tiles
    check_outputs_and_grads(p, "triton", gen)
    assert not sm90_calls
    p = dense_problem(1, 896, 896, 1, 1, 128, 128, torch.bfloat16, gen, DEV)  # 7
    check_outputs_and_grads(p, "triton", gen)
    assert sm90_calls


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test (warn_only: PyTorch's own ops in the
    test may have no deterministic version)."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn)


@pytest.mark.parametrize("how", ["per call", "torch.use_deterministic_algorithms"])
def test_deterministic_backward_takes_the_template(sm90_calls, request, how):
    """The Hopper backward sums dQ by float32 TMA reductions, in no fixed order; with
    ``deterministic=True`` or under torch.use_deterministic_algorithms(True) the backward takes the
    template (fixed-order reductions): two backward passes give identical bits, and equal the
    reference's."""
    if how != "per call":
        request.getfixturevalue("deterministic_algorithms")
    kw = dict(deterministic=True) if how == "per call" else {}
    gen = torch.Generator().manual_seed(9)
    lens = [1000, 3, 517, 2048, 64]
    p = varlen_problem(lens, lens, 8, 2, 128, 128, torch.bfloat16, gen, DEV, causal=True)
    check_outputs_and_grads(p, "triton", gen,
                            fn=lambda *a, **k2: p.run(oa.attention_varlen, backend="triton", **kw, **k2))
    cu, _, mq, mk = p.varlen
    dout = torch.randn(p.q.shape, generator=gen).to(DEV, p.q.dtype)
    runs = []
    for _ in range(2):
        for t in (p.q, p.k, p.v):
            t.grad = None
        oa.attention_varlen(p.q, p.k, p.v, cu, cu, mq, mk, causal=True, backend="triton", **kw).backward(dout)
        runs.append([t.grad.clone() for t in (p.q, p.k, p.v)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert sm90_calls and not sm90_calls.bwd
    oa.attention_varlen(p.q, p.k, p.v, cu, cu, mq, mk, causal=True, backend="triton").backward(dout)
    assert bool(sm90_calls.bwd) == (how == "per call")  # without the keyword: the Gluon backward


def test_short_causal_backward_takes_the_template(sm90_calls, monkeypatch):
    """Causal calls of fewer than SM90_BWD_CAUSAL_MIN_KEYS keys take the template's backward
    (measured faster there); at that many keys the Gluon backward."""
    monkeypatch.setattr(launch, "SM90_BWD_CAUSAL_MIN_KEYS", 1000)
    gen = torch.Generator().manual_seed(12)
    check_outputs_and_grads(dense_problem(1, 999, 999, 2, 1, 128, 128, torch.bfloat16, gen, DEV, causal=True),
                            "triton", gen)
    assert sm90_calls and not sm90_calls.bwd
    check_outputs_and_grads(dense_problem(1, 999, 1000, 2, 1, 128, 128, torch.bfloat16, gen, DEV, causal=True),
                            "triton", gen)
    assert sm90_calls.bwd


def _quantized(monkeypatch, hopper: bool, fn):
    """``fn()`` on the Hopper kernel or (hopper False) the template: the same quantization kernels
    feed both, so the two see identical quantized tensors."""
    monkeypatch.setenv("OMNIATTN_SM90", "1" if hopper else "0")
    with torch.no_grad():
        out = fn()
    monkeypatch.delenv("OMNIATTN_SM90")
    return out


# (max |difference| over max |output|, relative L1) between the Hopper kernel and the template on the
# same quantized tensors: float32 sums in another order, so the 16-bit outputs may round one step
# (2^-8 of the largest) apart, and where P runs in FP8 an e4m3 rounding of P that a last-bit
# difference before it can flip (one step: 1/16 of that probability)
SAME_QUANT = {"int8": (8e-3, 1e-4), "int8-fp8": (2e-2, 2e-3), "fp8": (2e-2, 2e-3)}


@pytest.mark.parametrize("precision", ["int8", "int8-fp8", "fp8"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("layout", ["dense-gqa", "dense-causal", "packed", "packed-causal"])
def test_quantized(sm90_calls, monkeypatch, precision, score, layout):
    """The quantized forward on the Hopper kernel (FP8 P.V in one accumulator, as it takes it):
    close to the template's on the same quantized tensors (SAME_QUANT), as accurate as the template
    against the exact reference on outlier-key inputs, every output element written (outputs
    poisoned), the lse too, inputs unchanged. Dense calls have 1328 keys (an FP8 V^T's rows must be
    a multiple of 16 bytes), packed ones lengths off the 128-row tiles and the 16-token V^T columns,
    one sequence without keys."""
    from ..test_quant import ACCURACY, cosine, offset_keys

    gen = torch.Generator().manual_seed(len(layout) * 7 + len(score) + len(precision))
    causal = layout.endswith("causal")
    kw = dict(score=score, causal=causal, precision=precision, quant_config=oa.QuantConfig(pv_accum="fp32"))
    if layout.startswith("dense"):
        q, k, v = offset_keys((2, 777, 8, 128), (2, 1328, 2, 128), gen, dtype=torch.bfloat16, device=DEV)

        def run(return_lse=False):
            return oa.attention(q, k, v, return_lse=return_lse, **kw)

        def ref():
            return oa.reference.attention(q.float(), k.float(), v.float(), score=score, causal=causal,
                                          dtype=torch.float32)
    else:
        lens_q, lens_k = [300, 1, 517, 129, 40], [333, 0, 517, 100, 1000]
        cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        q, k, v = offset_keys((sum(lens_q), 4, 96), (sum(lens_k), 4, 96), gen, dtype=torch.bfloat16, device=DEV)
        args = (cu_q, cu_k, max(lens_q), max(lens_k))

        def run(return_lse=False):
            return oa.attention_varlen(q, k, v, *args, return_lse=return_lse, **kw)

        def ref():
            return oa.reference.attention_varlen(q.float(), k.float(), v.float(), *args, score=score, causal=causal,
                                                 dtype=torch.float32)
    before = [t.clone() for t in (q, k, v)]
    got = _quantized(monkeypatch, True, run)
    assert len(sm90_calls) == 1
    template = _quantized(monkeypatch, False, run)
    assert len(sm90_calls) == 1
    assert torch.isfinite(got).all()
    max_diff, l1 = SAME_QUANT[precision]
    diff = (got.float() - template.float()).abs()
    assert diff.max() <= max_diff * template.float().abs().max(), diff.max()
    assert diff.sum() <= l1 * template.float().abs().sum(), diff.sum() / template.float().abs().sum()
    want = ref()
    cos_bar, l1_bar = ACCURACY[precision]
    assert cosine(got, want) >= min(cos_bar, cosine(template, want) - 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))
    if score == "softmax":  # the lse: smoothing's row term and P's x448 taken out again
        _, lse = _quantized(monkeypatch, True, lambda: run(return_lse=True))
        _, lse_template = _quantized(monkeypatch, False, lambda: run(return_lse=True))
        ok = torch.isfinite(lse_template)
        assert torch.equal(ok, torch.isfinite(lse)) and (lse[~ok] == float("-inf")).all()
        torch.testing.assert_close(lse[ok], lse_template[ok], atol=2e-3, rtol=0)


def test_quantized_hstu(sm90_calls, monkeypatch):
    """HSTU (SiLU, targets, jagged) with INT8 Q.K and FP8 P.V on the Hopper kernel, against the template."""
    gen = torch.Generator().manual_seed(17)
    lens = [700, 33, 1200]
    offsets = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV)
    q, k, v = (torch.randn(sum(lens), 4, 128, generator=gen).to(DEV, torch.bfloat16) for _ in range(3))
    kw = dict(num_targets=torch.tensor([5, 1, 9], device=DEV), precision="int8-fp8",
              quant_config=oa.QuantConfig(pv_accum="fp32"))
    got = _quantized(monkeypatch, True, lambda: oa.hstu_attention(q, k, v, offsets, 1200, **kw))
    assert len(sm90_calls) == 1
    template = _quantized(monkeypatch, False, lambda: oa.hstu_attention(q, k, v, offsets, 1200, **kw))
    diff = (got.float() - template.float()).abs()
    assert diff.max() <= 2e-2 * template.float().abs().max() and diff.sum() <= 2e-3 * template.float().abs().sum()


def test_quantized_int4_smoothed_q_and_two_level_fp8_take_the_template(sm90_calls):
    q = torch.randn(1, 256, 2, 128, device=DEV, dtype=torch.bfloat16)
    one = oa.QuantConfig(pv_accum="fp32")
    with torch.no_grad():
        oa.attention(q, q, q, precision="int4-fp8", quant_config=one)
        oa.attention(q, q, q, precision="int8", quant_config=oa.QuantConfig(smooth_q=True))
        oa.attention(q, q, q, precision="int8-fp8")  # FP8 P.V summed in two levels (the default)
        oa.attention(q, q, q, precision="fp8")
        oa.attention(q[:, :200], q[:, :200], q[:, :200], precision="int8-fp8", quant_config=one)  # V^T rows of 200 B
    assert not sm90_calls

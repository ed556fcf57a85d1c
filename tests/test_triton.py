"""The Triton kernels against the reference: under TRITON_INTERPRET=1 on CI, on the GPU where there
is one. The interpreter computes bf16 wrongly, so these use float16 and float32; bf16 and large
shapes are in tests/gpu/."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omniattn as oa
from omniattn.backends.triton import supported

from .helpers import check_outputs_and_grads, dense_problem, max_err, rand, varlen_problem
from .test_torch_tiled import hstu_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not supported(torch.device(DEVICE), explicit=True)[0],
                                reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")


def _poison_outputs(monkeypatch):
    """Every buffer the launcher allocates with torch.empty/empty_like starts as NaN."""
    from omniattn.backends.triton import launch

    real_empty, real_empty_like = torch.empty, torch.empty_like

    class PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*a, **kw):
            t = real_empty(*a, **kw)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        @staticmethod
        def empty_like(*a, **kw):
            t = real_empty_like(*a, **kw)
            return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(launch, "torch", PoisonedTorch())


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    _poison_outputs(monkeypatch)
    yield


CASES = [
    # (score, kwargs, (B, Nq, Nk), Hq, Hkv, D, Dv)
    ("softmax", dict(), (2, 37, 53), 2, 1, 32, 32),
    ("softmax", dict(causal=True), (1, 70, 70), 2, 2, 16, 16),
    ("softmax", dict(causal=True), (1, 45, 20), 3, 1, 16, 24),  # Nq > Nk: empty rows
    ("softmax", dict(window=(9, 4)), (1, 61, 66), 2, 2, 64, 64),
    ("softmax", dict(causal=True, window=(17, 0), softcap=3.0), (2, 33, 48), 4, 2, 16, 16),
    ("softmax", dict(alibi=True), (1, 40, 40), 2, 1, 40, 40),
    ("sigmoid", dict(), (2, 29, 50), 2, 1, 32, 32),
    ("sigmoid", dict(causal=True, alibi=True), (1, 64, 64), 2, 2, 16, 16),
    ("sigmoid", dict(window=(5, 5), softcap=2.0), (1, 50, 41), 2, 2, 16, 32),
    ("silu", dict(), (1, 39, 39), 2, 2, 16, 16),
    ("silu", dict(causal=True), (2, 50, 61), 4, 1, 32, 16),
    ("silu", dict(window=(12, 0), alibi=True, softcap=4.0), (1, 47, 47), 2, 2, 16, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'-'.join(c[1]) or 'plain'}-{c[2]}")
def test_dense_matches_reference(case, dtype):
    score, kw, (b, nq, nk), hq, hkv, d, dv = case
    gen = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    kw = dict(kw, score=score)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(hq, generator=gen).to(DEVICE)
    p = dense_problem(b, nq, nk, hq, hkv, d, dv, dtype, gen, DEVICE, **kw)
    check_outputs_and_grads(p, "triton", gen)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_varlen_matches_reference(score):
    gen = torch.Generator().manual_seed(7)
    p = varlen_problem([3, 0, 17, 40, 1], [9, 5, 0, 33, 1], 4, 2, 32, 32, torch.float16, gen, DEVICE, score=score,
                       causal=True)
    check_outputs_and_grads(p, "triton", gen)


def test_lse_and_its_gradient():
    gen = torch.Generator().manual_seed(8)
    p = dense_problem(2, 35, 50, 2, 1, 16, 16, torch.float32, gen, DEVICE, causal=True)
    out, lse = p.run(oa.attention, backend="triton", return_lse=True)
    out_r, lse_r = p.run(oa.reference.attention, return_lse=True)
    assert lse.shape == (2, 2, 35) and max_err(lse, lse_r) < 1e-5
    w = rand(lse.shape, torch.float32, gen, DEVICE)
    grads = torch.autograd.grad((lse * w).sum() + out.sum(), p.leaves(), retain_graph=True)
    grads_r = torch.autograd.grad((lse_r * w.double()).sum() + out_r.sum(), p.leaves(), retain_graph=True)
    for g, gr in zip(grads, grads_r):
        assert max_err(g, gr) < 1e-4
    # each output alone: the other's gradient arrives as None (no zeros materialised)
    for pick in (0, 1):
        loss, loss_r = ((out * 1.5).sum(), (out_r * 1.5).sum()) if pick == 0 else ((lse * w).sum(), (lse_r * w.double()).sum())
        grads = torch.autograd.grad(loss, p.leaves(), retain_graph=True)
        grads_r = torch.autograd.grad(loss_r, p.leaves(), retain_graph=True)
        for g, gr in zip(grads, grads_r):
            assert max_err(g, gr) < 1e-4


@st.composite
def triton_cases(draw):
    score = draw(st.sampled_from(["softmax", "sigmoid", "silu"]))
    causal = draw(st.booleans())
    window = (-1, -1)
    if draw(st.booleans()):
        window = (draw(st.sampled_from([-1, 0, 5, 30])), 0 if causal else draw(st.sampled_from([-1, 0, 7])))
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([16, 24, 32]))
    varlen = draw(st.booleans())
    if varlen:
        n = draw(st.integers(1, 3))
        shape = (draw(st.lists(st.integers(0, 60), min_size=n, max_size=n)),
                 draw(st.lists(st.integers(0, 60), min_size=n, max_size=n)))
    else:
        shape = (1, draw(st.integers(1, 60)), draw(st.integers(1, 60)))
    return dict(score=score, causal=causal, window=window, hkv=hkv, hq=hq, d=d, varlen=varlen, shape=shape,
                dtype=draw(st.sampled_from([torch.float32, torch.float16])), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=triton_cases())
def test_random_problems_match_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    kw = dict(score=case["score"], causal=case["causal"], window=case["window"])
    if case["varlen"]:
        p = varlen_problem(*case["shape"], case["hq"], case["hkv"], case["d"], case["d"], case["dtype"], gen, DEVICE, **kw)
    else:
        p = dense_problem(*case["shape"], case["hq"], case["hkv"], case["d"], case["d"], case["dtype"], gen, DEVICE, **kw)
    check_outputs_and_grads(p, "triton", gen)


HSTU_CASES = [
    dict(causal=True, contextual=0, targets=None, max_attn_len=0, rab=None),
    dict(causal=True, contextual=0, targets=[0, 1, 2, 9, 3], max_attn_len=0, rab="shared"),
    dict(causal=True, contextual=2, targets=[0, 0, 2, 5, 3], max_attn_len=6, rab="heads"),
    dict(causal=False, contextual=0, targets=[0, 1, 0, 4, 2], max_attn_len=5, rab=None),
    dict(causal=False, contextual=3, targets=None, max_attn_len=0, rab="heads"),
]


@pytest.mark.parametrize("variant", HSTU_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if v))
def test_hstu_matches_reference(variant):
    case = dict(lens=[0, 1, 7, 45, 30], bucketization="log", heads=2, d=16, dv=16, extra_len=5,
                dtype=torch.float32, seed=3, **variant)
    p, offsets, max_len, kw, extra, gen = hstu_problem(case)
    if DEVICE != "cpu":
        raise pytest.skip("covered by tests/gpu")

    def fn():
        return oa.hstu_attention(p.q, p.k, p.v, offsets, max_len, backend="triton", **kw)

    def ref(dtype):
        return oa.reference.hstu_attention(p.q, p.k, p.v, offsets, max_len, dtype=dtype, **kw)

    check_outputs_and_grads(p, "triton", gen, extra_leaves=extra, fn=fn, ref=ref)


def _op_args(q, k, v, **kwargs):
    """omniattn::attention_fwd's arguments for a call, built the way the backend builds them."""
    from omniattn import _ops, spec  # importing _ops registers the custom ops
    from omniattn.backends.triton import launch_params

    if q.dim() == 4:
        s, call = spec.dense_call(q, k, v, **kwargs)
    else:
        s, call = spec.varlen_call(q, k, v, *kwargs.pop("varlen"), **kwargs)
    p, extras = launch_params(s, call)
    return _ops.forward_args(call.q, call.k, call.v, extras, call.max_q, call.max_k, p)


OP_KW = dict(score="softmax", causal=False, window=(-1, -1), scale=None, sigmoid_bias=None, silu_norm=None,
             softcap=0.0, precision="exact", backend="triton", return_lse=False)


def test_custom_ops_pass_opcheck():
    from omniattn import _ops  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(9)
    q = rand((1, 20, 2, 16), torch.float32, gen, DEVICE).requires_grad_()
    k = rand((1, 24, 1, 16), torch.float32, gen, DEVICE).requires_grad_()
    torch.library.opcheck(torch.ops.omniattn.attention_fwd.default, _op_args(q, k, k, **OP_KW))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEVICE)
    kw = dict(OP_KW, score="sigmoid", causal=True, varlen=(cu, cu_k, 13, 14))
    torch.library.opcheck(torch.ops.omniattn.attention_fwd.default, _op_args(q[0], k[0], k[0], **kw))


def test_compile_fullgraph_forward_and_backward():
    """torch.compile traces through the custom ops: no graph break, same numbers as eager."""
    gen = torch.Generator().manual_seed(10)
    q = rand((1, 24, 2, 16), torch.float32, gen, DEVICE).requires_grad_()
    k = rand((1, 24, 2, 16), torch.float32, gen, DEVICE).requires_grad_()

    def f(q, k):
        return oa.attention(q, k, k, causal=True, score="sigmoid", backend="triton").sum()

    eager = f(q, k)
    (gq_e,) = torch.autograd.grad(eager, q)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k)
    (gq_c,) = torch.autograd.grad(out, q)
    assert max_err(out, eager) < 1e-5 and max_err(gq_c, gq_e) < 1e-5


@pytest.mark.parametrize("api", ["attention", "attention_varlen", "hstu_attention"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_reaches_the_backward(monkeypatch, api, deterministic):
    """``deterministic`` travels through the custom ops to the backward's launcher, whose rule then
    keeps Hopper's Gluon backward out (its dQ sums in no fixed order; GPU-tested in
    tests/gpu/test_sm90.py)."""
    from omniattn.backends.triton import launch

    seen = []
    real = launch.sm90_backward_ok

    def recording(q, k, v, dout, x, p, max_q, max_k):
        seen.append(p.deterministic)
        return real(q, k, v, dout, x, p, max_q, max_k)

    monkeypatch.setattr(launch, "sm90_backward_ok", recording)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (rand((10, 2, 16), torch.float32, gen).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    if api == "attention":
        out = oa.attention(q[None], k[None], v[None], backend="triton", deterministic=deterministic)
    elif api == "attention_varlen":
        out = oa.attention_varlen(q, k, v, cu, cu, 6, 6, backend="triton", deterministic=deterministic)
    else:
        out = oa.hstu_attention(q, k, v, cu, 6, backend="triton", deterministic=deterministic)
    out.sum().backward()
    assert seen == [deterministic]


def _plans():
    from omniattn.backends.triton import launch

    return launch._PLANS


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_a_kept_plan_serves_new_tensors(layout):
    """A call signature's second call takes the plan the first one made (no new plan) and computes
    with its own tensors: outputs and gradients of fresh random inputs match the reference."""
    gen = torch.Generator().manual_seed(21)

    def problem():
        if layout == "dense":
            return dense_problem(2, 37, 45, 4, 2, 16, 16, torch.float32, gen, DEVICE, causal=True)
        return varlen_problem([13, 0, 29], [21, 5, 29], 4, 2, 16, 16, torch.float32, gen, DEVICE, causal=True)

    check_outputs_and_grads(problem(), "triton", gen)
    kept = dict(_plans())
    assert {key[0] for key in kept} == {"forward", "backward"}
    check_outputs_and_grads(problem(), "triton", gen)
    assert dict(_plans()).keys() == kept.keys() and all(_plans()[key] is kept[key] for key in kept)
    if layout == "varlen":  # other lengths, the same signature (tile counts, total, longest): the call's own schedule
        p = varlen_problem([29, 0, 13], [29, 5, 21], 4, 2, 16, 16, torch.float32, gen, DEVICE, causal=True)
        check_outputs_and_grads(p, "triton", gen)
        assert dict(_plans()).keys() == kept.keys()


def test_plans_follow_the_environment_and_alignment(monkeypatch):
    """A setting a plan was made under (here the forward's tiles), a tensor's 16-byte alignment and
    a call with dropout each lead to a plan of their own (or none kept); outputs stay right."""
    gen = torch.Generator().manual_seed(22)
    q = rand((1, 40, 2, 16), torch.float32, gen, DEVICE)
    want = oa.reference.attention(q, q, q)
    assert max_err(oa.attention(q, q, q, backend="triton"), want) < 1e-5
    assert len(_plans()) == 1
    monkeypatch.setenv("OMNIATTN_FWD_CONFIG", "32,16,4,1")  # (the interpreter's tiles are 16x16 otherwise)
    assert max_err(oa.attention(q, q, q, backend="triton"), want) < 1e-5
    assert len(_plans()) == 2
    monkeypatch.delenv("OMNIATTN_FWD_CONFIG")
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)[1:].view(q.shape).copy_(q)  # 4-byte offset
    assert max_err(oa.attention(shifted, shifted, shifted, backend="triton"), want) < 1e-5
    assert len(_plans()) == 3
    oa.attention(q, q, q, backend="triton", dropout_p=0.5)
    assert len(_plans()) == 3


def test_the_oldest_plan_goes_when_plans_kept_is_reached(monkeypatch):
    from omniattn.backends.triton import launch

    monkeypatch.setattr(launch, "PLANS_KEPT", 2)
    gen = torch.Generator().manual_seed(23)
    for n in (17, 18, 19):
        q = rand((1, n, 2, 16), torch.float32, gen, DEVICE)
        assert max_err(oa.attention(q, q, q, backend="triton"), oa.reference.attention(q, q, q)) < 1e-5
    assert [key[2][0][1] for key in _plans()] == [18, 19]  # q's shape in the two kept keys


def test_descriptor_kernels_set_the_allocator_on_every_call(monkeypatch):
    """Kernels that make tensor descriptors need Triton's scratch allocator, which Triton keeps per
    thread: a kept plan sets it on each call, so a call from a new thread (a thread pool, autograd's
    recomputation under checkpointing) reusing the plan still has one."""
    import threading

    import triton

    from omniattn.backends.triton import launch

    def ensure():
        ensured.append(threading.get_ident())
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEVICE))

    ensured, results = [], []
    monkeypatch.setattr(launch, "_tma_ok", lambda *tensors: True)  # the TMA rule's GPU checks
    monkeypatch.setattr(launch, "_ensure_allocator", ensure)
    gen = torch.Generator().manual_seed(24)
    q = rand((1, 40, 2, 128), torch.float16, gen, DEVICE)  # non-causal, head dim > 64, 16-bit: K/V by TMA
    want = oa.reference.attention(q.double(), q.double(), q.double())
    for _ in range(2):
        worker = threading.Thread(target=lambda: results.append(oa.attention(q, q, q, backend="triton")))
        worker.start()
        worker.join()
    assert len(results) == 2 and all(max_err(out, want) < 2e-3 for out in results)
    assert len(_plans()) == 1 and len(ensured) >= 2

"""GPU-only: bf16, large shapes, every head dim, many short sequences, torch.compile, opcheck on CUDA."""

import math

import pytest
import torch

import omniattn as oa

from ..helpers import check_outputs_and_grads, dense_problem, max_err, rand, varlen_problem
from ..test_torch_tiled import hstu_problem

DEV = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("causal", [False, True])
def test_large_shapes(dtype, score, causal):
    gen = torch.Generator().manual_seed(1)
    p = dense_problem(2, 1531, 1531, 8, 2, 128, 128, dtype, gen, DEV, score=score, causal=causal)
    check_outputs_and_grads(p, "triton", gen)


@pytest.mark.parametrize("d,dv", [(32, 32), (64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (128, 64), (64, 192)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_every_head_dim(d, dv, score):
    gen = torch.Generator().manual_seed(d * 1000 + dv)
    p = dense_problem(1, 333, 517, 4, 2, d, dv, torch.bfloat16, gen, DEV, score=score, causal=True)
    check_outputs_and_grads(p, "triton", gen)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_many_short_sequences(score):
    gen = torch.Generator().manual_seed(2)
    lens_q = torch.randint(0, 24, (700,), generator=gen).tolist()
    lens_k = torch.randint(0, 24, (700,), generator=gen).tolist()
    p = varlen_problem(lens_q, lens_k, 8, 2, 64, 64, torch.bfloat16, gen, DEV, score=score, causal=True)
    check_outputs_and_grads(p, "triton", gen)


@pytest.mark.parametrize("d", [96, 128])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_varlen_non_causal_tma(score, d):
    """Hopper loads K/V of non-causal forwards by TMA on 128-row query tiles (every score): the
    varlen schedule must follow those tiles, descriptors must stop at each sequence's end (zero rows
    past it) and zero-fill columns past a head dim below the tile's."""
    gen = torch.Generator().manual_seed(d)
    p = varlen_problem([1000, 0, 3, 777, 129], [1000, 5, 300, 1, 129], 8, 2, d, d, torch.bfloat16, gen, DEV,
                       score=score, causal=False)
    check_outputs_and_grads(p, "triton", gen)


def test_long_varlen_with_window_alibi_softcap():
    gen = torch.Generator().manual_seed(3)
    p = varlen_problem([1000, 3, 2047, 500], [1200, 700, 2047, 1], 8, 8, 128, 128, torch.bfloat16, gen, DEV,
                       causal=True, window=(300, 0), softcap=20.0, alibi_slopes=torch.rand(4, 8, device=DEV))
    check_outputs_and_grads(p, "triton", gen)


@pytest.mark.parametrize("rab", [None, "shared", "shared-per-pair", "heads"])
def test_hstu_bf16(rab, monkeypatch):
    """``shared``: the bias read from the call's table (rab_cache, opt-in); ``shared-per-pair``:
    the default, every kernel computes the bias per pair; ``heads``: per-head weights (per pair)."""
    from omniattn.backends.triton import rab_cache

    built = []
    table = rab_cache.new_table
    monkeypatch.setattr(rab_cache, "new_table", lambda *a: built.append(a) or table(*a))
    monkeypatch.setenv(rab_cache.BUDGET_ENV, "1024" if rab == "shared" else "0")
    expect_tables = 2 if rab == "shared" else 0  # forward and backward
    if rab == "shared-per-pair":
        rab = "shared"
    case = dict(lens=[700, 1, 0, 1024, 33], causal=True, contextual=0, targets=[20, 0, 0, 20, 5], max_attn_len=0,
                rab=rab, bucketization="log", heads=4, d=128, dv=128, extra_len=0, dtype=torch.bfloat16, seed=4)
    p, offsets, max_len, kw, extra, gen = hstu_problem(case)
    p.q, p.k, p.v = (t.detach().cuda().requires_grad_() for t in (p.q, p.k, p.v))
    offsets = offsets.cuda()
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if kw["rab"] is not None:
        kw["rab"] = kw["rab"].cuda()
        extra = [kw["rab"].pos_w, kw["rab"].ts_w]

    def fn():
        return oa.hstu_attention(p.q, p.k, p.v, offsets, max_len, backend="triton", **kw)

    def ref(dtype):
        return oa.reference.hstu_attention(p.q, p.k, p.v, offsets, max_len, dtype=dtype, **kw)

    check_outputs_and_grads(p, "triton", gen, extra_leaves=extra, fn=fn, ref=ref)
    assert len(built) == expect_tables, built


def test_auto_picks_triton_on_this_gpu():
    q = torch.randn(1, 64, 2, 64, device=DEV, dtype=torch.bfloat16)
    from omniattn.backends import resolve_for_tensor

    assert resolve_for_tensor(q) == "triton"
    assert torch.equal(oa.attention(q, q, q), oa.attention(q, q, q, backend="triton"))


def test_sdpa_drop_in_on_gpu():
    q = torch.randn(2, 8, 777, 64, device=DEV, dtype=torch.bfloat16)
    got = oa.scaled_dot_product_attention(q, q, q, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
    assert max_err(got, want) < 2e-2


def test_compile_inductor_fullgraph():
    """A small model with omniattn attention: torch.compile(fullgraph=True) forward and backward."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(256, 3 * 256)
            self.out = torch.nn.Linear(256, 256)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 64).unbind(2)
            return self.out(oa.attention(q, k, v, causal=True).reshape(b, n, 256))

    torch.manual_seed(0)
    model = Block().to(DEV)  # float32: compiled and eager agree to rounding, so a real difference shows
    x = torch.randn(2, 300, 256, device=DEV, requires_grad=True)
    eager = model(x)
    (gx_e,) = torch.autograd.grad(eager.square().sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    (gx_c,) = torch.autograd.grad(out.square().sum(), x)
    assert max_err(out, eager) < 1e-4 * eager.abs().max().item()
    assert max_err(gx_c, gx_e) < 1e-4 * gx_e.abs().max().item()


def test_opcheck_on_cuda():
    from omniattn import _ops  # noqa: F401  (registers the ops)

    from ..test_triton import OP_KW, _op_args

    gen = torch.Generator().manual_seed(5)
    q = rand((1, 70, 4, 64), torch.bfloat16, gen, DEV).requires_grad_()
    k = rand((1, 90, 2, 64), torch.bfloat16, gen, DEV).requires_grad_()
    torch.library.opcheck(torch.ops.omniattn.attention_fwd.default, _op_args(q, k, k, **OP_KW))



def _grads_twice(fn, leaves, dout):
    runs = []
    for _ in range(2):
        for t in leaves:
            t.grad = None
        fn().backward(dout)
        runs.append([t.grad.clone() for t in leaves])
    return runs


@pytest.mark.parametrize("kind", ["softmax-varlen-gqa", "hstu-rab"])
def test_backward_is_bitwise_deterministic(kind):
    """Under torch.use_deterministic_algorithms(True) the backward reduces dQ, dK/dV and the bias's
    weight gradients in a fixed order (the template; Hopper's Gluon backward sums dQ by atomics and
    steps aside), so two backward passes give identical bits."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _check_deterministic(kind)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def _check_deterministic(kind):
    gen = torch.Generator().manual_seed(21)
    lens = [1000, 3, 517, 2048, 64]
    if kind == "hstu-rab":
        case = dict(lens=lens, causal=True, contextual=0, targets=[20, 0, 5, 20, 1], max_attn_len=0, rab="heads",
                    bucketization="log", heads=4, d=128, dv=128, extra_len=0, dtype=torch.bfloat16, seed=21)
        p, offsets, max_len, kw, _, _ = hstu_problem(case)
        q, k, v = (t.detach().cuda().requires_grad_() for t in (p.q, p.k, p.v))
        kw = {name: (x.cuda() if isinstance(x, torch.Tensor) else x) for name, x in kw.items()}
        kw["rab"] = kw["rab"].cuda()
        leaves = [q, k, v, kw["rab"].pos_w, kw["rab"].ts_w]
        fn = lambda: oa.hstu_attention(q, k, v, offsets.cuda(), max_len, backend="triton", **kw)  # noqa: E731
    else:
        p = varlen_problem(lens, lens, 8, 2, 128, 128, torch.bfloat16, gen, DEV)
        q, k, v = p.q, p.k, p.v
        leaves = [q, k, v]
        cu, _, mq, mk = p.varlen
        fn = lambda: oa.attention_varlen(q, k, v, cu, cu, mq, mk, causal=True, backend="triton")  # noqa: E731
    dout = torch.randn(fn().shape, generator=gen).to(DEV, q.dtype)
    first, second = _grads_twice(fn, leaves, dout)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])  # the Gluon backward (non-causal here) and the template's
def test_cuda_graph_of_forward_and_backward(causal):
    """An eager forward + backward captured in a CUDA graph (nothing on the way waits for the GPU:
    the unused lse's gradient arrives as None, not as zeros to check) and replayed on new values:
    the same outputs and gradients as eager calls."""
    gen = torch.Generator().manual_seed(31 + causal)
    q, k, v = (rand((2, 300, 4, 128), torch.bfloat16, gen, DEV).requires_grad_() for _ in range(3))
    dout = rand((2, 300, 4, 128), torch.bfloat16, gen, DEV)

    def step():
        for t in (q, k, v):
            t.grad = None
        out = oa.attention(q, k, v, causal=causal)
        out.backward(dout)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernels compiled and launch plans made before the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    with torch.no_grad():
        for t in (q, k, v, dout):
            t.copy_(rand(t.shape, t.dtype, gen, DEV))
    graph.replay()
    got = [out.clone()] + [t.grad.clone() for t in (q, k, v)]
    want = [step().detach()] + [t.grad for t in (q, k, v)]
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    # dQ: the Gluon backward sums it by float32 reductions in no fixed order (one bf16 rounding apart)
    assert max_err(got[1], want[1]) <= 2**-7 * want[1].abs().max().item()

"""torch.compile(fullgraph=True) over the PyTorch backends (omniattn._ops_torch): dense calls trace
as one custom op, forward and backward, and give what the eager calls give."""

import pytest
import torch

import omniattn as oa
from omniattn import _ops_torch  # noqa: F401  (registers the ops)

from .helpers import max_err, rand

CASES = {
    # PyTorch's fused CPU kernel (backend="auto" on a CPU, plain causal softmax)
    "fused softmax": dict(backend="auto", causal=True),
    # the tiled path: sigmoid with a window, ALiBi and softcap; SiLU with a float mask; GQA
    "tiled sigmoid": dict(backend="torch", score="sigmoid", window=(9, 3), softcap=20.0, alibi=True),
    "tiled silu mask": dict(backend="torch", score="silu", mask=True),
    "tiled softmax bf16": dict(backend="torch", causal=True, dtype=torch.bfloat16),
}


def _problem(case, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = case.get("dtype", torch.float32)
    nk = 37 if case["backend"] == "auto" else 45  # (the fused kernel: causal only with Nq == Nk)
    q = rand((2, 37, 4, 16), dt, gen)
    k, v = rand((2, nk, 2, 16), dt, gen), rand((2, nk, 2, 16), dt, gen)
    kw = {key: case[key] for key in ("backend", "score", "causal", "window", "softcap") if key in case}
    if case.get("alibi"):
        kw["alibi_slopes"] = torch.rand(4, generator=gen)
    if case.get("mask"):
        kw["attn_mask"] = rand((2, 1, 37, 45), dt, gen)
    return q, k, v, kw


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_fullgraph_equals_eager(name):
    """Forward, input gradients and (softmax) the lse's gradient, compiled without a graph break
    (aot_eager: dynamo and AOT autograd over the ops' fakes and formulas) against the eager call."""
    case = CASES[name]
    q, k, v, kw = _problem(case, 3)
    softmax = kw.get("score", "softmax") == "softmax"

    def layer(q, k, v):
        if softmax:
            out, lse = oa.attention(q * 1.5, k, v, return_lse=True, **kw)
            return out.float().square().sum() + lse.sum()
        return oa.attention(q * 1.5, k, v, **kw).float().square().sum()

    results = []
    for fn in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        loss = fn(*leaves)
        results.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
    torch._dynamo.reset()
    for what, eager, compiled in zip(("loss", "dq", "dk", "dv"), *results):
        assert compiled.dtype == eager.dtype
        assert max_err(compiled.float(), eager.float()) <= 1e-5 * (eager.float().abs().max().item() + 1), what


def test_compiled_inductor_model():
    """A small model on the tiled path compiled by inductor, forward and backward, as the Triton
    path's GPU test does."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)
            self.out = torch.nn.Linear(32, 32)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 8).unbind(2)
            return self.out(oa.attention(q, k, v, causal=True, score="sigmoid", backend="torch").reshape(b, n, 32))

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 45, 32, requires_grad=True)
    eager = model(x)
    (gx_e,) = torch.autograd.grad(eager.square().sum(), x)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x)
    (gx_c,) = torch.autograd.grad(out.square().sum(), x)
    torch._dynamo.reset()
    assert max_err(out, eager) <= 1e-5 * eager.abs().max().item()
    assert max_err(gx_c, gx_e) <= 1e-5 * gx_e.abs().max().item()


def test_compiled_calls_keep_the_nonfinite_rule():
    """A NaN in one key of one batch entry: the compiled call puts NaN exactly where the eager call
    does (DESIGN.md's rule), through the custom op."""
    q, k, v, kw = _problem(CASES["tiled sigmoid"], 5)
    k[1, 7, 0, 3] = float("nan")
    eager = oa.attention(q, k, v, **kw)
    compiled = torch.compile(lambda q, k, v: oa.attention(q, k, v, **kw), backend="aot_eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    assert torch.equal(compiled.isnan(), eager.isnan()) and eager.isnan().any() and not eager[0].isnan().any()
    torch.testing.assert_close(compiled.nan_to_num(), eager.nan_to_num(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["fused softmax", "tiled sigmoid"])
def test_opcheck(name):
    """torch.library.opcheck: schema, fake tensors and autograd registration of both ops."""
    q, k, v, kw = _problem(CASES[name], 7)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    spec_args = dict(score=kw.get("score", "softmax"), causal=kw.get("causal", False),
                     window=list(kw.get("window", (-1, 0) if kw.get("causal") else (-1, -1))), scale=0.25,
                     sigmoid_bias=None, silu_norm=None, softcap=kw.get("softcap", 0.0))
    alibi = kw.get("alibi_slopes")
    backend = "sdpa" if kw["backend"] == "auto" else "torch"
    args = (q, k, v, None, None if alibi is None else alibi.expand(2, 4), *spec_args.values(), backend, True)
    torch.library.opcheck(torch.ops.omniattn.torch_attention_fwd.default, args)
    out, lse, wide = torch.ops.omniattn.torch_attention_fwd(*args)
    dout = torch.randn_like(out)
    bwd_args = (dout, None, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), wide.detach(), None,
                args[4], *spec_args.values())
    torch.library.opcheck(torch.ops.omniattn.torch_attention_bwd.default, bwd_args)

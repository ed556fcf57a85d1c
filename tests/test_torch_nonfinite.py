"""Issue 14, items A and B: NaN/Inf in q, k or v (DESIGN.md, wave 2).

A NaN/Inf makes NaN exactly the outputs and gradients whose maths touches it, as the reference
says (its rule is stated in reference._NonFinite), on every backend, and never crosses into
another sequence or batch entry. Checked three ways:
- the reference's rule against natural IEEE arithmetic over the allowed pairs only (for NaN
  inputs the two must agree: every operation propagates NaN);
- the tiled backend against the reference: the same NaN pattern, the same finite values;
- isolation: the other sequences of a batch get bit-identical outputs and gradients whether
  one sequence holds a NaN or a finite value there (dense batches packed into one query block,
  varlen, HSTU; forward and backward).
"""

import math

import pytest
import torch

import omniattn as oa
from omniattn import backends, reference, spec as _spec

from .helpers import rand

NAN = math.nan


# ------------------------------------------------------------------ natural arithmetic oracle


def natural_attention(q, k, v, score, allowed):
    """One dense sequence, q (L, H, D) float64: every quantity computed pair by pair over the
    allowed pairs only (a disallowed pair's operands are replaced before any product, so no
    0 * NaN occurs and autograd's gradients are natural too)."""
    scale = 1 / math.sqrt(q.shape[-1])
    a = allowed.view(1, *allowed.shape, 1)  # (1, Lq, Lk, 1)
    qe = torch.where(a, q.transpose(0, 1).unsqueeze(2), 0.0)  # (H, Lq, Lk, D)
    ke = torch.where(a, k.transpose(0, 1).unsqueeze(1), 0.0)
    s = (qe * ke).sum(-1) * scale  # (H, Lq, Lk)
    if score == "softmax":
        mx = torch.where(allowed, s, -math.inf).amax(-1, keepdim=True).detach()  # NaN propagates
        mx = torch.where(mx == -math.inf, 0.0, mx)
        e = torch.where(allowed, torch.exp(torch.where(allowed, s - mx, 0.0)), 0.0)
        total = e.sum(-1, keepdim=True)
        p = e / torch.where(total == 0, 1.0, total)
    elif score == "sigmoid":
        p = torch.where(allowed, torch.sigmoid(torch.where(allowed, s, 0.0) - math.log(s.shape[-1])), 0.0)
    else:
        p = torch.where(allowed, torch.nn.functional.silu(torch.where(allowed, s, 0.0)) / s.shape[-1], 0.0)
    pe = torch.where(a, p.unsqueeze(-1), 0.0)
    ve = torch.where(a, v.transpose(0, 1).unsqueeze(1), 0.0)
    return (pe * ve).sum(2).transpose(0, 1)  # (Lq, H, Dv)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("where", ["q", "k", "v", "dout"])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, 0)), (False, (2, 3))])
def test_reference_rule_is_natural_arithmetic_for_nan(score, where, causal, window):
    gen = torch.Generator().manual_seed(hash((score, where, causal)) % 1000)
    n, h, d = 11, 2, 4
    q, k, v = (rand((1, n, h, d), torch.float64, gen) for _ in range(3))
    dout = rand((1, n, h, d), torch.float64, gen)
    target = dict(q=q, k=k, v=v, dout=dout)[where]
    target[0, 6, 1, 2] = NAN
    target[0, 2, 0, 0] = NAN
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = oa.reference.attention(q, k, v, score=score, causal=causal, window=window)
    grads = torch.autograd.grad(out, leaves, dout)
    allowed = reference.allowed_mask(n, n, (window[0], 0) if causal else window)
    nat = natural_attention(q[0], k[0], v[0], score, allowed).unsqueeze(0)
    nat_grads = torch.autograd.grad(nat, leaves, dout)
    for name, got, want in zip(["out", "dq", "dk", "dv"], (out,) + grads, (nat,) + nat_grads):
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN pattern differs from natural arithmetic"
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12, equal_nan=True), name
    assert grads[0].isnan().any(), "the poisoned value must reach some result"


# ------------------------------------------------------------------ tiled backend vs reference


def _spec_call(q, k, v, layout, score, causal, lens=None):
    kw = dict(score=score, causal=causal, window=(-1, -1), scale=None, sigmoid_bias=None, silu_norm=None,
              softcap=0.0, precision="exact", backend="torch", return_lse=False)
    if layout == "dense":
        return _spec.dense_call(q, k, v, **kw)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    if layout == "varlen":
        return _spec.varlen_call(q, k, v, cu, cu, max(lens), max(lens), **kw)
    targets = torch.tensor([min(2, n) for n in lens])
    rab = oa.hstu.RelativeBias(max(lens), num_buckets=8, dtype=q.dtype)
    with torch.no_grad():
        rab.pos_w.normal_(generator=torch.Generator().manual_seed(3))
        rab.ts_w.normal_(generator=torch.Generator().manual_seed(4))
    ts = torch.arange(sum(lens)) * 13
    return _spec.hstu_call(q, k, v, cu, max(lens), alpha=None, causal=causal, num_targets=targets,
                           contextual_seq_len=0, max_attn_len=0, rab=rab, timestamps=ts, silu_norm=None,
                           precision="exact", backend="torch")


def _run(spec, call, backend, dout, dlse=None):
    """Output (and lse) in the caller's layout and the gradients of every input that takes one."""
    out, lse = backends.run(spec, call, backend)
    leaves = [call.q, call.k, call.v] + ([call.rab.pos_w, call.rab.ts_w] if call.rab is not None else [])
    targets, grads_in = [out], [dout.to(out.dtype)]
    if dlse is not None:
        targets.append(lse)
        grads_in.append(dlse.to(lse.dtype))
    grads = torch.autograd.grad(targets, leaves, grads_in, allow_unused=True)
    return [out, lse] + list(grads)


def _problem(layout, dtype, gen, hq=4, hkv=2):
    if layout == "dense":  # short: the whole batch is packed into one query block
        shape_q, shape_k, lens = (3, 21, hq, 16), (3, 21, hkv, 16), None
    else:
        lens = [9, 0, 30, 5, 17]
        hkv = hq if layout == "hstu" else hkv
        shape_q, shape_k = (sum(lens), hq, 16), (sum(lens), hkv, 16)
    q = rand(shape_q, dtype, gen).requires_grad_()
    k, v = (rand(shape_k, dtype, gen).requires_grad_() for _ in range(2))
    return q, k, v, lens


def _poison(t, gen, value, count=2):
    """A copy of t with `count` random elements set to value."""
    t = t.detach().clone()
    flat = t.view(-1)
    idx = torch.randint(0, flat.numel(), (count,), generator=gen)
    flat[idx] = value
    return t.requires_grad_()


CASES = [
    (layout, score, where, value)
    for layout in ("dense", "varlen", "hstu")
    for score in ("softmax", "sigmoid", "silu")
    for where, value in (("q", NAN), ("k", math.inf), ("v", NAN), ("v", -math.inf), ("dout", NAN))
    if not (layout == "hstu" and score != "silu")
]


@pytest.mark.parametrize("tiles", ["small_tiles", "poisoned"])  # many tiles of each kind / packed blocks
@pytest.mark.parametrize("layout,score,where,value", CASES)
def test_tiled_backend_follows_the_reference(request, tiles, layout, score, where, value):
    request.getfixturevalue(tiles)
    gen = torch.Generator().manual_seed(len(layout) * 100 + len(score) * 10 + len(where))
    q, k, v, lens = _problem(layout, torch.float64, gen)
    if where != "dout":
        q, k, v = (_poison(t, gen, value, 3) if name == where else t for name, t in zip("qkv", (q, k, v)))
    causal = layout != "dense" or score == "softmax"
    spec, call = _spec_call(q, k, v, layout, score, causal, lens)
    dout = rand(q.shape[:-1] + (v.shape[-1],), torch.float64, gen)
    if where == "dout":
        dout = _poison(dout, gen, value, 3).detach()
    dlse = rand((q.shape[0], q.shape[2], q.shape[1]) if layout == "dense" else (q.shape[1], q.shape[0]),
                torch.float64, gen) if score == "softmax" else None
    got = _run(spec, call, "torch", dout, dlse)
    want = _run(spec, call, "reference", dout, dlse)
    names = ["out", "lse", "dq", "dk", "dv", "dpos", "dts"]
    some_nan = False
    for name, g, w in zip(names, got, want):
        if w is None:
            continue
        some_nan |= bool(w.isnan().any())
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN where the reference has none, or the reverse"
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-11, equal_nan=True), f"{name}: finite values differ"
    assert some_nan, "the poisoned input must reach some result"


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_a_nan_row_of_q_is_nan_not_zero(score):
    """Item A: a NaN in q_i made row i 0 with lse -inf on the tiled path; now NaN, as the reference."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (rand((1, 300, 2, 16), torch.float32, gen) for _ in range(3))
    q[0, 150, 1, 3] = NAN
    for backend in ("torch", "auto", "reference"):
        out = oa.attention(q, k, v, score=score, causal=True, backend=backend)
        assert out[0, 150, 1].isnan().all() and not out[0, 150, 0].isnan().any()
        assert out.isnan().sum() == out.shape[-1], backend
    out, lse = oa.attention(q, k, v, causal=True, backend="torch", return_lse=True)
    assert lse[0, 1, 150].isnan() and lse.isnan().sum() == 1


# ------------------------------------------------------------------ isolation between sequences


def _isolation(layout, score, where, gen, value):
    """Results of a batch whose sequence 0 holds `value` at one element of `where`, and of the
    same batch with 0.5 there, and a function picking the part of a result that belongs to the
    other sequences."""
    q, k, v, lens = _problem(layout, torch.float32, gen)
    dout = rand(q.shape[:-1] + (v.shape[-1],), torch.float32, gen)
    runs = []
    for fill in (value, 0.5):
        tensors = dict(q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone(), dout=dout.clone())
        tensors[where][(0, 3) if layout == "dense" else (3,)] = fill  # sequence 0, token 3
        x = [tensors[n].requires_grad_() for n in "qkv"]
        spec, call = _spec_call(*x, layout, score, causal=True, lens=lens)
        runs.append(_run(spec, call, "torch", tensors["dout"]))

    def others(name, t):
        if layout == "dense":  # (B, ...) everywhere
            return t[1:]
        return t[:, lens[0]:] if name == "lse" else t[lens[0]:]  # lse (H, T); the rest (T, ...)

    return runs, others


@pytest.mark.parametrize("layout", ["dense", "varlen", "hstu"])
@pytest.mark.parametrize("where", ["q", "k", "v", "dout"])
def test_one_bad_sequence_never_reaches_another(poisoned, layout, where):
    """Item B: forward via v and backward via q leaked between sequences sharing a query block
    (default tiles pack these short sequences into one block)."""
    gen = torch.Generator().manual_seed(len(layout) + len(where))
    score = "silu" if layout == "hstu" else "softmax"
    for value in (NAN, math.inf):
        (bad, clean), others = _isolation(layout, score, where, gen, value)
        touched = False
        for name, b, c in zip(["out", "lse", "dq", "dk", "dv", "dpos", "dts"], bad, clean):
            if b is None or name in ("dpos", "dts"):  # the bias weights are shared by every sequence
                continue
            assert torch.equal(others(name, b), others(name, c)), f"{layout}, {value} in {where}: {name} of another sequence changed"
            touched |= bool(b.isnan().any())
        assert touched, "the bad value must reach its own sequence"


def test_sdpa_fast_path_keeps_the_rule():
    """backend='auto' on CPU runs PyTorch's fused kernel for plain softmax, which lets a masked
    pair's 0 multiply a NaN of v; calls with a non-finite input take the tiled path instead."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (rand((2, 40, 2, 16), torch.float32, gen) for _ in range(3))
    v[0, 30, 1, 0] = NAN
    out = oa.attention(q, k, v, causal=True)
    want = oa.reference.attention(q, k, v, causal=True)
    assert torch.equal(out.isnan(), want.isnan()) and out[0, :30].isfinite().all()

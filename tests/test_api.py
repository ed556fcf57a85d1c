"""Behaviour every backend shares: layouts, empty rows and sequences, no in-place changes, dispatch."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import omniattn as oa

from .helpers import dense_problem, max_err, rand, varlen_problem

CPU_BACKENDS = ["torch", "reference"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_attention_states_is_exact(backend):
    """Attention over keys A ∪ B equals the merge of attention over A and over B."""
    gen = torch.Generator().manual_seed(1)
    q = rand((2, 33, 4, 16), torch.float64, gen)
    k = rand((2, 50, 2, 16), torch.float64, gen)
    v = rand((2, 50, 2, 8), torch.float64, gen)
    full, lse = oa.attention(q, k, v, return_lse=True, backend=backend)
    oa_, la = oa.attention(q, k[:, :21], v[:, :21], return_lse=True, backend=backend)
    ob, lb = oa.attention(q, k[:, 21:], v[:, 21:], return_lse=True, backend=backend)
    merged, merged_lse = oa.merge_attention_states(oa_, la, ob, lb)
    assert max_err(merged, full) < 1e-12 and max_err(merged_lse, lse) < 1e-5


def test_merge_attention_states_empty_rows():
    out = torch.randn(4, 2, 3)
    lse = torch.full((2, 4), -math.inf)
    lse_b = lse.clone()
    lse_b[0, 1] = 0.5
    merged, mlse = oa.merge_attention_states(out, lse, out * 2, lse_b)
    assert not torch.isnan(merged).any()
    assert (merged[:, 1] == 0).all() and (merged[0, 0] == 0).all() and torch.equal(merged[1, 0], out[1, 0] * 2)
    assert torch.isinf(mlse[1]).all() and mlse[0, 1] == 0.5


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_drop_in_matches_torch(is_causal, gqa):
    gen = torch.Generator().manual_seed(2)
    q = rand((2, 4, 37, 32), torch.float32, gen)
    k = rand((2, 2 if gqa else 4, 37, 32), torch.float32, gen)
    v = rand((2, 2 if gqa else 4, 37, 32), torch.float32, gen)
    got = oa.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.2, enable_gqa=gqa)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.2, enable_gqa=gqa)
    assert got.shape == want.shape and max_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(3)
    base = rand((2, 4, 29, 3, 16), torch.float32, gen)  # (B, H, N, 3, D): q, k, v interleaved
    q, k, v = (base[..., i, :].transpose(1, 2) for i in range(3))  # (B, N, H, D) views
    assert not q.is_contiguous()
    got = oa.attention(q, k, v, causal=True, backend=backend)
    want = oa.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, backend=backend)
    assert torch.equal(got, want)
    packed = base[0, :, :, 0, :].transpose(0, 1)  # (N, H, D) non-contiguous
    cu = torch.tensor([0, 10, 29])
    got = oa.attention_varlen(packed, packed, packed, cu, cu, 19, 19, backend=backend)
    want = oa.attention_varlen(*(packed.contiguous(),) * 3, cu, cu, 19, 19, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_never_modified(backend):
    gen = torch.Generator().manual_seed(4)
    p = dense_problem(2, 20, 24, 4, 2, 16, 16, torch.float32, gen, causal=True, softcap=3.0)
    before = [t.detach().clone() for t in p.leaves()]
    out = p.run(oa.attention, backend=backend)
    out.backward(torch.ones_like(out))
    for t, b in zip(p.leaves(), before):
        assert torch.equal(t.detach(), b)
    rab = oa.hstu.RelativeBias(12, 8)
    w = [rab.pos_w.detach().clone(), rab.ts_w.detach().clone()]
    q, k, v = (rand((20, 2, 8), torch.float32, gen).requires_grad_() for _ in range(3))
    snapshot = [t.detach().clone() for t in (q, k, v)]
    ts = torch.arange(20) * 3
    offsets = torch.tensor([0, 12, 20])
    out = oa.hstu_attention(q, k, v, offsets, 12, rab=rab, timestamps=ts, num_targets=torch.tensor([2, 1]), backend=backend)
    out.sum().backward()
    for t, b in zip((q, k, v), snapshot):
        assert torch.equal(t.detach(), b)
    assert torch.equal(rab.pos_w.detach(), w[0]) and torch.equal(rab.ts_w.detach(), w[1])
    assert torch.equal(ts, torch.arange(20) * 3) and torch.equal(offsets, torch.tensor([0, 12, 20]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_rows_without_keys_are_zero_not_nan(backend, score):
    """Causal with Nq > Nk: the first rows see nothing. Output 0, lse -inf, finite gradients."""
    gen = torch.Generator().manual_seed(5)
    p = dense_problem(1, 9, 4, 2, 2, 8, 8, torch.float32, gen, score=score, causal=True)
    if score == "softmax":
        out, lse = p.run(oa.attention, backend=backend, return_lse=True)
        assert torch.isinf(lse[0, :, :5]).all() and (lse[0, :, :5] < 0).all() and torch.isfinite(lse[0, :, 5:]).all()
    else:
        out = p.run(oa.attention, backend=backend)
    assert (out[0, :5] == 0).all() and not torch.isnan(out).any()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in p.leaves())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_length_sequences(backend):
    gen = torch.Generator().manual_seed(6)
    p = varlen_problem([0, 3, 0, 5], [2, 0, 0, 7], 2, 1, 8, 8, torch.float32, gen, causal=False)
    out, lse = p.run(oa.attention_varlen, backend=backend, return_lse=True)
    assert out.shape == (8, 2, 8) and (out[:3] == 0).all() and torch.isinf(lse[:, :3]).all()
    want = oa.reference.attention_varlen(p.q, p.k, p.v, *p.varlen)
    assert max_err(out, want) < 1e-6
    out.sum().backward()
    # dense: no keys at all, and no queries at all
    q, k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 0, 2, 8), torch.randn(2, 0, 2, 8)
    out, lse = oa.attention(q, k, v, backend=backend, return_lse=True)
    assert (out == 0).all() and torch.isinf(lse).all()
    out = oa.attention(torch.randn(2, 0, 2, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8), backend=backend)
    assert out.shape == (2, 0, 2, 8)
    empty = oa.attention_varlen(torch.randn(0, 2, 8), torch.randn(0, 2, 8), torch.randn(0, 2, 8),
                                torch.tensor([0]), torch.tensor([0]), 0, 0, backend=backend)
    assert empty.shape == (0, 2, 8)


def test_auto_is_the_tiled_backend_on_cpu():
    gen = torch.Generator().manual_seed(7)
    p = dense_problem(1, 40, 40, 2, 2, 16, 16, torch.float32, gen, score="sigmoid", causal=True)
    assert torch.equal(p.run(oa.attention), p.run(oa.attention, backend="torch"))


def test_triton_backend_is_not_faked_on_cpu(monkeypatch):
    """Without the interpreter, asking for Triton on CPU tensors is an error, not a silent fallback."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = k = v = torch.randn(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="backend='triton': the Triton kernels need a CUDA GPU"):
        oa.attention(q, k, v, backend="triton")


def test_sigmoid_default_bias_is_per_sequence():
    """-ln(Nk) of each sequence: a varlen batch equals its sequences run one at a time."""
    gen = torch.Generator().manual_seed(8)
    p = varlen_problem([5, 9], [7, 30], 2, 2, 8, 8, torch.float64, gen, score="sigmoid")
    out = p.run(oa.attention_varlen, backend="torch")
    for b, (qs, ks) in enumerate(((slice(0, 5), slice(0, 7)), (slice(5, 14), slice(7, 37)))):
        one = oa.attention(p.q[None, qs], p.k[None, ks], p.v[None, ks], score="sigmoid",
                           sigmoid_bias=-math.log(ks.stop - ks.start), backend="torch")
        assert max_err(out[qs], one[0]) < 1e-12


def test_public_api_surface():
    assert set(oa.__all__) >= {"attention", "attention_varlen", "hstu_attention", "scaled_dot_product_attention",
                               "merge_attention_states", "reference"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import importlib

        importlib.reload(oa)


def test_import_is_light_and_every_public_name_resolves():
    # torch._dynamo (imported by torch.compiler.disable) costs ~1.4 s: not at `import omniattn`
    import subprocess
    import sys

    code = ("import sys, omniattn; assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'; "
            "missing = [n for n in omniattn.__all__ if getattr(omniattn, n, None) is None]; "
            "assert not missing, missing; from omniattn import distributed; "
            "assert distributed.context_parallel_attention")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _laid_out(shape, layout, gen):
    """A float32 tensor of ``shape`` whose memory is not row-major: its last dim strided by 2, or
    its head dim (second to last) outermost."""
    if layout == "channel-stride":
        return rand(shape[:-1] + (2 * shape[-1],), torch.float32, gen, "cpu")[..., ::2]
    order = (len(shape) - 2,) + tuple(i for i in range(len(shape)) if i != len(shape) - 2)
    t = rand(tuple(shape[i] for i in order), torch.float32, gen, "cpu")  # heads first in memory
    return t.permute(*(order.index(i) for i in range(len(shape))))


@pytest.mark.parametrize("layout", ["channel-stride", "head-major"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_every_entry_point_reads_strided_inputs(layout, backend):
    """Inputs that are views (a slice of the head dim, heads outermost) give the reference's answer
    on every entry point: a fused kernel that assumed contiguous channels was once silently wrong."""
    gen = torch.Generator().manual_seed(41 + len(layout) + len(backend))
    q, k, v = (_laid_out((2, 37, 4, 16), layout, gen) for _ in range(3))
    assert not q.is_contiguous()
    for score in ("softmax", "sigmoid"):
        want = oa.reference.attention(q.double(), k.double(), v.double(), score=score, causal=True)
        assert max_err(oa.attention(q, k, v, score=score, causal=True, backend=backend), want) < 1e-5
    cu = torch.tensor([0, 20, 37], dtype=torch.int32)
    qp, kp, vp = (_laid_out((37, 4, 16), layout, gen) for _ in range(3))
    want = oa.reference.attention_varlen(qp.double(), kp.double(), vp.double(), cu, cu, 20, 20, causal=True)
    assert max_err(oa.attention_varlen(qp, kp, vp, cu, cu, 20, 20, causal=True, backend=backend), want) < 1e-5
    want = oa.reference.hstu_attention(qp.double(), kp.double(), vp.double(), cu, 20)
    assert max_err(oa.hstu_attention(qp, kp, vp, cu, 20, backend=backend), want) < 1e-5
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # SDPA's (B, H, N, D)
    want = F.scaled_dot_product_attention(qs.double(), ks.double(), vs.double(), is_causal=True)
    assert max_err(oa.scaled_dot_product_attention(qs, ks, vs, is_causal=True), want) < 1e-5
    kc, vc = (_laid_out((2, 1500, 2, 16), layout, gen) for _ in range(2))
    qd = _laid_out((2, 1, 4, 16), layout, gen)
    lens = torch.tensor([1500, 1100], dtype=torch.int32)
    out = oa.attention_with_kvcache(qd, kc, vc, lens, backend=backend)
    for b, n in enumerate((1500, 1100)):
        want = oa.reference.attention(qd[b : b + 1].double(), kc[b : b + 1, :n].double(), vc[b : b + 1, :n].double(),
                                      causal=True)
        assert max_err(out[b : b + 1], want) < 1e-5

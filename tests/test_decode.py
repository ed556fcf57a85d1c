"""attention_with_kvcache against the reference: the split-KV Triton kernel (under TRITON_INTERPRET=1
on CPUs, float16/float32: the interpreter computes bf16 wrongly) and the PyTorch split path, dense
and paged caches, every score function, GQA, one and several queries, empty and short entries."""

import math

import pytest
import torch

import omniattn as oa
from omniattn.backends import torch_decode, torch_threads
from omniattn.backends.triton import supported
from omniattn.decode import attention_with_kvcache

from .helpers import PoisonedTorch, assert_tolerance, max_err, rand

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = supported(torch.device(DEVICE), explicit=True)[0]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    from omniattn.backends.triton import decode as triton_decode

    monkeypatch.setattr(triton_decode, "torch", PoisonedTorch())
    monkeypatch.setattr(torch_decode, "torch", PoisonedTorch())
    # small pieces and steps, so the PyTorch path cuts entries into several pieces and steps
    monkeypatch.setattr(torch_decode, "MIN_PIECE", 8)
    monkeypatch.setattr(torch_decode, "STEP_ELEMS", 24 * 2 * 16)
    yield


def make_cache(lens, capacity, hkv, d, dtype, gen, page_size=None):
    """Dense caches (B, capacity, Hkv, D) and, with page_size, the same keys in shuffled pages."""
    b = len(lens)
    k = rand((b, capacity, hkv, d), dtype, gen, DEVICE)
    v = rand((b, capacity, hkv, d), dtype, gen, DEVICE)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    if page_size is None:
        return (k, v), seqlens, None, (k, v)
    pages = -(-capacity // page_size)
    order = torch.randperm(b * pages + 3, generator=gen)[: b * pages]  # spare pages nobody uses
    table = order.view(b, pages).to(torch.int32).to(DEVICE)
    kp = rand((b * pages + 3, page_size, hkv, d), dtype, gen, DEVICE)  # garbage past each entry's keys
    vp = rand((b * pages + 3, page_size, hkv, d), dtype, gen, DEVICE)
    for e in range(b):
        for p in range(pages):
            t0, t1 = p * page_size, min((p + 1) * page_size, capacity)
            kp[table[e, p], : t1 - t0] = k[e, t0:t1]
            vp[table[e, p], : t1 - t0] = v[e, t0:t1]
    return (kp, vp), seqlens, table, (k, v)


def reference(q, dense, lens, dtype, score="softmax", sigmoid_bias=None, silu_norm=None, **kw):
    """Entry by entry: each entry's valid keys, the score defaults of DESIGN.md (bias -ln L_b, norm max L)."""
    k, v = dense
    kw.setdefault("causal", True)  # attention_with_kvcache's default
    outs = []
    for b, n in enumerate(lens):
        extra = {}
        if score == "sigmoid":
            extra["sigmoid_bias"] = sigmoid_bias if sigmoid_bias is not None else -math.log(max(n, 1))
        if score == "silu":
            extra["silu_norm"] = silu_norm if silu_norm is not None else float(max(max(lens), 1))
        outs.append(oa.reference.attention(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], score=score, dtype=dtype,
                                           **extra, **kw))
    return torch.cat(outs)


def check(q, caches, lens, table, dense, backend, score="softmax", num_splits=0, **kw):
    out = attention_with_kvcache(q, *caches, lens, block_table=table, score=score, backend=backend,
                                 num_splits=num_splits, **kw)
    host_lens = lens.tolist()
    assert_tolerance("out", out, reference(q, dense, host_lens, torch.float64, score, **kw),
                     reference(q, dense, host_lens, q.dtype, score, **kw), q.dtype)


BACKENDS = ["torch"] + (["triton"] if TRITON else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, score, paged, nq, dtype):
    gen = torch.Generator().manual_seed(hash((backend, score, paged, nq, str(dtype))) % 2**31)
    lens = [45, 0, 2, 31]  # an empty entry, one shorter than the queries (causal: rows that see nothing)
    caches, seqlens, table, dense = make_cache(lens, 47, 2, 16, dtype, gen, page_size=5 if paged else None)
    q = rand((4, nq, 4, 16), dtype, gen, DEVICE)  # GQA: 4 query heads on 2 kv heads
    check(q, caches, seqlens, table, dense, backend, score, num_splits=3 if nq == 1 else 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nq", [1, 3])
def test_fused_cpu_softmax_middle(monkeypatch, nq, dtype):
    """The PyTorch path's fused CPU kernel for unmasked softmax keys: cut into pieces on several
    workers, merged by lse with the masked edges of the other path (nq=3); lse included."""
    if DEVICE != "cpu":
        pytest.skip("the fused kernel is the CPU path")
    calls = []
    fused = torch_decode._fused_segment
    monkeypatch.setattr(torch_decode, "_fused_segment", lambda *a: calls.append(a[3]) or fused(*a))
    monkeypatch.setattr(torch_decode, "FUSED_MIN_KEYS", 16)
    gen = torch.Generator().manual_seed(hash((nq, str(dtype))) % 2**31)
    lens = [301, 0, 2, 157]  # pieces of uneven length, an empty entry, one too short for the fused path
    caches, seqlens, table, dense = make_cache(lens, 301, 2, 32, dtype, gen)
    q = rand((4, nq, 6, 32), dtype, gen, DEVICE)
    with torch_threads.thread_budget(2):
        check(q, caches, seqlens, table, dense, "torch")
        out, lse = attention_with_kvcache(q, *caches, seqlens, backend="torch", return_lse=True)
    assert len(calls) == 4  # two entries' middles, twice
    for b, n in enumerate(lens):
        _, lse64 = oa.reference.attention(q[b : b + 1].double(), dense[0][b : b + 1, :n].double(),
                                          dense[1][b : b + 1, :n].double(), causal=True, return_lse=True)
        got, want = lse[b : b + 1], lse64.float()
        seen = want.isfinite()  # rows that see no key (empty entry, causal rows before it) are -inf
        assert torch.equal(got[~seen], want[~seen])
        assert max_err(got[seen], want[seen]) < (2e-2 if dtype != torch.float32 else 1e-5)


def test_fused_cpu_path_takes_strided_caches_correctly(monkeypatch):
    """Caches whose channels are strided (a slice of a wider tensor) or whose heads are outermost:
    the fused CPU kernel ignores a channel stride, so such caches must take the float32 path."""
    if DEVICE != "cpu":
        pytest.skip("the fused kernel is the CPU path")
    monkeypatch.setattr(torch_decode, "FUSED_MIN_KEYS", 16)
    gen = torch.Generator().manual_seed(21)
    wide_k, wide_v = rand((2, 70, 2, 64), torch.float32, gen, DEVICE), rand((2, 70, 2, 64), torch.float32, gen, DEVICE)
    heads_out = [t.transpose(1, 2).contiguous().transpose(1, 2)[..., :32] for t in (wide_k, wide_v)]
    for k, v in ((wide_k[..., ::2], wide_v[..., ::2]), heads_out):
        q = rand((2, 1, 4, 32), torch.float32, gen, DEVICE)
        lens = torch.tensor([70, 55], dtype=torch.int32, device=DEVICE)
        check(q, (k, v), lens, None, (k, v), "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(window=(6, 0)), dict(causal=False, softcap=2.5), dict(causal=False, window=(3, 2)),
                                dict(alibi=True), dict(score="sigmoid", sigmoid_bias=-1.5, alibi=True),
                                dict(score="silu", silu_norm=7.0, window=(9, 0))],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_masks_and_score_modifiers(backend, kw):
    gen = torch.Generator().manual_seed(11)
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(6, generator=gen).to(DEVICE)
    lens = [33, 19]
    caches, seqlens, table, dense = make_cache(lens, 40, 2, 24, torch.float32, gen, page_size=8)
    q = rand((2, 3, 6, 24), torch.float32, gen, DEVICE)  # 3 query heads per kv head, head dim 24
    check(q, caches, seqlens, table, dense, backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_queries_and_lse(backend):
    """Nq above the decode regime still works (row blocks); the lse is the reference's."""
    gen = torch.Generator().manual_seed(12)
    lens = [70, 41]
    caches, seqlens, table, dense = make_cache(lens, 70, 1, 16, torch.float32, gen)
    q = rand((2, 20, 4, 16), torch.float32, gen, DEVICE)
    out, lse = attention_with_kvcache(q, *caches, seqlens, backend=backend, return_lse=True, num_splits=2)
    for b, n in enumerate(lens):
        o_r, lse_r = oa.reference.attention(q[b : b + 1], dense[0][b : b + 1, :n], dense[1][b : b + 1, :n], causal=True,
                                            return_lse=True)
        assert max_err(out[b : b + 1], o_r) < 2e-5
        assert max_err(lse[b : b + 1], lse_r) < 2e-5
    check(q, caches, seqlens, table, dense, backend)


@pytest.mark.skipif(not TRITON, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
def test_backends_agree_and_inputs_untouched():
    gen = torch.Generator().manual_seed(13)
    caches, seqlens, table, _ = make_cache([29, 30], 30, 2, 16, torch.float16, gen, page_size=4)
    q = rand((2, 2, 2, 16), torch.float16, gen, DEVICE)
    before = [t.clone() for t in (q, *caches, seqlens, table)]
    a = attention_with_kvcache(q, *caches, seqlens, block_table=table, score="silu", backend="triton")
    b = attention_with_kvcache(q, *caches, seqlens, block_table=table, score="silu", backend="torch")
    assert max_err(a, b) < 2e-3
    for t0, t in zip(before, (q, *caches, seqlens, table)):
        assert torch.equal(t0, t)


def test_non_finite_key_stays_in_its_entry():
    gen = torch.Generator().manual_seed(14)
    caches, seqlens, _, _ = make_cache([20, 20], 20, 1, 16, torch.float32, gen)
    k = caches[0].clone()
    k[0, 5, 0, 3] = math.nan
    q = rand((2, 1, 2, 16), torch.float32, gen, DEVICE)
    for backend in BACKENDS:
        out = attention_with_kvcache(q, k, caches[1], seqlens, backend=backend, num_splits=2)
        assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any()


@pytest.mark.parametrize("where", ["k+inf", "k-inf", "k-nan", "v+inf", "v-nan", "q+inf", "window-edge"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_inputs_follow_the_rule(monkeypatch, where, score, fused):
    """DESIGN.md's non-finite rule on the PyTorch path: NaN exactly where the reference has it (an
    Inf key whose scores are -inf, an Inf value, a value on the window's edge that one query row
    sees and the other does not, a key outside the window), outputs and lse, on the float32 path
    and the fused CPU kernel's (its zero probe row)."""
    if fused and (DEVICE != "cpu" or score != "softmax"):
        pytest.skip("the fused kernel is the CPU path of softmax")
    monkeypatch.setattr(torch_decode, "FUSED_MIN_KEYS", 16 if fused else 10**9)
    gen = torch.Generator().manual_seed(hash((where, score, fused)) % 2**31)
    lens = [61, 40]
    caches, seqlens, _, dense = make_cache(lens, 61, 2, 16, torch.float32, gen)
    k, v = (t.clone() for t in caches)
    q = rand((2, 2, 4, 16), torch.float32, gen, DEVICE)
    kw = dict(window=(20, 0)) if where == "window-edge" else {}
    if where == "k-inf":  # every query of the group scores -inf against it: no NaN by itself
        q[0, :, 2:4, 1] = q[0, :, 2:4, 1].abs() + 0.5
        k[0, 30, 1, 1] = -math.inf
    elif where == "window-edge":  # key 39: seen by the query at 59, not the one at 60; key 3 by neither
        k[0, 3, 0, 2], v[0, 39, 1, 7] = math.inf, math.inf
    else:
        t = {"k": k, "v": v, "q": q}[where[0]]
        t[0, 1 if where[0] == "q" else 30, 1, 5] = math.nan if where.endswith("nan") else math.inf
    out, lse = attention_with_kvcache(q, k, v, seqlens, score=score, backend="torch",
                                      return_lse=score == "softmax", **kw) if score == "softmax" else \
        (attention_with_kvcache(q, k, v, seqlens, score=score, backend="torch", **kw), None)
    want = reference(q, (k, v), lens, torch.float64, score, **kw)
    assert torch.equal(out.isnan(), want.isnan()), where
    assert want[0].isnan().any() and not want[1].isnan().any()  # the case means something
    if where == "window-edge":
        assert want[0, 0].isnan().any() and not want[0, 1].isnan().any()
    finite = ~want.isnan()
    assert max_err(out[finite], want[finite].to(out.dtype)) < 1e-5
    if lse is not None:
        for b, n in enumerate(lens):
            _, lse64 = oa.reference.attention(q[b : b + 1].double(), k[b : b + 1, :n].double(),
                                              v[b : b + 1, :n].double(), causal=True, return_lse=True, **kw)
            assert torch.equal(lse[b].isnan(), lse64[0].isnan())


def test_default_seqlens_and_paged_capacity():
    gen = torch.Generator().manual_seed(15)
    caches, seqlens, table, dense = make_cache([12, 12], 12, 1, 16, torch.float32, gen, page_size=4)
    q = rand((2, 1, 1, 16), torch.float32, gen, DEVICE)
    full = attention_with_kvcache(q, *dense, backend="torch")  # default: all 12 keys
    paged = attention_with_kvcache(q, *caches, block_table=table, backend="torch")  # default: every page
    assert max_err(full, paged) < 1e-6
    assert max_err(full, reference(q, dense, [12, 12], torch.float64)) < 1e-5


@pytest.mark.parametrize("bad, err, match", [
    (dict(q=torch.zeros(2, 1, 4, 16, dtype=torch.float16)), TypeError, "k_cache: expected dtype"),
    (dict(k_cache=torch.zeros(2, 10, 3, 16), v_cache=torch.zeros(2, 10, 3, 16)), ValueError,
     "multiple of the number of key/value heads"),
    (dict(k_cache=torch.zeros(3, 10, 2, 16), v_cache=torch.zeros(3, 10, 2, 16)), ValueError, "k_cache: expected batch 2"),
    (dict(cache_seqlens=torch.tensor([3, 11], dtype=torch.int32)), ValueError, "cache_seqlens: entry 1 has 11 keys"),
    (dict(cache_seqlens=torch.tensor([3.0, 1.0])), TypeError, "cache_seqlens: expected dtype int32"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, r"cache_seqlens: expected shape \(2,\)"),
    (dict(block_table=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "block_table: expected dtype int32"),
    (dict(block_table=torch.tensor([[0, 1], [2, 10]], dtype=torch.int32)), ValueError, "block_table: entry 1 uses page ids"),
    (dict(score="tanh"), ValueError, "score: expected one of"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(return_lse=True, score="silu"), ValueError, "return_lse"),
])
def test_bad_input_names_the_argument(bad, err, match):
    args = dict(q=torch.zeros(2, 1, 4, 16), k_cache=torch.zeros(2, 10, 2, 16), v_cache=torch.zeros(2, 10, 2, 16),
                cache_seqlens=torch.tensor([3, 10], dtype=torch.int32))
    args.update(bad)
    if "block_table" in bad:  # a paged cache of 10 pages of 5 tokens
        args["k_cache"] = args["v_cache"] = torch.zeros(10, 5, 2, 16)
    q, kc, vc, lens = args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_seqlens")
    with pytest.raises(err, match=match):
        attention_with_kvcache(q, kc, vc, lens, backend="torch", **args)


def test_gradients_are_refused():
    q = torch.zeros(1, 1, 2, 16, requires_grad=True)
    with pytest.raises(ValueError, match="inference only"):
        attention_with_kvcache(q, torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16))


def test_split_heuristic():
    from omniattn.backends.triton.decode import choose_splits

    assert choose_splits(512, 4096, 64, 264) == 1  # enough programs already
    s = choose_splits(8, 131072, 64, 264)  # one sequence, 8 kv heads, 128K keys: fill the GPU
    assert 25 <= s <= 64 and 8 * s <= 264
    assert choose_splits(8, 128, 64, 264) == 1  # too few tiles to split

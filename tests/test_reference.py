"""The reference against a second, naive formula per feature: explicit Python loops over (i, j)."""

import math

import pytest
import torch

import omniattn as oa
from omniattn import reference

from .helpers import rand


def naive_allowed(i, j, nq, nk, causal, window):
    """DESIGN.md's allowed(i, j), one pair at a time."""
    c = i + nk - nq
    left, right = window
    if causal and j > c:
        return False
    if left >= 0 and j < c - left:
        return False
    if right >= 0 and j > c + right:
        return False
    return True


def naive_attention(q, k, v, score, causal=False, window=(-1, -1), scale=None, softcap=0.0, alibi=None,
                    sigmoid_bias=None, silu_norm=None):
    """One sequence, q (Nq, Hq, D): a double loop over query and key, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    nq, hq, d = q.shape
    nk, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(nq, hq, dv, dtype=torch.float64)
    lse = torch.full((hq, nq), -math.inf, dtype=torch.float64)
    for h in range(hq):
        kv = h // (hq // hkv)
        for i in range(nq):
            scores, vals = [], []
            for j in range(nk):
                if not naive_allowed(i, j, nq, nk, causal, window):
                    continue
                s = scale * float(q[i, h] @ k[j, kv])
                if softcap > 0:
                    s = softcap * math.tanh(s / softcap)
                if alibi is not None:
                    s -= float(alibi[h]) * abs(i + nk - nq - j)
                scores.append(s)
                vals.append(v[j, kv])
            if not scores:
                continue
            if score == "softmax":
                mx = max(scores)
                w = [math.exp(s - mx) for s in scores]
                total = sum(w)
                lse[h, i] = mx + math.log(total)
                w = [x / total for x in w]
            elif score == "sigmoid":
                b = -math.log(nk) if sigmoid_bias is None else sigmoid_bias
                w = [1 / (1 + math.exp(-(s + b))) for s in scores]
            else:
                n = nk if silu_norm is None else silu_norm
                w = [s / (1 + math.exp(-s)) / n for s in scores]
            out[i, h] = sum(wi * vi for wi, vi in zip(w, vals))
    return out, lse


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize(
    "feature",
    ["plain", "causal", "window", "causal+window", "gqa", "alibi", "softcap", "short_q", "long_q", "bias_norm"],
)
def test_reference_matches_naive_loops(score, feature):
    gen = torch.Generator().manual_seed(hash((score, feature)) % 2**31)
    nq, nk, hq, hkv, d, dv = 7, 9, 2, 2, 5, 3
    kw = {}
    if feature == "causal":
        kw["causal"] = True
    elif feature == "window":
        kw["window"] = (2, 1)
    elif feature == "causal+window":
        kw.update(causal=True, window=(3, 0))
    elif feature == "gqa":
        hq, hkv = 6, 2
    elif feature == "alibi":
        kw["alibi"] = torch.rand(hq, generator=gen)
    elif feature == "softcap":
        kw["softcap"] = 1.5
    elif feature == "short_q":
        nq, kw["causal"] = 3, True
    elif feature == "long_q":
        nq, nk, kw["causal"] = 11, 4, True  # early rows see no key at all
    elif feature == "bias_norm":
        if score == "softmax":
            kw["scale"] = 0.3
        elif score == "sigmoid":
            kw["sigmoid_bias"] = -0.7
        else:
            kw["silu_norm"] = 3.0
    q = rand((1, nq, hq, d), torch.float64, gen, scale=2.0)
    k = rand((1, nk, hkv, d), torch.float64, gen, scale=2.0)
    v = rand((1, nk, hkv, dv), torch.float64, gen)
    want, want_lse = naive_attention(q[0], k[0], v[0], score, **kw)
    api_kw = {**kw}
    if "alibi" in api_kw:
        api_kw["alibi_slopes"] = api_kw.pop("alibi")
    got = reference.attention(q, k, v, score=score, return_lse=score == "softmax", **api_kw)
    if score == "softmax":
        got, lse = got
        torch.testing.assert_close(lse[0], want_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], want, rtol=1e-12, atol=1e-12)


def test_reference_varlen_is_per_sequence_dense():
    gen = torch.Generator().manual_seed(3)
    lens_q, lens_k = [3, 0, 5], [4, 2, 6]
    q = rand((8, 2, 4), torch.float64, gen)
    k = rand((12, 1, 4), torch.float64, gen)
    v = rand((12, 1, 3), torch.float64, gen)
    cu_q = torch.tensor([0, 3, 3, 8])
    cu_k = torch.tensor([0, 4, 6, 12])
    got = reference.attention_varlen(q, k, v, cu_q, cu_k, 5, 6, score="silu", causal=True)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        # silu's default norm is max_seqlen_k of the whole batch, not the sequence's own length
        want, _ = naive_attention(q[qs], k[ks], v[ks], "silu", causal=True, silu_norm=6)
        torch.testing.assert_close(got[qs], want, rtol=1e-12, atol=1e-12)


def naive_hstu_allowed(i, j, length, causal, targets, contextual, max_attn_len):
    """DESIGN.md's HSTU rule for one pair."""

    def ident(p):
        x = max(p - contextual + 1, 0) if contextual > 0 else p
        return min(x, max_id)

    max_id = (length - contextual + 1 if contextual > 0 else length) - targets
    d = ident(i) - ident(j)
    if not causal:
        d = abs(d)
    ok = i == j or d > 0
    if max_attn_len > 0:
        ok = ok and d <= max_attn_len
    if contextual > 0 and ident(i) == 0 and ident(j) < max_id:
        ok = True
    return ok


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("targets,contextual,max_attn_len", [(0, 0, 0), (3, 0, 0), (0, 2, 0), (2, 2, 3), (0, 0, 2), (9, 0, 0)])
def test_hstu_mask_matches_rule(causal, targets, contextual, max_attn_len):
    length = 9
    if contextual and targets + contextual > length:
        pytest.skip("contextual prefix must precede the targets")
    got = reference.hstu_allowed_mask(length, causal, targets, contextual, max_attn_len)
    for i in range(length):
        for j in range(length):
            assert bool(got[i, j]) == naive_hstu_allowed(i, j, length, causal, targets, contextual, max_attn_len), (i, j)


def test_hstu_targets_see_history_not_each_other():
    m = reference.hstu_allowed_mask(6, causal=True, num_targets=3)
    # history rows 0..2 are causal; target rows 3..5 see history 0..2 and themselves only
    assert m[3].tolist() == [True, True, True, True, False, False]
    assert m[5].tolist() == [True, True, True, False, False, True]
    assert m[2].tolist() == [True, True, True, False, False, False]


def test_targets_share_one_position_in_the_bias():
    """M-FALCON: a candidate's bias towards the history does not depend on its slot among the targets."""
    gen = torch.Generator().manual_seed(6)
    pos_w, ts_w = rand((1, 15), torch.float64, gen), rand((1, 5), torch.float64, gen)
    ts = torch.tensor([1, 3, 7, 20, 20, 20])  # three candidates at the request time 20
    bias = reference.relative_bias(pos_w, ts_w, ts, 8, 4, "log", num_targets=3)[0]
    assert torch.equal(bias[3, :3], bias[4, :3]) and torch.equal(bias[3, :3], bias[5, :3])
    assert not torch.equal(reference.relative_bias(pos_w, ts_w, ts, 8, 4, "log")[0][3, :3],
                           reference.relative_bias(pos_w, ts_w, ts, 8, 4, "log")[0][4, :3])


def test_relative_bias_matches_loops():
    gen = torch.Generator().manual_seed(5)
    max_len, nb, length = 8, 6, 5
    pos_w = rand((1, 2 * max_len - 1), torch.float64, gen)
    ts_w = rand((1, nb + 1), torch.float64, gen)
    ts = torch.tensor([3, 10, 10, 400, 90000])
    for kind in ("log", "sqrt"):
        got = reference.relative_bias(pos_w, ts_w, ts, max_len, nb, kind)[0]
        for i in range(length):
            t_next = int(ts[min(i + 1, length - 1)])
            for j in range(length):
                x = max(abs(t_next - int(ts[j])), 1)
                raw = math.log(x) / 0.301 if kind == "log" else math.sqrt(x)
                bucket = min(max(math.floor(raw), 0), nb)
                want = pos_w[0, max_len - 1 + j - i] + ts_w[0, bucket]
                assert abs(float(got[i, j]) - float(want)) < 1e-12, (kind, i, j)


def test_hstu_reference_matches_loops():
    gen = torch.Generator().manual_seed(11)
    lens, h, d, dv, n = [4, 6], 2, 3, 2, 7
    offsets = torch.tensor([0, 4, 10])
    q = rand((10, h, d), torch.float64, gen)
    k = rand((10, h, d), torch.float64, gen)
    v = rand((10, h, dv), torch.float64, gen)
    targets = torch.tensor([1, 2])
    rab = oa.hstu.RelativeBias(n, num_buckets=5, num_heads=h, dtype=torch.float64)
    ts = torch.tensor([1, 5, 9, 200, 3, 3, 50, 51, 1000, 1001])
    got = reference.hstu_attention(q, k, v, offsets, n, alpha=0.5, num_targets=targets, rab=rab, timestamps=ts)
    for b, length in enumerate(lens):
        o = int(offsets[b])
        for hh in range(h):
            for i in range(length):
                acc = torch.zeros(dv, dtype=torch.float64)
                for j in range(length):
                    if not naive_hstu_allowed(i, j, length, True, int(targets[b]), 0, 0):
                        continue
                    t_next = int(ts[o + min(i + 1, length - 1)])
                    bucket = min(math.floor(math.log(max(abs(t_next - int(ts[o + j])), 1)) / 0.301), 5)
                    s = 0.5 * float(q[o + i, hh] @ k[o + j, hh])
                    first_target = length - int(targets[b])  # targets share one position in the bias
                    pi, pj = min(i, first_target), min(j, first_target)
                    s += float(rab.pos_w[hh, n - 1 + pj - pi].detach()) + float(rab.ts_w[hh, bucket].detach())
                    acc += s / (1 + math.exp(-s)) / n * v[o + j, hh]
                torch.testing.assert_close(got[o + i, hh], acc.to(got.dtype), rtol=1e-12, atol=1e-12)


def test_reference_gradients_are_finite_for_empty_rows():
    q = torch.randn(1, 5, 1, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    assert torch.isinf(lse[0, 0, :3]).all() and (out[0, :3] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))

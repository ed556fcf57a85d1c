"""omniattn.longctx on the CPU: the same scheduling, buffers, budget and merges as on a GPU (a CPU
"device" staged through copies), against whole-context reference attention."""

import pytest
import torch

import omniattn as oa
import omniattn.longctx.device as device_mod
import omniattn.longctx.schedule as schedule
from omniattn import longctx
from omniattn.backends import torch_decode
from omniattn.longctx.plan import Bandwidths, cooperative_split, predict_ms

from .helpers import assert_tolerance, rand

SLOW_CPU = Bandwidths(host_gbps=1.0, link_gbps=2.0, device_gbps=4.0)  # forces a three-way split


@pytest.fixture(params=[True, False], ids=["staged", "direct"])
def staged(request, monkeypatch):
    """staged: the CPU 'device' gets a mirror and streaming buffers as a GPU would; direct: host memory in place."""
    monkeypatch.setattr(schedule, "STAGE_ON_CPU", request.param)
    monkeypatch.setattr(torch_decode, "MIN_PIECE", 8)
    return request.param


def filled_cache(b, n, hkv, d, dtype, gen, parts=(0.4, 0.3)):
    """A cache filled by several appends, and the whole K, V."""
    k = rand((b, n, hkv, d), dtype, gen)
    v = rand((b, n, hkv, d), dtype, gen)
    cache = longctx.HostKVCache(b, hkv, d, dtype=dtype)
    cuts = [0] + [int(n * sum(parts[: i + 1])) for i in range(len(parts))] + [n]
    for t0, t1 in zip(cuts[:-1], cuts[1:]):
        cache.append(k[:, t0:t1], v[:, t0:t1])
    return cache, k, v


def check(q, k, v, out, score="softmax", causal=True):
    kw = dict(score=score, causal=causal)
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.dtype == q.dtype
    assert_tolerance("out", out, oa.reference.attention(q, k, v, **kw),
                     oa.reference.attention(q, k, v, dtype=q.dtype, **kw), q.dtype)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("nq, causal", [(211, True), (90, True), (37, False)])
def test_prefill_matches_whole_context(staged, score, nq, causal):
    """Chunks of 23 tokens and query blocks of 40 rows: neither divides the 211-token context."""
    gen = torch.Generator().manual_seed(nq * 7 + len(score))
    cache, k, v = filled_cache(2, 211, 2, 16, torch.float32, gen)
    q = rand((2, nq, 4, 16), torch.float32, gen)
    stats = {}
    out = longctx.attention(q, cache, score=score, causal=causal, gpu_budget_bytes=100 * cache.bytes_per_token,
                            chunk_tokens=23, query_block=40, stats=stats)
    check(q, k, v, out, score, causal)
    if staged:  # a 54-token mirror plus two 23-token buffers: exactly the budget, the rest streamed
        assert stats["resident_tokens"] == 54 and stats["streamed_tokens"] > 0
        assert stats["device_kv_bytes"] <= 100 * cache.bytes_per_token


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("cooperative", [False, True])
def test_decode_after_prefill(staged, score, cooperative):
    """Prefill, then decode steps that append one token each; every step equals whole-context attention."""
    gen = torch.Generator().manual_seed(3 + cooperative)
    dtype = torch.float16
    cache, k, v = filled_cache(1, 150, 2, 32, dtype, gen)
    budget = 90 * cache.bytes_per_token
    q = rand((1, 150, 6, 32), dtype, gen)  # 3 query heads per kv head
    check(q, k, v, longctx.attention(q, cache, score=score, gpu_budget_bytes=budget, chunk_tokens=17), score)
    for step in range(3):
        k_new, v_new = rand((1, 1, 2, 32), dtype, gen), rand((1, 1, 2, 32), dtype, gen)
        cache.append(k_new, v_new)
        k, v = torch.cat([k, k_new], 1), torch.cat([v, v_new], 1)
        q = rand((1, 1 + step, 6, 32), dtype, gen)  # 1, 2, 3 new query rows
        stats = {}
        out = longctx.attention(q, cache, score=score, gpu_budget_bytes=budget, chunk_tokens=17,
                                cooperative=cooperative, bandwidths=SLOW_CPU, stats=stats)
        check(q, k, v, out, score)
        if staged and cooperative:
            assert stats["resident_tokens"] > 0 and stats["streamed_tokens"] > 0 and stats["host_tokens"] > 0
        if not staged:
            assert stats["host_tokens"] == len(cache)  # no device: all on the host, same code path


def test_cooperative_steps_learn_the_host_rate(monkeypatch):
    """A cooperative step with measured figures folds the host rate it saw into them (the next
    step's split follows it); given or overriding figures are left alone."""
    from types import SimpleNamespace

    import importlib

    calibrate = importlib.import_module("omniattn.longctx.calibrate")  # the module, not the function
    monkeypatch.setattr(schedule, "STAGE_ON_CPU", True)
    monkeypatch.setattr(calibrate, "_measured", {})
    monkeypatch.setattr(calibrate, "_observed", set())
    gen = torch.Generator().manual_seed(8)
    cache, k, v = filled_cache(1, 120, 2, 16, torch.float32, gen)
    q = rand((1, 1, 4, 16), torch.float32, gen)
    dev = torch.device("cpu")
    calibrate.calibrate(q, cache, dev)
    key = calibrate._key(q, cache, dev, "softmax")
    calibrate._measured[key] = before = Bandwidths(host_gbps=1e-6, link_gbps=2e-6, device_gbps=4e-6)
    assert not calibrate.host_rate_observed(q, cache, dev, "softmax")  # calibrated only
    clock = iter([10.0, 10.5])  # the host part's start and end: it took 0.5 s
    monkeypatch.setattr(schedule, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    budget = 60 * cache.bytes_per_token
    stats = {}
    out = longctx.attention(q, cache, gpu_budget_bytes=budget, chunk_tokens=16, cooperative=True, stats=stats)
    check(q, k, v, out)
    assert stats["bandwidths"] == before and stats["host_tokens"] > 0
    assert calibrate.host_rate_observed(q, cache, dev, "softmax")
    seen = stats["host_tokens"] * cache.bytes_per_token / 0.5 / 1e9
    after = calibrate._measured[key]
    assert after.host_gbps == pytest.approx(0.5 * before.host_gbps + 0.5 * seen)
    assert (after.link_gbps, after.device_gbps) == (before.link_gbps, before.device_gbps)
    for kw in (dict(bandwidths=SLOW_CPU), {}):  # given figures; then overriding ones
        clock = iter([10.0, 10.5])
        if not kw:
            calibrate.set_bandwidths(SLOW_CPU)
        try:
            longctx.attention(q, cache, gpu_budget_bytes=budget, chunk_tokens=16, cooperative=True, **kw)
        finally:
            calibrate.set_bandwidths(None)
        assert calibrate._measured[key] == after


def test_auto_cooperates_only_where_the_model_predicts_a_gain():
    from omniattn.longctx.plan import AUTO_MAX_SHARE, cooperation_pays

    bpt = 4096
    fast_host = Bandwidths(host_gbps=30.0, link_gbps=54.0, device_gbps=700.0)  # the H100 host, softmax
    slow_host = Bandwidths(host_gbps=8.0, link_gbps=54.0, device_gbps=700.0)  # sigmoid's float32 path
    for bw, pays in ((fast_host, True), (slow_host, False)):
        split = cooperative_split(1 << 20, 458752, bpt, bw)
        alone = predict_ms(458752, (1 << 20) - 458752, 0, bpt, bw)
        assert split.host > 0 and (split.predicted_ms <= AUTO_MAX_SHARE * alone) == pays
        assert cooperation_pays(split, bpt, bw) == pays
        # "auto": the split is tried while the host rate is only calibrated, then kept only if it pays
        assert schedule._auto_split(split, 1 << 20, 458752, bpt, bw, known=False) == (True, split)
        coop, chosen = schedule._auto_split(split, 1 << 20, 458752, bpt, bw, known=True)
        assert coop == pays and (chosen.host > 0) == pays and chosen.resident == 458752 and chosen.length == 1 << 20


def test_truncate_then_append_refreshes_the_mirror(monkeypatch):
    monkeypatch.setattr(schedule, "STAGE_ON_CPU", True)
    gen = torch.Generator().manual_seed(5)
    cache, k, v = filled_cache(2, 80, 1, 16, torch.float32, gen)
    q = rand((2, 1, 2, 16), torch.float32, gen)
    longctx.attention(q, cache, gpu_budget_bytes=200 * cache.bytes_per_token)  # mirrors all 80 tokens
    cache.truncate(50)
    k2, v2 = rand((2, 13, 1, 16), torch.float32, gen), rand((2, 13, 1, 16), torch.float32, gen)
    cache.append(k2, v2)
    assert len(cache) == 63
    k, v = torch.cat([k[:, :50], k2], 1), torch.cat([v[:, :50], v2], 1)
    check(q, k, v, longctx.attention(q, cache, gpu_budget_bytes=200 * cache.bytes_per_token))
    with pytest.raises(ValueError, match="n: expected an int in 0..63"):
        cache.truncate(64)


def test_budget_smaller_than_two_chunks_is_refused():
    gen = torch.Generator().manual_seed(6)
    cache, _, _ = filled_cache(1, 64, 2, 16, torch.float32, gen)
    q = rand((1, 4, 2, 16), torch.float32, gen)
    per_token = cache.bytes_per_token
    with pytest.raises(ValueError, match="gpu_budget_bytes: .* smaller than two chunks of 32 tokens"):
        longctx.attention(q, cache, gpu_budget_bytes=40 * per_token, chunk_tokens=32)
    with pytest.raises(ValueError, match="gpu_budget_bytes: .* smaller than two chunks of 16 tokens"):
        longctx.attention(q, cache, gpu_budget_bytes=20 * per_token)
    with pytest.raises(ValueError, match="gpu_budget_bytes: expected an int > 0"):
        longctx.attention(q, cache, gpu_budget_bytes=-1)
    with pytest.raises(ValueError, match="chunk_tokens"):
        longctx.attention(q, cache, chunk_tokens=3)


def test_bad_calls():
    gen = torch.Generator().manual_seed(7)
    cache, _, _ = filled_cache(1, 40, 2, 16, torch.float32, gen)
    with pytest.raises(ValueError, match="cooperative=True: CPU-GPU cooperation is for decoding"):
        longctx.attention(rand((1, 20, 2, 16), torch.float32, gen), cache, cooperative=True)
    with pytest.raises(TypeError, match="q: expected dtype torch.float32"):
        longctx.attention(rand((1, 2, 2, 16), torch.float16, gen), cache)
    with pytest.raises(ValueError, match="multiple of the cache's kv heads"):
        longctx.attention(rand((1, 2, 3, 16), torch.float32, gen), cache)
    with pytest.raises(ValueError, match="q: 41 query rows but the cache holds 40"):
        longctx.attention(rand((1, 41, 2, 16), torch.float32, gen), cache)
    with pytest.raises(TypeError, match="cache: expected an omniattn.longctx.HostKVCache"):
        longctx.attention(rand((1, 2, 2, 16), torch.float32, gen), (cache.k, cache.v))
    with pytest.raises(ValueError, match="inference only"):
        longctx.attention(rand((1, 2, 2, 16), torch.float32, gen).requires_grad_(), cache)


def test_cache_growth_capacity_and_checks():
    cache = longctx.HostKVCache(2, 1, 8, dtype=torch.float32)
    assert len(cache) == 0 and cache.capacity == 4096
    cache.append(torch.ones(2, 5000, 1, 8), torch.ones(2, 5000, 1, 8))
    assert len(cache) == 5000 and cache.capacity == 8192  # doubled, contents kept
    assert torch.equal(cache.k, torch.ones(2, 5000, 1, 8))
    fixed = longctx.HostKVCache(1, 1, 8, v_dim=4, dtype=torch.float32, capacity=10)
    fixed.append(torch.ones(1, 10, 1, 8), torch.ones(1, 10, 1, 4))
    with pytest.raises(ValueError, match="exceeds the fixed capacity 10"):
        fixed.append(torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 4))
    with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
        cache.append(torch.ones(2, 1, 1, 8, dtype=torch.float16), torch.ones(2, 1, 1, 8))
    with pytest.raises(ValueError, match=r"v: expected shape \(2, n, 1, 8\)"):
        cache.append(torch.ones(2, 1, 1, 8), torch.ones(2, 1, 2, 8))
    with pytest.raises(ValueError, match="storage: expected 'exact', 'int8' or 'fp8', got 'int4-fp8'"):
        longctx.HostKVCache(1, 1, 8, storage="int4-fp8")


def test_cooperative_split_balances_both_sides():
    bw = Bandwidths(host_gbps=24.0, link_gbps=43.0, device_gbps=2500.0)
    bpt = 4096
    s = cooperative_split(1 << 20, 400_000, bpt, bw)
    gb = bpt / 1e9
    host_ms = 1e3 * s.host * gb / bw.host_gbps
    device_ms = 1e3 * (s.resident * gb / bw.device_gbps + s.streamed * gb / bw.link_gbps)
    assert abs(host_ms - device_ms) < 0.01 * host_ms and s.predicted_ms == pytest.approx(max(host_ms, device_ms))
    assert s.predicted_ms < predict_ms(400_000, (1 << 20) - 400_000, 0, bpt, bw)  # beats streaming alone
    assert s.predicted_ms < predict_ms(0, 0, 1 << 20, bpt, bw)  # and the CPU alone
    assert cooperative_split(1000, 1000, bpt, bw).host == 0  # all resident: nothing for the host


def _quantized_pair(storage, b, n, hkv, d, dtype, gen):
    """A cache with quantized storage (grown by several appends, an all-zero token included) and an
    exact cache holding its dequantized K and V."""
    k, v = rand((b, n, hkv, d), dtype, gen), rand((b, n, hkv, d), dtype, gen)
    k[:, 5] = 0.0
    quant = longctx.HostKVCache(b, hkv, d, dtype=dtype, storage=storage, capacity=None)
    for t0, t1 in ((0, n // 3), (n // 3, n // 3 + 1), (n // 3 + 1, n)):
        quant.append(k[:, t0:t1], v[:, t0:t1])
    exact = longctx.HostKVCache(b, hkv, d, dtype=dtype)
    exact.append(quant.k, quant.v)
    return quant, exact, k, v


@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_quantized_storage_round_trip(storage):
    """Per (entry, token, head) scales: INT8 within half a step of the scale, e4m3 within its
    relative rounding; zeros stay zeros; the caller's tensors are not modified."""
    gen = torch.Generator().manual_seed(11)
    k, v = rand((2, 70, 3, 16), torch.float32, gen), rand((2, 70, 3, 16), torch.float32, gen)
    k[:, 5] = 0.0
    k_before = k.clone()
    cache = longctx.HostKVCache(2, 3, 16, dtype=torch.float32, storage=storage)
    cache.append(k, v)
    assert torch.equal(k, k_before)
    step = k.abs().amax(-1, keepdim=True) / (127 if storage == "int8" else 448)
    err = (cache.k - k).abs()
    if storage == "int8":
        assert (err <= 0.5 * step + 1e-6 * k.abs()).all()
    else:  # e4m3: 3 mantissa bits -> relative error <= 2^-4 of the scaled value, or the subnormal step
        assert (err <= k.abs() / 16 + step * 2.0**-9 + 1e-7).all()
    assert torch.equal(cache.k[:, 5], torch.zeros_like(cache.k[:, 5]))
    assert cache.bytes_per_token == 2 * 3 * 32 * 4  # the device's unit: the dtype, whatever the storage
    assert cache._k.dtype == (torch.int8 if storage == "int8" else torch.float8_e4m3fn)


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@pytest.mark.parametrize("score", ["softmax", "silu"])
def test_quantized_storage_attention(staged, storage, score, monkeypatch):
    """Prefill (streamed chunks, a mirror) and cooperative decode on a quantized cache equal the same
    calls on an exact cache of its dequantized K/V, and stay close to the unquantized context.
    Copies are dequantized in pieces of 7 tokens (several per chunk)."""
    monkeypatch.setattr(device_mod, "STAGE_TOKENS", 7)
    gen = torch.Generator().manual_seed(5 + len(storage))
    quant, exact, k, v = _quantized_pair(storage, 1, 160, 2, 32, torch.float32, gen)
    budget = 90 * quant.bytes_per_token
    for nq, kw in ((40, dict(chunk_tokens=17, query_block=16)),
                   (1, dict(chunk_tokens=17, cooperative=True, bandwidths=SLOW_CPU))):
        q = rand((1, nq, 4, 32), torch.float32, gen)
        stats = {}
        got = longctx.attention(q, quant, score=score, gpu_budget_bytes=budget, stats=stats, **kw)
        want = longctx.attention(q, exact, score=score, gpu_budget_bytes=budget, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        check(q, exact.k, exact.v, got, score)
        if staged and nq > 1:  # the prefill reports its device KV (a mirror and two buffers)
            assert 0 < stats["device_kv_bytes"] <= budget and stats["streamed_tokens"] > 0
        full = oa.reference.attention(q, k, v, score=score, causal=True)
        cos = torch.nn.functional.cosine_similarity(got.flatten().double(), full.flatten().double(), 0)
        assert cos > (0.999 if storage == "int8" else 0.99)

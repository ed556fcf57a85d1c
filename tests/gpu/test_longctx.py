"""GPU-only: the split-KV decode kernel in bf16 at 32K-128K keys, host-KV streaming against in-GPU
attention at a few 100K tokens, the memory budget proven with torch.cuda.max_memory_allocated, and
cooperative CPU-GPU decoding. About a minute on an H100."""

import math

import pytest
import torch

import omniattn as oa
from omniattn import longctx
from omniattn.decode import attention_with_kvcache

DEV = "cuda"
HQ, HKV, D = 32, 8, 128


def per_head_reference(q, k, v, score="softmax", dtype=torch.float64, causal=True, sigmoid_bias=None, silu_norm=None):
    """Attention of q (Nq, Hq, D) over k, v (L, Hkv, D) one kv head at a time (never (Hq, L, D) copies):
    the float64 reference, or with dtype=bf16 the same-dtype PyTorch maths."""
    nq, hq, d = q.shape
    length, hkv, _ = k.shape
    g = hq // hkv
    out = torch.empty(nq, hq, v.shape[-1], dtype=dtype, device=q.device)
    pos_q = torch.arange(nq, device=q.device).view(-1, 1) + length - nq
    ok = torch.arange(length, device=q.device).view(1, -1) <= pos_q if causal else None
    for h in range(hkv):
        qh = q[:, h * g : (h + 1) * g].to(dtype).transpose(0, 1)  # (G, Nq, D)
        s = (qh @ k[:, h].to(dtype).t()) / math.sqrt(d)  # (G, Nq, L)
        if score == "softmax":
            p = torch.softmax((s if ok is None else s.masked_fill(~ok, -math.inf)).float(), -1).to(dtype)
        elif score == "sigmoid":
            p = torch.sigmoid(s + (sigmoid_bias if sigmoid_bias is not None else -math.log(length)))
        else:
            p = torch.nn.functional.silu(s) / (silu_norm or length)
        if ok is not None and score != "softmax":
            p = p * ok
        out[:, h * g : (h + 1) * g] = (p @ v[:, h].to(dtype)).transpose(0, 1)
    return out


def within_rule(got, ref64, ref_same, floor=2e-3):
    err = (got.double() - ref64).abs().max().item()
    limit = 2 * (ref_same.double() - ref64).abs().max().item() + floor * max(1.0, ref64.abs().max().item())
    assert err <= limit, f"error {err:.3e} > {limit:.3e}"


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_kernel_bf16_long(score, paged):
    torch.manual_seed(0)
    lens = [131072, 32768, 77777]
    b, nq = len(lens), 2
    k = torch.randn(b, max(lens), HKV, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(b, nq, HQ, D, device=DEV, dtype=torch.bfloat16)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    table = None
    kc, vc = k, v
    if paged:
        page = 256
        pages = max(lens) // page
        table = torch.randperm(b * pages, device=DEV).view(b, pages).to(torch.int32)
        kc = torch.empty(b * pages, page, HKV, D, device=DEV, dtype=torch.bfloat16)
        vc = torch.empty_like(kc)
        kc[table.long()] = k.view(b, pages, page, HKV, D)
        vc[table.long()] = v.view(b, pages, page, HKV, D)
    out = attention_with_kvcache(q, kc, vc, seqlens, block_table=table, score=score)
    norm = float(max(lens))
    for e, n in enumerate(lens):
        kw = dict(score=score, sigmoid_bias=-math.log(n), silu_norm=norm)
        within_rule(out[e], per_head_reference(q[e], k[e, :n], v[e, :n], **kw),
                    per_head_reference(q[e], k[e, :n], v[e, :n], dtype=torch.bfloat16, **kw))


def _host_cache(length, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    cache = longctx.HostKVCache(1, HKV, D)
    k_dev = torch.empty(1, length, HKV, D, device=DEV, dtype=torch.bfloat16)
    v_dev = torch.empty_like(k_dev)
    for t0 in range(0, length, 65536):
        t1 = min(t0 + 65536, length)
        k = torch.randn(1, t1 - t0, HKV, D, device=DEV, generator=gen).bfloat16()
        v = torch.randn(1, t1 - t0, HKV, D, device=DEV, generator=gen).bfloat16()
        cache.append(k, v)
        k_dev[:, t0:t1], v_dev[:, t0:t1] = k, v
    return cache, k_dev, v_dev


def test_streamed_prefill_matches_in_gpu_attention_within_budget():
    length, nq = 300_000, 4096
    cache, k, v = _host_cache(length)
    q = torch.randn(1, nq, HQ, D, device=DEV, dtype=torch.bfloat16)
    budget = 512 << 20  # holds ~40% of the 1.2 GB of K and V
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stats = {}
    out = longctx.attention(q, cache, gpu_budget_bytes=budget, query_block=2048, stats=stats)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # beyond K and V: the output, one block's float32 accumulator and one call's output and lse
    workspace = out.numel() * 2 + 2048 * HQ * D * (4 + 2) + 2 * HQ * 2048 * 4
    assert stats["device_kv_bytes"] <= budget and stats["streamed_tokens"] > 0
    assert peak <= budget + workspace + (8 << 20), f"peak {peak / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB"
    ref_gpu = oa.attention(q, k, v, causal=True)
    rows = slice(nq - 16, nq)  # the last rows see every key
    ref64 = per_head_reference(q[0, rows], k[0], v[0])
    err_gpu = (ref_gpu[0, rows].double() - ref64).abs().max().item()
    err = (out[0, rows].double() - ref64).abs().max().item()
    assert err <= 2 * err_gpu + 1e-3, f"streamed {err:.3e} vs in-GPU {err_gpu:.3e}"
    assert (out.float() - ref_gpu.float()).abs().max().item() < 0.05  # every row, both bf16


def test_decode_budget_and_cooperation():
    length = 400_000
    cache, k, v = _host_cache(length, seed=1)
    q = torch.randn(1, 1, HQ, D, device=DEV, dtype=torch.bfloat16)
    ref64 = per_head_reference(q[0], k[0], v[0])
    ref_same = per_head_reference(q[0], k[0], v[0], dtype=torch.bfloat16)
    del k, v
    budget = 256 << 20
    bw = longctx.Bandwidths(host_gbps=20.0, link_gbps=40.0, device_gbps=2000.0)
    for coop in (False, True):
        cache.release_device()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        stats = {}
        out = longctx.attention(q, cache, gpu_budget_bytes=budget, cooperative=coop, bandwidths=bw, stats=stats)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= budget + (8 << 20), f"peak {peak / 2**20:.0f} MiB over the {budget >> 20} MiB budget"
        within_rule(out[0], ref64, ref_same)
        assert (stats["host_tokens"] > 0) == coop
    out_cpu = longctx.attention(q, cache, device="cpu")
    assert out_cpu.device == q.device
    within_rule(out_cpu[0], ref64, ref_same)


@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_quantized_storage_on_the_gpu(storage):
    """A quantized host cache: prefill and cooperative decode within the budget (the staging pieces
    fit the slack), equal to the same calls on an exact cache of the dequantized K/V."""
    gen = torch.Generator().manual_seed(7)
    length = 200_000
    k = torch.randn(1, length, HKV, D, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, length, HKV, D, generator=gen).to(torch.bfloat16)
    quant = longctx.HostKVCache(1, HKV, D, capacity=length, storage=storage)
    quant.append(k, v)
    exact = longctx.HostKVCache(1, HKV, D, capacity=length)
    exact.append(quant.k, quant.v)
    budget = 128 << 20
    bw = longctx.Bandwidths(host_gbps=20.0, link_gbps=40.0, device_gbps=2000.0)
    for nq, coop in ((1024, False), (1, True)):
        q = torch.randn(1, nq, HQ, D, device=DEV, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = longctx.attention(q, quant, gpu_budget_bytes=budget, cooperative=coop, bandwidths=bw)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        workspace = out.numel() * 2 + 2 * nq * HQ * D * 4  # the output and one float32 accumulator
        assert peak <= budget + workspace + (8 << 20), f"peak {peak / 2**20:.0f} MiB"
        want = longctx.attention(q, exact, gpu_budget_bytes=budget, cooperative=coop, bandwidths=bw)
        assert (out.float() - want.float()).abs().max().item() < 1e-2  # bf16 results of the same values
        quant.release_device()
        exact.release_device()

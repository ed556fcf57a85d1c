"""Long contexts with K and V in host memory (issue 9), one run on one GPU machine:

1. pinned host->device copy bandwidth (op "longctx-link");
2. one attention layer's causal prefill (bf16, 32 q / 8 kv heads, D=128) at 128K, 512K and 1M
   tokens with K and V on the host and a 2 GiB device KV budget, against the in-GPU kernel with
   everything on the device (op "longctx-prefill": ``tflops``, ``gbps`` = KV bytes / time,
   ``budget_bytes``, ``device_kv_bytes`` the peak of K and V on the device);
3. one decode step at 1M tokens: streaming only, CPU only and cooperative, with the cost model's
   prediction beside each measurement (op "longctx-decode", ``predicted_ms``).

    python3 -m omniattn.bench.longctx --json longctx.json      (~3-4 minutes on an H100 host)
"""

from __future__ import annotations

import argparse

import torch

from .measure import device_name, wall_seconds
from .report import write_json

HQ, HKV, D = 32, 8, 128
BUDGET = 2 << 30
PREFILL_CONTEXTS = (131072, 524288, 1048576)
DECODE_CONTEXT = 1048576


def _host_cache(length: int, dev):
    from ..longctx import HostKVCache

    gen = torch.Generator(device=dev).manual_seed(0)
    cache = HostKVCache(1, HKV, D, capacity=length)
    for t0 in range(0, length, 1 << 17):
        n = min(1 << 17, length - t0)
        cache.append(torch.randn(1, n, HKV, D, device=dev, generator=gen).bfloat16(),
                     torch.randn(1, n, HKV, D, device=dev, generator=gen).bfloat16())
    return cache


def _base(op, impl, n, **kw):
    return {"op": op, "impl": impl, "mode": "fwd", "dtype": "bf16", "batch": 1, "heads": HQ, "kv_heads": HKV,
            "head_dim": D, "causal": True, "context": n, **kw}


def link_rows(dev) -> list[dict]:
    from ..longctx.calibrate import LINK_BYTES, link_gbps

    gbps = link_gbps(dev)
    print(f"pinned host->device: {gbps:.1f} GB/s", flush=True)
    return [{"op": "longctx-link", "impl": "pinned-h2d", "bytes": LINK_BYTES, "gbps": round(gbps, 1)}]


def prefill_rows(dev, contexts=PREFILL_CONTEXTS) -> list[dict]:
    rows = []
    for n in contexts:
        rows += _prefill_context(dev, n)
        torch.cuda.empty_cache()
    return rows


def _prefill_context(dev, n: int) -> list[dict]:
    import omniattn as oa
    from ..longctx import attention

    rows = []
    cache = _host_cache(n, dev)
    q = torch.randn(1, n, HQ, D, device=dev, dtype=torch.bfloat16)
    flops = 4.0 * HQ * D * n * n / 2
    kv_bytes = n * cache.bytes_per_token
    reps = 3 if n <= 131072 else 1
    stats = {}
    attention(q[:, -4096:], cache, gpu_budget_bytes=BUDGET)  # compile and warm up

    def host_kv():  # K and V start on the host every time: the mirror is dropped first
        cache.release_device()
        return attention(q, cache, gpu_budget_bytes=BUDGET, stats=stats)

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    secs, out = wall_seconds(host_kv, reps)
    peak = torch.cuda.max_memory_allocated() - base
    row = _base("longctx-prefill", "omniattn-hostkv", n, seqlen=n, ms=round(secs * 1e3, 2),
                tflops=round(flops / secs / 1e12, 1), gbps=round(kv_bytes / secs / 1e9, 2), budget_bytes=BUDGET,
                device_kv_bytes=stats.get("device_kv_bytes"), streamed_tokens=stats.get("streamed_tokens"),
                peak_mb=round(peak / 2**20, 1))
    rows.append(row)
    print(row, flush=True)
    cache.release_device()
    try:  # the same layer with K and V on the device (where it fits)
        k, v = cache.k.to(dev), cache.v.to(dev)
        secs, ref = wall_seconds(lambda: oa.attention(q, k, v, causal=True), reps)
        err = (out[0, -256:].float() - ref[0, -256:].float()).abs().max().item()
        row["max_err_vs_gpu"] = float(f"{err:.3g}")
        gpu = _base("longctx-prefill", "omniattn-gpu", n, seqlen=n, ms=round(secs * 1e3, 2),
                    tflops=round(flops / secs / 1e12, 1), gbps=round(kv_bytes / secs / 1e9, 2))
        rows.append(gpu)
        row["vs_gpu"] = round(row["tflops"] / gpu["tflops"], 3)
        print(gpu, f"host-KV / in-GPU = {row['vs_gpu']}", flush=True)
    except torch.cuda.OutOfMemoryError as e:
        rows.append(_base("longctx-prefill", "omniattn-gpu", n, seqlen=n, error=f"OutOfMemoryError: {str(e)[:100]}"))
    return rows


def decode_rows(dev, n=DECODE_CONTEXT, steps: int = 5, warmup: int = 4, scores=("softmax",)) -> list[dict]:
    cache = _host_cache(n, dev)
    rows = []
    for score in scores:
        rows += _decode_score(dev, cache, n, score, steps, warmup)
        cache.release_device()
    return rows


def _decode_score(dev, cache, n, score, steps, warmup) -> list[dict]:
    from ..longctx import attention, calibrate

    q = torch.randn(1, 1, HQ, D, device=dev, dtype=torch.bfloat16)
    bw = calibrate(q, cache, dev, score=score, max_device_bytes=BUDGET // 2)
    print(f"{score} bandwidths: {bw}", flush=True)
    rows = []
    # streaming and CPU only get the calibration's figures for their predictions; the cooperative
    # step uses the library's own, which learn the host rate from each step (calibrate.observe_host):
    # like a decode loop, it takes `warmup` steps before the timed ones
    modes = (("stream", dict(cooperative=False, bandwidths=bw), 1), ("cpu", dict(device="cpu", bandwidths=bw), 1),
             ("cooperative", dict(cooperative=True), warmup))
    for impl, kw, first in modes:
        stats = {}
        fn = lambda: attention(q, cache, score=score, gpu_budget_bytes=BUDGET, stats=stats, **kw)  # noqa: E731
        for _ in range(first):  # the first loads the device mirror (kept between steps, as in a decode loop)
            fn()
        secs, _ = wall_seconds(fn, steps)
        used = stats["bandwidths"]
        row = _base("longctx-decode", impl, n, seqlen=1, score=score, ms=round(secs * 1e3, 2),
                    gbps=round(n * cache.bytes_per_token / secs / 1e9, 2), budget_bytes=BUDGET,
                    predicted_ms=None if stats.get("predicted_ms") is None else round(stats["predicted_ms"], 2),
                    resident_tokens=stats.get("resident_tokens"), streamed_tokens=stats.get("streamed_tokens"),
                    host_tokens=stats.get("host_tokens"), host_gbps=round(used.host_gbps, 2),
                    calibrated_host_gbps=round(bw.host_gbps, 2),
                    link_gbps=round(used.link_gbps, 2), device_gbps=round(used.device_gbps, 1))
        rows.append(row)
        print(row, flush=True)
    coop = rows[-1]
    coop["model_ratio"] = round(coop["ms"] / coop["predicted_ms"], 3) if coop["predicted_ms"] else None
    coop["faster_than_both"] = coop["ms"] < min(rows[0]["ms"], rows[1]["ms"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write DESIGN.md's results format here")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--contexts", help="comma-separated prefill context lengths (default: 128K, 512K, 1M)")
    parser.add_argument("--decode-scores", default="softmax", help="comma-separated scores of the decode rows")
    args = parser.parse_args(argv)
    dev = torch.device("cuda")
    rows = link_rows(dev)
    if not args.skip_prefill:
        contexts = tuple(int(c) for c in args.contexts.split(",")) if args.contexts else PREFILL_CONTEXTS
        rows += prefill_rows(dev, contexts)
        if args.json:
            write_json(args.json, device_name(dev), rows)
    if not args.skip_decode:
        rows += decode_rows(dev, scores=tuple(args.decode_scores.split(",")))
    if args.json:
        write_json(args.json, device_name(dev), rows)


if __name__ == "__main__":
    main()

"""Measure once, cache per problem class: host attention GB/s, host->device link GB/s, device attention GB/s.

Each figure is KV bytes per second of the code that will run: the host figure times the host part
of a cooperative step (``chunks.attend`` on the tiled PyTorch backend, over host memory), the
device figure the decode kernel on device memory, the link figure a pinned host->device copy. A few tens of milliseconds, once per (device, shape,
dtype, score) in a process; ``set_bandwidths`` or ``attention(..., bandwidths=...)`` override them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

import torch

from .. import decode
from ..backends import torch_threads
from .chunks import attend, chunk_spec
from .plan import Bandwidths

HOST_TOKENS = 65536  # 256 MiB of K and V at 8 kv heads x 128 in bf16: out of the host's caches, like a long context
DEVICE_TOKENS = 65536
LINK_BYTES = 64 << 20
OBSERVED_WEIGHT = 0.5  # of a cooperative step's observed host rate against the figure so far

_measured: dict = {}
_observed: set = set()  # problem classes whose host rate a cooperative step has folded in
_override: Optional[Bandwidths] = None


def set_bandwidths(bandwidths: Optional[Bandwidths]) -> None:
    """Use these figures for every later call (``None`` goes back to measuring)."""
    global _override
    if bandwidths is not None and not isinstance(bandwidths, Bandwidths):
        raise TypeError(f"bandwidths: expected omniattn.longctx.Bandwidths or None, got {type(bandwidths).__name__}")
    _override = bandwidths


def _median_s(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def host_threads(beside_device: bool) -> int:
    """Workers for the host part: all of the caller's threads, or, while a device part runs beside
    it, two fewer. The thread driving the device (copies and launches, Python holding the GIL)
    must not wait behind a busy core or a worker's turn at the GIL: with every core busy, a 1M
    cooperative decode measured 59 ms against 45 ms streaming alone (benchmarks/NOTES.md)."""
    n = torch.get_num_threads()
    return max(1, n - 2) if beside_device else n


def _kv_bytes(k, v) -> int:
    return k.numel() * k.element_size() + v.numel() * v.element_size()


def _host_gbps(q, k, v, score: str, threads: int) -> float:
    """The host part of a decode step as ``schedule._host_part`` runs it (causal, bottom-right,
    on ``threads`` workers)."""
    n = k.shape[1]
    spec = chunk_spec(score, q.shape[-1] ** -0.5, True, -10.0, float(n))
    with torch_threads.thread_budget(threads):
        secs = _median_s(lambda: attend(spec, q, k, v, n, 0, backend="torch"), 3, lambda: None)
    return _kv_bytes(k, v) / secs / 1e9


def _device_gbps(q, k, v, score: str, device_sync) -> float:
    """The split-KV decode kernel over device memory."""
    spec = chunk_spec(score, q.shape[-1] ** -0.5, False, -10.0, float(k.shape[1]))
    lens = torch.full((k.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)
    call = decode.KVCacheCall(q, k, v, lens, (k.shape[1],) * k.shape[0])
    secs = _median_s(lambda: decode.run(spec, call, "auto", out_dtype=torch.float32), 3, device_sync)
    return _kv_bytes(k, v) / secs / 1e9


def link_gbps(device: torch.device) -> float:
    key = ("link", str(device))
    if key not in _measured:
        src = torch.empty(LINK_BYTES, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(LINK_BYTES, dtype=torch.uint8, device=device)
        secs = _median_s(lambda: dst.copy_(src, non_blocking=True), 5, lambda: torch.cuda.synchronize(device))
        _measured[key] = LINK_BYTES / secs / 1e9
    return _measured[key]


def _key(q, cache, device, score: str) -> tuple:
    b, nq, hq, d = q.shape
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device, one key
        device = torch.device("cuda", torch.cuda.current_device())
    return (str(device), cache.dtype, b, nq, hq, cache.num_kv_heads, d, cache.v_dim, score)


def observe_host(q: torch.Tensor, cache, device: torch.device, score: str, gbps: float) -> None:
    """Fold the host rate a cooperative step just saw into its problem class's figures, so the
    next step's split follows what the host really delivers: beside a device pulling KV over the
    link and at the size the split gives it (the calibration's smaller, quiet measurement read
    11 GB/s where a 1M-token step's host part read ~30 on the H100 host: benchmarks/NOTES.md).
    A no-op for figures that were not measured (``set_bandwidths`` / ``bandwidths=``)."""
    key = _key(q, cache, device, score)
    bw = _measured.get(key)
    if bw is not None and _override is None and gbps > 0:
        _measured[key] = replace(bw, host_gbps=(1 - OBSERVED_WEIGHT) * bw.host_gbps + OBSERVED_WEIGHT * gbps)
        _observed.add(key)


def host_rate_observed(q: torch.Tensor, cache, device: torch.device, score: str) -> bool:
    """Whether the figures ``calibrate`` gives have a host rate seen in a real step (or are overridden)."""
    return _override is not None or _key(q, cache, device, score) in _observed


def calibrate(q: torch.Tensor, cache, device: torch.device, score: str = "softmax", force: bool = False,
              max_device_bytes: int = 512 << 20) -> Bandwidths:
    """Bandwidths for attention of q's shape over ``cache``'s layout, with the device ``device``.
    The device measurement allocates at most ``max_device_bytes`` of K and V (the call passes
    half its budget), freed before the call's own buffers."""
    if _override is not None and not force:
        return _override
    b, nq, hq, d = q.shape
    key = _key(q, cache, device, score)
    if key in _measured and not force:
        return _measured[key]
    _observed.discard(key)
    gen = torch.Generator().manual_seed(0)

    def rand(shape, dev):
        return torch.randn(shape, generator=gen).to(dtype=cache.dtype, device=dev)

    def host_keys(dim):  # a random block repeated: the bytes matter here, not their values
        block = rand((b, max(256, 4096 // b), cache.num_kv_heads, dim), "cpu")
        return block.repeat(1, max(1, HOST_TOKENS // (b * block.shape[1])), 1, 1)

    qh = rand((b, nq, hq, d), "cpu")
    host = _host_gbps(qh, host_keys(d), host_keys(cache.v_dim), score, host_threads(device.type == "cuda"))
    if device.type == "cuda":
        n = max(64, min(DEVICE_TOKENS // b, max_device_bytes // cache.bytes_per_token))
        qd = qh.to(device)
        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        dev = _device_gbps(qd, rand((b, n, cache.num_kv_heads, d), device),
                              rand((b, n, cache.num_kv_heads, cache.v_dim), device), score, sync)
        link = link_gbps(device)
    else:  # a CPU "device" (tests, CPU-only users): both sides run on the host
        dev, link = host, float("inf")
    _measured[key] = bw = Bandwidths(host, link, dev)
    return bw

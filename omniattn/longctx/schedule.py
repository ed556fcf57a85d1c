"""Attention over a host-resident KV cache: streamed to the device within a memory budget, with the
CPU attending over part of the context at the same time when decoding. Inference only (no autograd).

Prefill (many query rows): query blocks of ``query_block`` rows, each attending over the keys it
may see: the device mirror of the cache's prefix in ONE call (the resident part), then the chunks
past the mirror, streamed through two buffers (copy i+1 overlapping compute i), merged exactly into
a float32 accumulator per block. Decoding (Nq <= 16): the device part (mirror + streamed chunks) and,
cooperatively, a host part computed by a background thread over host memory, merged by lse.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Optional, Union

import torch

from .. import decode, spec as _spec
from ..backends import torch_threads
from .cache import HostKVCache
from .calibrate import calibrate, host_rate_observed, host_threads, observe_host
from .chunks import Accumulator, attend, chunk_spec
from .plan import (Bandwidths, Split, cooperation_pays, cooperative_split, device_only_split, host_only_split,
                   make_plan)
from .device import DeviceKV

STAGE_ON_CPU = False  # tests: route a CPU "device" through the same buffers and copies as a GPU
DEFAULT_BUDGET_FRACTION = 0.5  # of the device's free memory, when gpu_budget_bytes is None


def _validate(q, cache, score, causal, scale, sigmoid_bias, silu_norm, cooperative, device):
    if not isinstance(cache, HostKVCache):
        raise TypeError(f"cache: expected an omniattn.longctx.HostKVCache, got {type(cache).__name__}")
    _spec._require_tensor("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
    b, nq, hq, d = q.shape
    if b != cache.batch:
        raise ValueError(f"q: expected batch {cache.batch} (the cache's), got {b}")
    if d != cache.head_dim:
        raise ValueError(f"q: expected head dim {cache.head_dim} (the cache's), got {d}")
    if hq % cache.num_kv_heads:
        raise ValueError(f"q: the number of query heads ({hq}) must be a multiple of the cache's kv heads "
                         f"({cache.num_kv_heads})")
    if q.dtype != cache.dtype:
        raise TypeError(f"q: expected dtype {cache.dtype} (the cache's), got {q.dtype}")
    if torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("longctx.attention is inference only (no gradients): call it under torch.no_grad()")
    if cooperative not in ("auto", True, False):
        raise ValueError(f"cooperative: expected 'auto', True or False, got {cooperative!r}")
    if nq > len(cache):
        raise ValueError(f"q: {nq} query rows but the cache holds {len(cache)} tokens; the queries are the last "
                         "Nq positions of the context (append their keys first)")
    dev = torch.device(device) if device is not None else q.device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {dev} requested but CUDA is not available")
    spec = _spec._check_common(score=score, scale=scale, head_dim=d, causal=causal, window=(-1, -1),
                               sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=0.0, precision="exact",
                               backend="auto", return_lse=False)
    return spec, dev


def _default_budget(device: torch.device, cache) -> int:
    if device.type != "cuda":
        return max(len(cache), 1) * cache.bytes_per_token  # host memory: no limit beyond the cache itself
    free, _ = torch.cuda.mem_get_info(device)
    return max(int(free * DEFAULT_BUDGET_FRACTION), 2 * 16 * cache.bytes_per_token)


def attention(
    q: torch.Tensor,
    cache: HostKVCache,
    *,
    score: str = "softmax",
    causal: bool = True,
    scale: Optional[float] = None,
    sigmoid_bias: Optional[float] = None,
    silu_norm: Optional[float] = None,
    gpu_budget_bytes: Optional[int] = None,
    chunk_tokens: Optional[int] = None,
    cooperative: Union[str, bool] = "auto",
    device=None,
    bandwidths: Optional[Bandwidths] = None,
    query_block: Optional[int] = None,
    stats: Optional[dict] = None,
) -> torch.Tensor:
    """Attention of the last Nq positions of a context whose K and V live in host memory.

    Args:
        q: (B, Nq, Hq, D), the queries of the context's last Nq positions (bottom-right aligned:
            row i sits at position len(cache) - Nq + i), in the cache's dtype, on the GPU or the CPU.
        cache: a :class:`HostKVCache` holding the whole context (the queries' own keys included).
        score: ``"softmax"``, ``"sigmoid"`` (bias default -ln(len(cache))), ``"silu"`` (norm default
            len(cache)): the defaults use the whole context, however it is split.
        causal: key j visible from row i iff j <= len(cache) - Nq + i.
        gpu_budget_bytes: K and V bytes the device may hold (a mirror of the cache's prefix, kept
            on the cache between calls, plus two streaming buffers when the cache does not fit);
            default half the device's free memory. Smaller than two chunks -> ValueError.
        chunk_tokens: tokens per streamed chunk (default budget / 16 bytes' worth, at most 32768).
        cooperative: decoding only (Nq <= 16): the CPU attends over the newest part of the context
            while the device does the rest, split by measured bandwidths so both finish together.
            ``"auto"``: when decoding on a GPU, the cache does not fit the device mirror and the
            model predicts the split at most ``plan.AUTO_MAX_SHARE`` of streaming's time by a host rate
            seen in a cooperative step (the first such step of a problem class splits, to see it).
        device: where the device part runs (default q's device); ``"cpu"`` computes on the host.
        bandwidths: override the measured :class:`Bandwidths` (see calibrate.py).
        query_block: query rows per block in prefill (default 32768); memory: q and the output
            stay where q is; a block's float32 accumulator (B, block, Hq, Dv) lives on the device.
        stats: a dict to fill with the split (tokens resident / streamed / on the host), the
            bandwidths and the model's predicted milliseconds (decoding).

    Returns:
        (B, Nq, Hq, Dv) in q's dtype, on q's device. Inference only: no autograd.
    """
    spec, dev = _validate(q, cache, score, causal, scale, sigmoid_bias, silu_norm, cooperative, device)
    b, nq, hq, _ = q.shape
    length = len(cache)
    cspec = chunk_spec(spec.score, spec.scale, causal,
                       spec.sigmoid_bias if spec.sigmoid_bias is not None else -math.log(max(length, 1)),
                       spec.silu_norm if spec.silu_norm is not None else float(max(length, 1)))
    bpt = cache.bytes_per_token
    plan = make_plan(bpt, length, gpu_budget_bytes, chunk_tokens, query_block, _default_budget(dev, cache))
    decoding = nq <= decode.DECODE_MAX_NQ
    if cooperative is True and not decoding:
        raise ValueError(f"cooperative=True: CPU-GPU cooperation is for decoding (Nq <= {decode.DECODE_MAX_NQ}); "
                         f"got Nq={nq}. Use cooperative='auto' or False for prefill")
    with torch.no_grad():
        if not decoding:
            return _prefill(q, cache, cspec, dev, plan, stats)
        return _decode(q, cache, cspec, dev, plan, cooperative, bandwidths, stats)


# ------------------------------------------------------------------------------------------ prefill


def _prefill(q, cache, cspec, dev, plan, stats) -> torch.Tensor:
    b, nq, hq, _ = q.shape
    length = len(cache)
    out = torch.empty(b, nq, hq, cache.v_dim, dtype=q.dtype, device=q.device)
    kv = DeviceKV(cache, dev, plan.resident_cap, plan.chunk, length, STAGE_ON_CPU)
    # the work, in order: per query block, its resident call then its streamed chunks
    items = []
    for r0 in range(0, nq, plan.query_block):
        r1 = min(r0 + plan.query_block, nq)
        q_end = length - nq + r1  # one past the block's last position
        end = q_end if cspec.causal else length
        items.append((r0, r1, "resident", 0, min(end, kv.resident)))
        for t0 in range(kv.resident, end, plan.chunk):
            items.append((r0, r1, "stream", t0, min(t0 + plan.chunk, end)))
    items = [it for it in items if it[4] > it[3]]
    handles = {}

    def issue(i):
        if i < len(items) and items[i][2] == "stream" and i not in handles:
            handles[i] = kv.issue(items[i][3], items[i][4])

    acc = q_blk = None
    streamed = 0
    for i, (r0, r1, kind, t0, t1) in enumerate(items):
        issue(i)
        issue(i + 1)  # the next chunk's copy overlaps this chunk's compute
        if acc is None or acc[0] != r0:
            acc = None  # free the previous block's accumulator before allocating this one
            q_blk = q[:, r0:r1].to(dev, non_blocking=True)
            single = i + 1 == len(items) or items[i + 1][0] != r0
            acc = (r0, None if single else Accumulator((b, r1 - r0, hq, cache.v_dim), cspec.score == "softmax", dev))
        if kind == "resident":
            k, v = kv.resident_kv(t1)
        else:
            k, v = kv.wait(handles[i])
            streamed += t1 - t0
        parts = attend(cspec, q_blk, k, v, length - nq + r1, t0)
        if kind == "stream":
            kv.release(handles.pop(i))
        if acc[1] is None:  # the block's only call: its output is the result
            for rows, o, _ in parts:
                out[:, r0 + rows.start : r0 + rows.stop].copy_(o, non_blocking=True)
        else:
            for rows, o, lse in parts:
                acc[1].add(rows, o, lse)
            if i + 1 == len(items) or items[i + 1][0] != r0:
                out[:, r0:r1].copy_(acc[1].out, non_blocking=True)
        parts = o = lse = None  # (the loop's names too) else this call's output outlives the next call's allocation
    kv.finish()
    if stats is not None:
        stats.update(resident_tokens=kv.resident, streamed_tokens=streamed, host_tokens=0,
                     device_kv_bytes=kv.device_kv_bytes, budget_bytes=plan.budget, chunk_tokens=plan.chunk)
    if q.device.type == "cpu" and dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()  # out was filled by asynchronous copies
    return out


# ------------------------------------------------------------------------------------------ decode


def _device_part(q, cache, cspec, dev, plan, split: Split, acc: Accumulator) -> None:
    """Keys [0, split.device_end): the mirrored prefix in one call, then streamed chunks."""
    length = len(cache)
    kv = DeviceKV(cache, dev, plan.resident_cap, plan.chunk, split.device_end, STAGE_ON_CPU)
    if kv.resident > 0:
        k, v = kv.resident_kv(kv.resident)
        for rows, o, lse in attend(cspec, q, k, v, length, 0):
            acc.add(rows, o, lse)
    chunks = list(range(kv.resident, split.device_end, plan.chunk))
    handles = {}
    for i, t0 in enumerate(chunks):
        for j in (i, i + 1):  # the next chunk's copy overlaps this chunk's compute
            if j < len(chunks) and j not in handles:
                handles[j] = kv.issue(chunks[j], min(chunks[j] + plan.chunk, split.device_end))
        k, v = kv.wait(handles[i])
        parts = attend(cspec, q, k, v, length, t0)
        kv.release(handles.pop(i))
        for rows, o, lse in parts:
            acc.add(rows, o, lse)
        parts = o = lse = None  # (the loop's names too) freed before the next chunk's call allocates its own
    kv.finish()


def _host_part(q_host, cache, cspec, start: int, result: list, threads: int) -> None:
    """Keys [start, len) on the CPU (a background thread: torch ops release the GIL); appends
    the partial results and the seconds they took."""
    try:
        t0 = time.perf_counter()
        k, v = cache.dequantized(start, len(cache))  # views of host memory for exact storage
        with torch_threads.thread_budget(threads):
            result.append(attend(cspec, q_host, k, v, len(cache), start, backend="torch"))
        result.append(time.perf_counter() - t0)
    except BaseException as e:  # re-raised by the caller's thread
        result[:] = [e]


def _auto_split(split: Split, length: int, resident: int, bpt: int, bw: Bandwidths, known: bool):
    """cooperative="auto": (cooperate?, split). A cooperative split stays only where it pays
    (plan.cooperation_pays) by a host rate that is known: given figures, or one a cooperative
    step has observed. Until then the split is tried, once, to observe it: the calibration's short
    quiet measurement can read half of what a long host part reaches (NOTES.md)."""
    if known and not cooperation_pays(split, bpt, bw):
        return False, device_only_split(length, resident, bpt, bw)
    return True, split


def _decode(q, cache, cspec, dev, plan, cooperative, bandwidths, stats) -> torch.Tensor:
    b, nq, hq, _ = q.shape
    length = len(cache)
    bpt = plan.bytes_per_token
    resident = min(plan.resident_cap, length)
    on_device = dev.type == "cuda" or STAGE_ON_CPU
    coop = cooperative is True or (cooperative == "auto" and dev.type == "cuda" and resident < length)
    bw = bandwidths
    if coop and bw is None:
        held = cache._mirror.nbytes if cache._mirror is not None else 0  # calibration stays within the budget too
        bw = calibrate(q, cache, dev, cspec.score, max_device_bytes=max(plan.budget - held, 0) // 2)
    if not on_device:
        split = host_only_split(length, bpt, bw)
    elif coop:
        split = cooperative_split(length, resident, bpt, bw)
        if cooperative == "auto":
            known = bandwidths is not None or host_rate_observed(q, cache, dev, cspec.score)
            coop, split = _auto_split(split, length, resident, bpt, bw, known)
    else:
        split = device_only_split(length, resident, bpt, bw)
    acc = Accumulator((b, nq, hq, cache.v_dim), cspec.score == "softmax", dev if on_device else "cpu")
    host_result: list = []
    worker = None
    if split.host > 0:
        q_host = q.to("cpu")
        if on_device:
            worker = threading.Thread(target=_host_part, args=(q_host, cache, cspec, split.device_end, host_result,
                                                               host_threads(True)),
                                      daemon=True)
            worker.start()
        else:
            _host_part(q_host, cache, cspec, split.device_end, host_result, host_threads(False))
    if split.device_end > 0:
        qd = q.to(dev, non_blocking=True)
        _device_part(qd, cache, cspec, dev, plan, split, acc)
    if worker is not None:
        worker.join()
    if host_result:
        if isinstance(host_result[0], BaseException):
            raise host_result[0]
        parts, secs = host_result
        for rows, o, lse in parts:
            acc.add(rows, o, lse)
        if worker is not None and bandwidths is None:  # measured figures: learn from this step
            observe_host(q, cache, dev, cspec.score, split.host * bpt / secs / 1e9)
    if stats is not None:
        stats.update(resident_tokens=split.resident if on_device else 0, streamed_tokens=split.streamed if on_device else 0,
                     host_tokens=split.host, predicted_ms=split.predicted_ms, bandwidths=bw,
                     budget_bytes=plan.budget, chunk_tokens=plan.chunk, cooperative=coop and on_device)
    return acc.out.to(device=q.device, dtype=q.dtype)

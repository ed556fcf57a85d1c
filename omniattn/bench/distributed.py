"""Multi-GPU benchmark: context-parallel attention (ring, all-gather) and tiling-AllReduce.

Run on a machine with P GPUs (one process per GPU is spawned here, or use torchrun)::

    python3 -m omniattn.bench.distributed --json benchmarks/results/h100x2.json
    torchrun --nproc-per-node 2 -m omniattn.bench.distributed --json benchmarks/results/h100x2.json
    python3 -m omniattn.bench.distributed --cpu --world-size 2        # gloo, tiny sizes (a smoke run)

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set here (if unset) before any process starts, so spawned ranks inherit them.

Context parallel rows (op "cp-softmax" | "cp-sigmoid" | "cp-silu" | "cp-hstu"): one layer's
attention, B=1, causal, over a sequence of N tokens split over P GPUs (zigzag), forward and
forward+backward, per strategy. Each comes with the same per-GPU work on ONE GPU:

    F(N)   = attention FLOPs of the whole problem (DESIGN.md: 4·H·D·N²/2 causal, x3.5 fwd+bwd)
    N1     = N / sqrt(P), rounded: one GPU attending over N1 tokens does F(N1) ≈ F(N) / P, the
             share of work each of the P GPUs does
    T1     = time of the single-GPU kernel at N1;  TP = time of the P-GPU run at N
    efficiency = (F(N) / (P · TP)) / (F(N1) / T1)     per-GPU throughput at P GPUs / on 1 GPU

For linear work (F ∝ N) this is the issue's T1·N2 / (P·T2·N1); attention is quadratic, so the
FLOP count normalises it (and the single GPU is measured at the work, not the length, of a share:
kernel speed depends on length, and a whole 1M-token problem on one GPU would take minutes).
Single-GPU baselines run up to ``baseline_max_seqlen`` tokens (a 1M/sqrt(2) baseline would cost a
minute of the budget, and its 3e9-element q passes the kernels' int32 row offsets); longer runs
are compared with the throughput of the longest baseline of the same score and mode, whose length
the row gives as ``baseline_seqlen``.
``cp-hstu`` is ``context_parallel_hstu_attention`` on one jagged sequence without targets, which
runs as SiLU context parallelism (ring or all-gather, as the row's strategy says).

Against fewer GPUs (``--compare-to`` an earlier run's JSON, e.g. the same command at
``--world-size 2`` on the same machine): each context-parallel row that has a row of the same
problem and strategy there gains ``efficiency_vs_<P'>gpu`` = its per-GPU throughput / that row's
(strong scaling: the same N, so each of the P GPUs does P'/P of a P'-GPU rank's work).

Tiling-AllReduce rows (op "tp-allreduce"): ParallelAttention at TP = P, forward; ``ms`` with the
overlap (median, ``ms_min``/``ms_max`` beside), ``ms_plain`` the plain layer (overlap=False),
``ms_tiled_sync`` the same tiles with each all-reduce waited at once, ``ms_allreduce`` the
all-reduce of the whole output alone, all timed interleaved rep by rep (``tp_reps`` each: the
layer's own time drifts by as much as the all-reduce between runs);
``hidden_fraction = (ms_plain - ms) / ms_allreduce`` (the issue's definition) and
``hidden_fraction_tiled = (ms_tiled_sync - ms) / ms_allreduce`` (the overlap alone, same tiles).

Everything must fit one call of a few minutes: measurements are ordered by priority and a time
budget (``--budget-s``) skips what would not fit (such rows say so in ``error``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Config:
    dtype: str = "bf16"
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    hstu_heads: int = 32  # HSTU's layout has as many key/value heads as query heads
    # (seqlen, op, mode, strategies) in priority order; the budget cuts from the end
    cp_plan: tuple = ()
    tp_shapes: tuple = ((1, 32768), (4, 8192))  # (batch, seqlen) at dim = heads * head_dim
    tp_tiles: tuple = (2, 4)
    tp_reps: int = 15  # interleaved reps of every tiling-AllReduce variant
    budget_s: float = 270.0  # measurements (compiles included); process start-up comes on top
    target_s: float = 1.0  # timed reps per measurement: about this long, at least 1, at most max_reps
    max_reps: int = 5
    check_rows: int = 64  # output rows checked against a float32 reference (the last ones: they see every key)
    check_max_seqlen: int = 262144
    # single-GPU baselines run up to this share length; longer runs are compared with the
    # throughput of the longest baseline of the same score and mode (the row says which)
    baseline_max_seqlen: int = 200000
    warmup_seqlen: int = 8192  # every kernel variant is compiled at this length before any timing
    # a measurement predicted to take at most this long gets one untimed call at its own length first:
    # the first call at a new length paid ~0.8 s more in a 3.7 s 256K HSTU run (allocations after
    # empty_cache, host tables); the 1M runs (about a minute each) go without
    warm_max_s: float = 10.0
    backend: str = "auto"
    length_quantum: int = 256  # single-GPU baseline lengths are multiples of this
    assumed_tflops: float = 250.0  # per GPU, to predict the first measurements' time


def _plan(seqlens_ops) -> tuple:
    return tuple((n, op, mode, strategies) for n, ops, modes, strategies in seqlens_ops
                 for op in ops for mode in modes)


def default_config() -> Config:
    """2 GPUs, about five minutes: the issue's targets first (256K fwd+bwd for every score, the
    1M-token fwd+bwd), then 128K, then the rest while the budget lasts."""
    k128, k256, m1 = 131072, 262144, 1048576
    both = ("ring", "allgather")
    plan = _plan([
        (k256, ("softmax", "sigmoid", "hstu"), ("fwdbwd", "fwd"), both),
        (k128, ("softmax", "sigmoid", "hstu"), ("fwdbwd", "fwd"), both),
        (m1, ("softmax",), ("fwdbwd", "fwd"), ("ring",)),
        (k256, ("silu",), ("fwdbwd", "fwd"), both),
        (k128, ("silu",), ("fwdbwd", "fwd"), both),
        (m1, ("sigmoid",), ("fwdbwd", "fwd"), ("ring",)),
        (m1, ("softmax",), ("fwd", "fwdbwd"), ("allgather",)),
    ])
    return Config(cp_plan=plan)


def smoke_config() -> Config:
    """Seconds on CPUs with gloo (the tests run it)."""
    plan = _plan([(64, ("softmax", "sigmoid", "silu", "hstu"), ("fwd", "fwdbwd"), ("ring", "allgather")),
                  (128, ("softmax",), ("fwd",), ("ring",))])
    return Config(dtype="fp32", heads=4, kv_heads=2, head_dim=16, hstu_heads=2, cp_plan=plan, tp_shapes=((1, 48),),
                  tp_tiles=(3,), tp_reps=1, budget_s=1e9, target_s=0.0, max_reps=1, check_rows=8, backend="torch",
                  length_quantum=8, baseline_max_seqlen=64, warmup_seqlen=16)


# ------------------------------------------------------------------------------------------------
# timing


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Times a callable the same way on every rank: aligned starts, median of reps, slowest rank."""

    def __init__(self, pg, device):
        self.pg, self.device = pg, device
        self._flag = torch.zeros(1, device=device)

    def align(self) -> None:
        dist.all_reduce(self._flag, group=self.pg)  # a barrier on the compute device
        _sync(self.device)

    def agree_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
        return float(t.item())

    def time_ms(self, fn: Callable, warmup: int, reps: int, out_of_memory_ok: bool = False) -> Optional[float]:
        """Median ms of ``reps`` calls (after ``warmup``), the slowest rank's. ``out_of_memory_ok``:
        None where a rank's GPU ran out of memory; after every call (outside the timing) the ranks
        agree whether any of them failed, so all take the same branch at the same point. A rank
        failing between two collectives inside ``fn`` while the others go on cannot be caught from
        here (they wait in that collective until the group's timeout)."""
        def failed(call) -> bool:
            if not out_of_memory_ok:
                call()
                return False
            try:
                call()
                bad = 0.0
            except torch.OutOfMemoryError:
                bad = 1.0
                _free(self.device)
            return self.agree_max(bad) > 0

        for _ in range(warmup):
            if failed(fn):
                return None
        _sync(self.device)
        times = []
        for _ in range(reps):
            self.align()
            t0 = time.perf_counter()
            elapsed = []
            if failed(lambda: (fn(), _sync(self.device), elapsed.append(time.perf_counter() - t0))):
                return None
            times.append(elapsed[0] * 1e3)
        return self.agree_max(statistics.median(times))


class Budget:
    """Decides on rank 0's clock (broadcast, so every rank runs or skips the same measurements)."""

    def __init__(self, seconds: float, clock: Clock):
        self.deadline = time.perf_counter() + seconds
        self.clock = clock

    def allows(self, predicted_s: float) -> bool:
        ok = 1.0 if time.perf_counter() + 1.2 * predicted_s < self.deadline else 0.0
        return self.clock.agree_max(-ok) == -1.0  # every rank must allow it (the min of the flags)


def flops(n: int, heads: int, head_dim: int, mode: str, causal: bool = True, batch: int = 1) -> float:
    f = 4.0 * batch * heads * head_dim * n * n / (2 if causal else 1)
    return f * (3.5 if mode == "fwdbwd" else 1.0)


# ------------------------------------------------------------------------------------------------
# problems


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


@dataclass
class Problem:
    """One rank's inputs and the callable that runs the attention on them."""

    leaves: list
    run: Callable
    out_rows_global: Optional[torch.Tensor] = None


def _cp_problem(op: str, n_total: int, strategy: str, g, cfg: Config, device, gen, cp_world: bool) -> Problem:
    """Inputs of this rank's zigzag shard (cp_world) or of the whole sequence on one GPU."""
    from .. import distributed as cp
    from ..api import attention, hstu_attention

    dt = DTYPES[cfg.dtype]
    world = dist.get_world_size(g) if cp_world else 1
    n_local = n_total // world
    if op == "hstu":
        h = cfg.hstu_heads
        q, k, v = (_rand((n_local, h, cfg.head_dim), dt, device, gen).requires_grad_() for _ in range(3))
        offsets = torch.tensor([0, n_total], dtype=torch.int32, device=device)
        if cp_world:
            def run():
                return cp.context_parallel_hstu_attention(q, k, v, offsets, n_total, group=g, strategy=strategy,
                                                          backend=cfg.backend)
        else:
            def run():
                return hstu_attention(q, k, v, offsets, n_total, backend=cfg.backend)
        return Problem([q, k, v], run)
    hq, hkv = cfg.heads, cfg.kv_heads
    q = _rand((1, n_local, hq, cfg.head_dim), dt, device, gen).requires_grad_()
    k = _rand((1, n_local, hkv, cfg.head_dim), dt, device, gen).requires_grad_()
    v = _rand((1, n_local, hkv, cfg.head_dim), dt, device, gen).requires_grad_()
    if cp_world:
        def run():
            return cp.context_parallel_attention(q, k, v, group=g, score=op, causal=True, strategy=strategy,
                                                 backend=cfg.backend)
    else:
        def run():
            return attention(q, k, v, score=op, causal=True, backend=cfg.backend)
    return Problem([q, k, v], run)


def _step(p: Problem, mode: str, dout: Optional[torch.Tensor]):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                p.run()
        return fwd

    def fwdbwd():
        for t in p.leaves:
            t.grad = None
        p.run().backward(dout)
    return fwdbwd


def _last_rows_error(p: Problem, op: str, n_total: int, g, cfg: Config, device) -> Optional[float]:
    """Max error of the sequence's last ``check_rows`` output rows (held by rank 0: zigzag chunk
    2P-1) against a float32 recomputation from the gathered keys; every rank must call it."""
    from .. import distributed as cp

    if n_total > cfg.check_max_seqlen or op == "hstu":
        return None
    q, k, v = p.leaves
    with torch.no_grad():
        out = p.run()
        kf, vf = cp.unshard(k.detach(), g), cp.unshard(v.detach(), g)
        if dist.get_rank(g) != 0:
            return None
        m = min(cfg.check_rows, n_total // (2 * dist.get_world_size(g)))  # within the last zigzag chunk
        qr = q[0, -m:].float()  # (m, Hq, D): the last rows of the sequence
        got = out[0, -m:].float()
        group = q.shape[2] // kf.shape[2]
        worst = 0.0
        for h in range(kf.shape[2]):  # one key/value head at a time keeps the scores small
            kh, vh = kf[0, :, h].float(), vf[0, :, h].float()  # (N, D)
            qs = qr[:, h * group : (h + 1) * group].transpose(0, 1).reshape(-1, qr.shape[-1])  # (group*m, D)
            s = qs @ kh.T / math.sqrt(qr.shape[-1])
            pos_q = torch.arange(n_total - m, n_total, device=device).repeat(group).view(-1, 1)
            allowed = torch.arange(n_total, device=device).view(1, -1) <= pos_q
            if op == "softmax":
                w = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
            elif op == "sigmoid":
                w = torch.sigmoid(s - math.log(n_total)) * allowed
            else:
                w = torch.nn.functional.silu(s) / n_total * allowed
            ref = (w @ vh).view(group, m, -1).transpose(0, 1)
            worst = max(worst, (got[:, h * group : (h + 1) * group] - ref).abs().max().item())
        return worst


# ------------------------------------------------------------------------------------------------
# the run


def _row(op, mode, n, cfg: Config, ms, world, strategy, heads, kv_heads, **extra) -> dict:
    f = flops(n, heads, cfg.head_dim, mode)
    row = {"op": f"cp-{op}", "impl": "omniattn", "mode": mode, "dtype": cfg.dtype, "batch": 1, "seqlen": n,
           "heads": heads, "kv_heads": kv_heads, "head_dim": cfg.head_dim, "causal": True,
           "ms": None if ms is None else round(ms, 3),
           "tflops": None if not ms else round(f / (ms * 1e-3) / 1e12, 1),
           "world_size": world, "strategy": strategy}
    if ms:
        row["tflops_per_gpu"] = round(f / world / (ms * 1e-3) / 1e12, 1)
    row.update(extra)
    return row


def _baseline_len(n: int, world: int, quantum: int) -> int:
    return max(quantum, int(round(n / math.sqrt(world) / quantum)) * quantum)


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reps(cfg: Config, predicted_ms: float) -> int:
    if cfg.target_s <= 0:
        return cfg.max_reps
    return int(max(1, min(cfg.max_reps, cfg.target_s * 1e3 // max(predicted_ms, 1e-3))))


def _heads(cfg: Config, op: str) -> tuple[int, int]:
    return (cfg.hstu_heads, cfg.hstu_heads) if op == "hstu" else (cfg.heads, cfg.kv_heads)


def _dout(op: str, n: int, heads: int, cfg: Config, device, gen, mode: str):
    if mode != "fwdbwd":
        return None
    shape = (n, heads, cfg.head_dim) if op == "hstu" else (1, n, heads, cfg.head_dim)
    return _rand(shape, DTYPES[cfg.dtype], device, gen)


def _warm(cfg: Config, predicted_s: float) -> int:
    return 1 if predicted_s <= cfg.warm_max_s else 0


def _local_ms(fn: Callable, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_baselines(items, g, cfg: Config, device, budget: Budget, rate: dict) -> dict:
    """Single-GPU times of ``items`` ((n1, op, mode) each), the ranks sharing them out and
    measuring at the same time on their own GPUs; items the budget cannot fit are None."""
    world, rank = dist.get_world_size(g), dist.get_rank(g)
    items = list(items)
    def cost(n1, op, mode):
        secs = flops(n1, _heads(cfg, op)[0], cfg.head_dim, mode) / rate[mode]
        return secs * (_reps(cfg, 1e3 * secs) + _warm(cfg, secs))

    while items:  # the ranks' shares run side by side: the longest share must fit
        shares = [sum(cost(*item) for item in items[r::world]) for r in range(world)]
        if budget.allows(max(shares)):
            break
        items.pop()
    mine = {}
    for n1, op, mode in items[rank::world]:
        heads = _heads(cfg, op)[0]
        predicted_ms = 1e3 * flops(n1, heads, cfg.head_dim, mode) / rate[mode]
        gen = torch.Generator(device).manual_seed(1 + rank)
        prob = _cp_problem(op, n1, "none", g, cfg, device, gen, cp_world=False)
        dout = _dout(op, n1, heads, cfg, device, gen, mode)
        mine[(n1, op, mode)] = _local_ms(_step(prob, mode, dout), device, _warm(cfg, predicted_ms / 1e3),
                                         _reps(cfg, predicted_ms))
        del prob, dout
        _free(device)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=g)
    return {k: v for d in everyone for k, v in d.items()}


def warm_up(g, cfg: Config, device) -> None:
    """Run every (score, strategy, mode) of the plan once at a short length, on P GPUs and on one,
    so Triton compiles every kernel variant before any timing (and before the long runs that
    are timed without a warm-up of their own): twice, the second time with the 64-bit addressing
    that long sequences take (offsets x strides >= 2^31 elements; compiling those variants inside
    the first timed 256K HSTU run had cost it 4 s of its 7)."""
    world, rank = dist.get_world_size(g), dist.get_rank(g)
    n = cfg.warmup_seqlen - cfg.warmup_seqlen % (2 * world)
    cuda = device.type == "cuda"
    for wide in (False, True) if cuda else (False,):
        seen = set()
        with _addressing(wide):
            for _, op, mode, strategies in cfg.cp_plan:
                for strategy in strategies:
                    for cp_world in (True, False):
                        key = (op, mode, strategy if cp_world else "single")
                        if key in seen:
                            continue
                        seen.add(key)
                        gen = torch.Generator(device).manual_seed(rank)
                        prob = _cp_problem(op, n, strategy, g, cfg, device, gen, cp_world=cp_world)
                        heads = _heads(cfg, op)[0]
                        _step(prob, mode, _dout(op, n // world if cp_world else n, heads, cfg, device, gen, mode))()
    _sync(device)
    dist.barrier(group=g)


@contextlib.contextmanager
def _addressing(wide: bool):
    """The Triton kernels with 64-bit offsets forced (``wide``), else as chosen per call."""
    from ..backends.triton import launch

    chosen = launch._needs_int64
    if wide:
        launch._needs_int64 = lambda *args: True
    try:
        yield
    finally:
        launch._needs_int64 = chosen


def run_cp(g, cfg: Config, device, clock: Clock, budget: Budget, log) -> list[dict]:
    world, rank = dist.get_world_size(g), dist.get_rank(g)
    rate = {"fwd": cfg.assumed_tflops * 1e12, "fwdbwd": cfg.assumed_tflops * 1e12}  # FLOP/s per GPU, learnt
    rows, baselines, errors = [], {}, {}
    longest: dict = {}  # (op, mode) -> (n1, ms) of the longest baseline measured
    quantum = cfg.length_quantum
    for index, (n, op, mode, strategies) in enumerate(cfg.cp_plan):
        heads, kv = _heads(cfg, op)
        n1 = _baseline_len(n, world, quantum)
        if n1 <= cfg.baseline_max_seqlen and (n1, op, mode) not in baselines:  # every baseline of this length, at once
            wanted = [(_baseline_len(m, world, quantum), o, md) for m, o, md, _ in cfg.cp_plan[index:] if m == n]
            wanted = list(dict.fromkeys(w for w in wanted if w not in baselines))
            measured = run_baselines(wanted, g, cfg, device, budget, rate)
            for w in wanted:
                baselines[w] = measured.get(w)
                w_heads, w_kv = _heads(cfg, w[1])
                if baselines[w] is None:
                    rows.append(_row(w[1], w[2], w[0], cfg, None, 1, "single-gpu", w_heads, w_kv,
                                     error="skipped: time budget"))
                else:
                    rate[w[2]] = flops(w[0], w_heads, cfg.head_dim, w[2]) / (baselines[w] * 1e-3)
                    if w[0] > longest.get((w[1], w[2]), (0, None))[0]:
                        longest[(w[1], w[2])] = (w[0], baselines[w])
                    rows.append(_row(w[1], w[2], w[0], cfg, baselines[w], 1, "single-gpu", w_heads, w_kv))
                log(rows[-1])
        if n1 > cfg.baseline_max_seqlen:  # the longest single-GPU run's throughput stands for this one
            n1, t1 = longest.get((op, mode), (n1, None))
        else:
            t1 = baselines.get((n1, op, mode))
        per_gpu = flops(n, heads, cfg.head_dim, mode) / world
        for strategy in strategies:
            predicted = per_gpu / rate[mode]
            warm = _warm(cfg, predicted)
            reps = _reps(cfg, predicted * 1e3)
            check = n <= cfg.check_max_seqlen and (n, op, strategy) not in errors
            if not budget.allows(predicted * (reps + warm) + (per_gpu / 3.5 / rate["fwd"] if check else 0)):
                rows.append(_row(op, mode, n, cfg, None, world, strategy, heads, kv, error="skipped: time budget"))
                log(rows[-1])
                continue
            gen = torch.Generator(device).manual_seed(100 + rank)
            prob = _cp_problem(op, n, strategy, g, cfg, device, gen, cp_world=True)
            if (n, op, strategy) not in errors:
                errors[(n, op, strategy)] = _last_rows_error(prob, op, n, g, cfg, device)
            dout = _dout(op, n // world, heads, cfg, device, gen, mode)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # (a long sequence's all-gather holds it whole on every rank: the 1M-token HSTU
            # forward+backward needed more than an 80 GB card before its dK/dV went in head chunks)
            ms = clock.time_ms(_step(prob, mode, dout), warm, reps, out_of_memory_ok=True)
            if ms is None:
                rows.append(_row(op, mode, n, cfg, None, world, strategy, heads, kv, error="out of GPU memory"))
                log(rows[-1])
                del prob, dout
                _free(device)
                continue
            extra = {"baseline_seqlen": n1, "baseline_ms": None if t1 is None else round(t1, 3)}
            if device.type == "cuda":  # the largest per-GPU peak (inputs included)
                extra["peak_mb_per_gpu"] = round(clock.agree_max(torch.cuda.max_memory_allocated(device) / 2**20), 1)
            if t1:
                one = flops(n1, heads, cfg.head_dim, mode)
                extra["efficiency"] = round((flops(n, heads, cfg.head_dim, mode) / (world * ms)) / (one / t1), 3)
            err = errors[(n, op, strategy)]
            extra["max_err"] = None if err is None else float(f"{err:.3g}")
            rows.append(_row(op, mode, n, cfg, ms, world, strategy, heads, kv, **extra))
            log(rows[-1])
            del prob, dout
            _free(device)
    return rows


@torch.no_grad()
def _tp_measure(layer, x, g, clock: Clock, reps: int) -> dict:
    """Forward times of one ParallelAttention, interleaved rep by rep so that drift (clocks, the
    other rank) falls on all alike: overlapped, plain, tiles without overlap, and the all-reduce
    of the whole output alone; and how far the overlapped output is from the plain one."""
    buf = torch.empty(x.shape[0], x.shape[1], layer.dim, device=x.device, dtype=x.dtype).normal_()
    settings = {"overlap": (True, False), "plain": (False, False), "sync": (False, True)}

    def variant(name):
        if name == "allreduce":
            return lambda: dist.all_reduce(buf, group=g)

        def run():
            layer.overlap, layer._sync_tiles = settings[name]
            return layer(x)
        return run

    outputs = {name: variant(name)() for name in settings}  # also the warm-up
    times = {name: [] for name in (*settings, "allreduce")}
    for _ in range(reps):
        for name in times:
            times[name].append(clock.time_ms(variant(name), 0, 1))
    ms = {name: statistics.median(t) for name, t in times.items()}
    ms_ar, ms_plain, mine = ms["allreduce"], ms["plain"], ms["overlap"]
    err = (outputs["overlap"].float() - outputs["plain"].float()).abs().max().item()
    return {"ms": round(mine, 3), "ms_min": round(min(times["overlap"]), 3), "ms_max": round(max(times["overlap"]), 3),
            "max_err": float(f"{err:.3g}"), "ms_plain": round(ms_plain, 3), "ms_tiled_sync": round(ms["sync"], 3),
            "ms_allreduce": round(ms_ar, 3),
            "hidden_fraction": round((ms_plain - mine) / ms_ar, 3) if ms_ar > 0 else None,
            "hidden_fraction_tiled": round((ms["sync"] - mine) / ms_ar, 3) if ms_ar > 0 else None}


def run_tp(g, cfg: Config, device, clock: Clock, budget: Budget, log) -> list[dict]:
    from ..nn import ParallelAttention

    world = dist.get_world_size(g)
    dt = DTYPES[cfg.dtype]
    dim = cfg.heads * cfg.head_dim
    rows = []
    for batch, n in cfg.tp_shapes:
        for tiles in cfg.tp_tiles:
            row = dict(op="tp-allreduce", impl="omniattn", mode="fwd", dtype=cfg.dtype, batch=batch, seqlen=n,
                       heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, causal=True, world_size=world,
                       strategy="tiling-allreduce", tiles=tiles)
            predicted = 6 * flops(n, cfg.heads // world, cfg.head_dim, "fwd", batch=batch) / (cfg.assumed_tflops * 1e12)
            if not budget.allows(predicted * 5 * (cfg.tp_reps + 1) + 2):
                rows.append({**row, "ms": None, "error": "skipped: time budget"})
                log(rows[-1])
                continue
            torch.manual_seed(7)  # the same input on every rank (each rank's weight shard is its own)
            layer = ParallelAttention(dim, cfg.heads, cfg.kv_heads, group=g, causal=True, tiles=tiles, overlap=True,
                                      backend=cfg.backend, device=device, dtype=dt)
            x = torch.randn(batch, n, dim, device=device, dtype=dt)
            row.update(_tp_measure(layer, x, g, clock, cfg.tp_reps))
            row["tflops"] = round(flops(n, cfg.heads, cfg.head_dim, "fwd", batch=batch) / (row["ms"] * 1e-3) / 1e12, 1)
            rows.append(row)
            log(row)
            layer = x = None
            _free(device)
    return rows


def run_rank(group, cfg: Config, device: Optional[torch.device] = None, log=None) -> list[dict]:
    """Every measurement of ``cfg`` on this rank of ``group`` (a process group); the rows on
    rank 0 (other ranks return theirs too, identical but for rank-0-only keys)."""
    from ..distributed.comm import resolve_group

    g = resolve_group(group).pg
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    clock = Clock(g, device)
    budget = Budget(cfg.budget_s, clock)
    rank = dist.get_rank(g)
    log = log or (lambda row: None)
    say = (lambda row: log(row)) if rank == 0 else (lambda row: None)
    warm_up(g, cfg, device)
    rows = run_tp(g, cfg, device, clock, budget, say)  # cheap, and one of the targets: first
    rows += run_cp(g, cfg, device, clock, budget, say)
    return rows


# ------------------------------------------------------------------------------------------------
# processes


COMPARE_KEYS = {"op", "mode", "seqlen", "heads", "kv_heads", "head_dim", "dtype", "strategy", "world_size"}


def compare_to(rows: list[dict], fewer: list[dict]) -> None:
    """Add ``efficiency_vs_<P'>gpu`` to the context-parallel rows of ``rows`` (P GPUs) that
    ``fewer`` (an earlier run's rows, P' < P GPUs) measured too: same op, mode, length, heads and
    strategy; per-GPU throughput at P over that at P'."""
    def key(r):
        return (r["op"], r["mode"], r["seqlen"], r["heads"], r["kv_heads"], r["head_dim"], r["dtype"], r["strategy"])

    earlier = {key(r): r for r in fewer if r["op"].startswith("cp-") and r.get("tflops_per_gpu")}
    for r in rows:
        e = earlier.get(key(r)) if r["op"].startswith("cp-") and r.get("tflops_per_gpu") else None
        if e is not None and e["world_size"] < r["world_size"]:
            r[f"efficiency_vs_{e['world_size']}gpu"] = round(r["tflops_per_gpu"] / e["tflops_per_gpu"], 3)


def _print_row(row: dict) -> None:
    keys = ("op", "mode", "seqlen", "world_size", "strategy", "tiles", "ms", "tflops", "efficiency", "ms_plain",
            "ms_allreduce", "hidden_fraction", "max_err", "peak_mb_per_gpu", "error")
    vs = [k for k in row if k.startswith("efficiency_vs_")]
    print("  " + "  ".join(f"{k}={row[k]}" for k in keys + tuple(vs) if k in row), flush=True)


def _write(path: str, rows: list[dict], device: torch.device) -> None:
    import triton

    from . import device_name

    doc = {"device": device_name(device), "torch": torch.__version__.split("+")[0], "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _main_rank(rank: int, world: int, args, port: Optional[int]) -> None:
    os.environ.update({k: v for k, v in MULTICAST_OFF.items() if k not in os.environ})
    if port is not None:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout_s),
                            **({"device_id": device} if cuda else {}))
    cfg = smoke_config() if args.cpu or not cuda else default_config()
    if args.seqlens or args.ops or args.strategies or args.modes:
        seqlens = [int(x) for x in args.seqlens.split(",")] if args.seqlens else sorted({n for n, *_ in cfg.cp_plan})
        ops = tuple(args.ops.split(",")) if args.ops else ("softmax", "sigmoid", "hstu", "silu")
        strategies = tuple(args.strategies.split(",")) if args.strategies else ("ring", "allgather")
        modes = tuple(args.modes.split(",")) if args.modes else ("fwdbwd", "fwd")
        cfg = replace(cfg, cp_plan=_plan([(n, ops, modes, strategies) for n in seqlens]))
    if args.tp_tiles:
        cfg = replace(cfg, tp_tiles=tuple(int(t) for t in args.tp_tiles.split(",")))
    if args.no_tp:
        cfg = replace(cfg, tp_shapes=())
    if args.no_cp:
        cfg = replace(cfg, cp_plan=())
    if args.budget_s is not None:
        cfg = replace(cfg, budget_s=args.budget_s)
    start = time.perf_counter()
    so_far = []

    def log(row):  # rows are written as they come: a run cut short keeps what it measured
        _print_row(row)
        so_far.append(row)
        if args.json:
            _write(args.json, so_far, device)

    rows = run_rank(dist.group.WORLD, cfg, device, log=log)
    if rank == 0:
        print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s", flush=True)
        if args.compare_to:
            with open(args.compare_to) as f:
                compare_to(rows, json.load(f)["rows"])
            for row in rows:
                if any(k.startswith("efficiency_vs_") for k in row):
                    _print_row(row)
        if args.json:
            _write(args.json, rows, device)
            print(f"wrote {args.json}", flush=True)
    dist.barrier()  # no rank tears its group down while another still talks to it
    dist.destroy_process_group()
    # after both ranks had destroyed their gloo group, 1 CPU smoke run in 5-10 still ended with
    # SIGABRT ("terminate called without an active exception") while the interpreter finalized:
    # everything is written and flushed by now, so the process ends here, without finalization
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawned(rank: int, world: int, args, port: int) -> None:
    _main_rank(rank, world, args, port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m omniattn.bench.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the rows (DESIGN.md's results format) here")
    p.add_argument("--world-size", type=int, default=None, help="processes to spawn (default: every GPU; 2 on CPU)")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU processes, tiny sizes (a smoke run)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds of measurements before skipping the rest")
    p.add_argument("--timeout-s", type=int, default=300, help="collective timeout")
    p.add_argument("--seqlens", help="comma-separated global sequence lengths (replaces the default plan)")
    p.add_argument("--ops", help="comma-separated scores of the plan: softmax,sigmoid,silu,hstu")
    p.add_argument("--strategies", help="comma-separated: ring,allgather")
    p.add_argument("--modes", help="comma-separated modes of the plan: fwdbwd,fwd")
    p.add_argument("--tp-tiles", help="comma-separated tile counts of the tiling-AllReduce rows (default 2,4)")
    p.add_argument("--no-tp", action="store_true", help="skip the tiling-AllReduce rows")
    p.add_argument("--no-cp", action="store_true", help="skip the context-parallel rows")
    p.add_argument("--compare-to", metavar="JSON", help="an earlier run on fewer GPUs: add efficiency_vs_<P>gpu to the rows")
    args = p.parse_args(argv)
    if args.compare_to:  # checked before any measurement: it is read once they are done
        try:
            with open(args.compare_to) as f:
                earlier = json.load(f)["rows"]
            bad = [r for r in earlier if r.get("op", "").startswith("cp-") and not COMPARE_KEYS <= r.keys()]
        except OSError as e:
            p.error(f"--compare-to: cannot read {args.compare_to}: {e.strerror}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            p.error(f"--compare-to: {args.compare_to} is not a results file of this benchmark ({type(e).__name__}: {e})")
        if bad:
            p.error(f"--compare-to: a row of {args.compare_to} lacks {sorted(COMPARE_KEYS - bad[0].keys())}")
    os.environ.update({k: v for k, v in MULTICAST_OFF.items() if k not in os.environ})
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        _main_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return 0
    world = args.world_size or (torch.cuda.device_count() if torch.cuda.is_available() and not args.cpu else 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(world, args, port), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU only: context parallelism and tiling-AllReduce on NCCL with the Triton kernels, bf16.

Two ranks need two GPUs (the nvidia-h100-x2 kind); on one GPU only the one-rank group runs (the
same code path with a ring of one). NVLink multicast stays off in the spawned ranks. Each test
spawns its own ranks (NCCL communicators do not outlive a failed case gracefully); a run of the
whole file takes about a minute, most of it Triton compiling the kernel variants.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import omniattn as oa
from omniattn import distributed as cp
from omniattn.nn import ParallelAttention

from ..test_distributed_ranks import _check, _compare, _reference, _shard_rows
from ..helpers import magnitude

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GPUS = torch.cuda.device_count()
# sizes and kernels of the cases (module constants, so the cases' logic can be dry-run small on CPUs)
BACKEND, DTYPE, HEAD_DIM = "triton", torch.bfloat16, 128
DENSE, PACKED, HSTU_LENS = (2048,), (1024, 512, 0, 1536), (512, 256, 1024)
TP_SHAPE, TP_DIM, BENCH_LEN = (2, 1000), 1024, 16384


def _worker(rank, world, port, name, args, results):
    try:
        os.environ.update(MULTICAST_OFF)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120),
                                device_id=dev)
        failures = globals()[name](dist.group.WORLD, dev, *args)
        dist.destroy_process_group()
    except Exception:
        failures = [traceback.format_exc()]
    results.put((rank, failures))


def _spawn(world: int, name: str, *args) -> None:
    if GPUS < world:
        pytest.skip(f"needs {world} GPUs, this machine has {GPUS}")
    for k, v in MULTICAST_OFF.items():
        os.environ.setdefault(k, v)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, name, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    found = dict(results.get(timeout=300) for _ in range(world))
    for p in procs:
        p.join(timeout=30)
    bad = [f"rank {r}: {m}" for r, fs in sorted(found.items()) for m in fs[:6]]
    if bad:
        pytest.fail(f"{name}{args}:\n" + "\n".join(bad))


def _full_problem(kind, lengths, hq, hkv, d, dtype, dev, seed):
    gen = torch.Generator(dev).manual_seed(seed)
    if kind == "dense":
        n = lengths[0]
        shapes, cu = [(1, n, hq, d), (1, n, hkv, d), (1, n, hkv, d), (1, n, hq, d)], None
    else:
        t = sum(lengths)
        shapes = [(t, hq, d), (t, hkv, d), (t, hkv, d), (t, hq, d)]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q, k, v, dout = (torch.randn(s, generator=gen, device=dev).to(dtype) for s in shapes)
    return q, k, v, dout, cu


def case_cp(group, dev, strategy, kind):
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = DENSE if kind == "dense" else PACKED
    lay = cp.layout.build(lengths, size, kind == "dense", "zigzag")
    rows = cp.layout.global_rows(lay, rank, dev)
    failures = []
    combos = [(s, c) for s in ("softmax", "sigmoid", "silu") for c in (True, False)]
    if kind == "varlen":  # fewer kernel variants to compile; the dense run covers every pair
        combos = [("softmax", True), ("sigmoid", False), ("silu", True)]
    for score, causal in combos:
        q, k, v, dout, cu = _full_problem(kind, lengths, 8, 2, HEAD_DIM, DTYPE, dev, 7)
        ref = _reference(kind, q, k, v, cu, lengths, dout, DTYPE, score=score, causal=causal)
        ql, kl, vl = (_shard_rows(t, rows, kind).requires_grad_() for t in (q, k, v))
        out = cp.context_parallel_attention(ql, kl, vl, group=group, score=score, causal=causal, strategy=strategy,
                                            cu_seqlens=cu, backend=BACKEND)
        out.backward(_shard_rows(dout, rows, kind))
        _compare(failures, f"{kind} {score} causal={causal}", kind, rows,
                 (out.detach(), ql.grad, kl.grad, vl.grad), ref, DTYPE)
    return failures


def case_hstu(group, dev):
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = HSTU_LENS
    lay = cp.layout.build(lengths, size, False, "zigzag")
    rows = cp.layout.global_rows(lay, rank, dev)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    t = sum(lengths)
    gen = torch.Generator(dev).manual_seed(3)
    q, k, v, dout = (torch.randn((t, 4, HEAD_DIM), generator=gen, device=dev).to(DTYPE) for _ in range(4))
    torch.manual_seed(3)
    n = max(lengths)
    rab = oa.hstu.RelativeBias(n, 64).to(dev)
    ts = torch.arange(t, device=dev) * 60
    nt = torch.tensor([8, 0, 16], device=dev)
    failures = []
    # with the relative bias every row is computed on every rank; without it the kernels visit
    # only the rank's rows (query windows); without targets too it is SiLU context parallelism
    for bias, targets in ((rab, nt), (None, nt), (None, None)):
        weights = [rab.pos_w, rab.ts_w] if bias is not None else []
        extra = dict(rab=bias, timestamps=ts) if bias is not None else {}
        refs = {}
        for name, dt in (("64", torch.float64), ("same", DTYPE)):
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            out = oa.reference.hstu_attention(*leaves, cu, n, num_targets=targets, dtype=dt, **extra)
            grads = torch.autograd.grad(out, leaves + weights, dout.to(out.dtype))
            refs[name] = (out.detach(), *grads)
        local = [x.index_select(0, rows).requires_grad_() for x in (q, k, v)]
        if bias is not None:
            extra["timestamps"] = ts.index_select(0, rows)
        out = cp.context_parallel_hstu_attention(*local, cu, n, group=group, num_targets=targets, backend=BACKEND,
                                                 **extra)
        got = torch.autograd.grad(out, local + weights, dout.index_select(0, rows))
        scale = magnitude(*refs["64"])
        names = ("dq", "dk", "dv", "d_pos_w", "d_ts_w")
        tag = "hstu rab" if bias is not None else "hstu" if targets is not None else "hstu plain"
        _check(failures, f"{tag} out", out.detach(), refs["64"][0].index_select(0, rows),
               refs["same"][0].index_select(0, rows), DTYPE)
        for i, name in enumerate(names[: len(got)]):
            r64, rs = refs["64"][i + 1], refs["same"][i + 1]
            if i < 3:
                r64, rs = r64.index_select(0, rows), rs.index_select(0, rows)
            _check(failures, f"{tag} {name}", got[i], r64, rs, DTYPE, scale)
    return failures


def case_tp(group, dev):
    """Tiling-AllReduce equals the plain layer in bf16 (the same tiles of maths)."""
    torch.manual_seed(0)
    layer = ParallelAttention(TP_DIM, 16, 4, group=group, causal=True, tiles=4, backend=BACKEND, device=dev, dtype=DTYPE)
    x = torch.randn(*TP_SHAPE, TP_DIM, device=dev, dtype=DTYPE, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    gx, gw = x.grad.clone(), layer.qkv_weight.grad.clone()
    x.grad = None
    layer.zero_grad()
    layer.overlap = False
    y_plain = layer(x)
    y_plain.backward(torch.ones_like(y))
    failures = []
    for name, a, b in (("y", y, y_plain), ("dx", gx, x.grad), ("dW_qkv", gw, layer.qkv_weight.grad)):
        err = (a.float() - b.float()).abs().max().item()
        if not err <= 2e-2 * max(1.0, b.float().abs().max().item()):
            failures.append(f"tp {name}: overlapped differs from plain by {err:.3e}")
    return failures


def case_bench(group, dev):
    """The multi-GPU benchmark at small sizes: every row measured, none failed."""
    from omniattn.bench import distributed as bench

    plan = bench._plan([(BENCH_LEN, ("softmax", "sigmoid", "silu", "hstu"), ("fwd", "fwdbwd"), ("ring", "allgather"))])
    small = dict(dtype="fp32", heads=4, kv_heads=2, head_dim=16, hstu_heads=2, length_quantum=8, backend=BACKEND)
    cfg = bench.Config(cp_plan=plan, tp_shapes=((1, BENCH_LEN // 4),), tp_tiles=(4,), budget_s=120, max_reps=2,
                       check_max_seqlen=BENCH_LEN, **(small if BACKEND == "torch" else {}))
    rows = bench.run_rank(group, cfg, dev)
    failures = [f"row failed: {r}" for r in rows if "error" in r]
    for r in rows:
        if r.get("max_err") is not None and not r["max_err"] < 0.05:
            failures.append(f"large error: {r}")
    return failures


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize("kind", ["dense", "varlen"])
def test_context_parallel_two_gpus(strategy, kind):
    _spawn(2, "case_cp", strategy, kind)


def test_context_parallel_one_gpu_group():
    _spawn(1, "case_cp", "ring", "dense")


def test_hstu_two_gpus():
    _spawn(2, "case_hstu")


def test_tiling_allreduce_two_gpus():
    _spawn(2, "case_tp")


def test_benchmark_small_two_gpus():
    _spawn(2, "case_bench")

"""Context parallelism and tensor parallelism across processes (gloo on CPU), against
omniattn.reference on the whole sequence: outputs and every gradient, DESIGN.md's tolerance rule.

One pool of 4 spawned ranks serves the whole module (process start-up is the expensive part):
4-rank cases use the whole group, 2-rank cases the subgroup {0, 1} (ranks 2 and 3 sit them out),
1-rank cases each rank's own group. Each test sends a case name to every rank and collects the
failures each rank found.
"""

from __future__ import annotations

import copy
import datetime
import os
import queue
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import omniattn as oa
from omniattn import distributed as cp
from omniattn.nn import ParallelAttention

from .helpers import bound, magnitude, max_err

POOL_SIZE = 4
CASE_TIMEOUT_S = 120

# --------------------------------------------------------------------------------------------
# the worker pool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_GROUPS: dict = {}


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    # every rank creates every group, in the same order (torch.distributed requires it)
    _GROUPS[4] = dist.group.WORLD
    pair_a, pair_b = dist.new_group([0, 1]), dist.new_group([2, 3])
    _GROUPS[2] = pair_a if rank < 2 else pair_b
    singles = [dist.new_group([r]) for r in range(world)]
    _GROUPS[1] = singles[rank]
    while True:
        item = tasks.get()
        if item is None:
            break
        name, size, args = item
        try:
            if size == 2 and rank >= 2:  # 2-rank cases run on {0, 1}
                results.put((rank, []))
                continue
            failures = globals()[name](_GROUPS[size], *args)
            results.put((rank, failures))
        except Exception:  # a crash is a failure of this case, reported with its traceback
            results.put((rank, [traceback.format_exc()]))
    os._exit(0)  # nothing left to flush; tearing gloo down politely only costs seconds


class Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, name: str, size: int, *args) -> None:
        """Run case ``name`` on groups of ``size`` ranks; fail with every rank's failures."""
        if self.broken:
            pytest.fail("the worker pool is broken by an earlier timeout")
        for t in self.tasks:
            t.put((name, size, args))
        found = {}
        try:
            for _ in range(self.world):
                rank, failures = self.results.get(timeout=CASE_TIMEOUT_S)
                found[rank] = failures
        except queue.Empty:
            self.broken = True
            pytest.fail(f"{name}{args}: ranks {sorted(set(range(self.world)) - set(found))} did not answer in {CASE_TIMEOUT_S} s")
        bad = {r: f for r, f in found.items() if f}
        if bad:
            lines = [f"rank {r}: {m}" for r, fs in sorted(bad.items()) for m in fs[:6]]
            pytest.fail(f"{name}{args}:\n" + "\n".join(lines))

    def close(self) -> None:
        for t in self.tasks:
            t.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def pool():
    p = Pool(POOL_SIZE)
    yield p
    p.close()


# --------------------------------------------------------------------------------------------
# helpers that run inside the workers


def _dtype(name: str) -> torch.dtype:
    return {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16}[name]


def _check(failures: list, name: str, got, ref64, ref_same, dtype, scale: float = 1.0) -> None:
    """DESIGN.md's rule (error vs float64 <= 2x the same-dtype maths' error + a rounding floor)."""
    if got is None:
        failures.append(f"{name}: missing")
        return
    if got.shape != ref64.shape:
        failures.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}")
        return
    if torch.isnan(got).any() and not torch.isnan(ref64).any():
        failures.append(f"{name}: NaN in the result")
        return
    err, limit = max_err(got, ref64), bound(ref64, ref_same, dtype, scale)
    if not err <= limit:
        failures.append(f"{name}: error {err:.3e} > {limit:.3e}")


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def _local_rows(layout, rank: int) -> torch.Tensor:
    from omniattn.distributed import layout as L

    return L.global_rows(layout, rank)


def _problem(kind: str, lengths, hq, hkv, d, dv, dtype, gen, batch=2):
    """Full (unsharded) q, k, v, dout and cu_seqlens (None for dense)."""
    if kind == "dense":
        n = lengths[0]
        shapes = [(batch, n, hq, d), (batch, n, hkv, d), (batch, n, hkv, dv), (batch, n, hq, dv)]
        cu = None
    else:
        t = sum(lengths)
        shapes = [(t, hq, d), (t, hkv, d), (t, hkv, dv), (t, hq, dv)]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, dout = (_rand(s, dtype, gen) for s in shapes)
    return q, k, v, dout, cu


def _shard_rows(x, rows: torch.Tensor, kind: str):
    return x.index_select(1 if kind == "dense" else 0, rows)


def _reference(kind, q, k, v, cu, lengths, dout, dtype, **kw):
    """Outputs and gradients of the unsplit attention in float64 and in ``dtype``."""
    res = {}
    for name, dt in (("64", torch.float64), ("same", dtype)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if kind == "dense":
            out = oa.reference.attention(*leaves, dtype=dt, **kw)
        else:
            n = max(lengths, default=0)
            out = oa.reference.attention_varlen(*leaves, cu, cu, n, n, dtype=dt, **kw)
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
        res[name] = (out.detach(), *grads)
    return res


def _compare(failures, label, kind, rows, got, ref, dtype):
    """Compare this rank's (out, dq, dk, dv) with its rows of the reference's."""
    scale = magnitude(*ref["64"])
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        r64, rs = _shard_rows(ref["64"][i], rows, kind), _shard_rows(ref["same"][i], rows, kind)
        _check(failures, f"{label} {name}", got[i], r64, rs, dtype, scale if i else 1.0)


def _run_cp(group, kind, q, k, v, dout, cu, rows, load_balance, **kw):
    ql, kl, vl = (_shard_rows(t, rows, kind).requires_grad_() for t in (q, k, v))
    out = cp.context_parallel_attention(ql, kl, vl, group=group, load_balance=load_balance, cu_seqlens=cu, **kw)
    out.backward(_shard_rows(dout, rows, kind))
    return out.detach(), ql.grad, kl.grad, vl.grad


def _layout(kind, lengths, size, load_balance, sizes=None):
    from omniattn.distributed import layout as L

    return L.build(lengths, size, kind == "dense", load_balance, sizes)


# --------------------------------------------------------------------------------------------
# cases (run on every rank; return a list of failures)


def case_matrix(group, strategy, kind, load_balance, dtype_name, seed, backend="torch"):
    """Every score x causal/non-causal x GQA/MHA for one layout."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = _dtype(dtype_name)
    lengths = {("dense", "zigzag"): (24,), ("dense", None): (23,),
               ("varlen", "zigzag"): (16, 0, 8, 24), ("varlen", None): (13, 0, 5, 17)}[(kind, load_balance)]
    lay = _layout(kind, lengths, size, load_balance)
    rows = _local_rows(lay, rank)
    failures = []
    for score in ("softmax", "sigmoid", "silu"):
        for causal in (False, True):
            for hkv in (1, 4):
                gen = torch.Generator().manual_seed(seed + 7 * hkv + (3 if causal else 0))
                q, k, v, dout, cu = _problem(kind, lengths, 4, hkv, 8, 6, dtype, gen)
                ref = _reference(kind, q, k, v, cu, lengths, dout, dtype, score=score, causal=causal)
                got = _run_cp(group, kind, q, k, v, dout, cu, rows, load_balance, score=score, causal=causal,
                              strategy=strategy, backend=backend)
                _compare(failures, f"{score} causal={causal} hkv={hkv}", kind, rows, got, ref, dtype)
    return failures


def case_windows(group, strategy, kind, seed):
    """Sliding windows (causal or not), softcap, explicit scale/bias/norm, both layouts."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    failures = []
    settings = [
        dict(score="softmax", causal=True, window=(3, 0)),
        dict(score="softmax", window=(2, 5), softcap=2.0),
        dict(score="sigmoid", window=(0, 0), sigmoid_bias=-1.5),
        dict(score="silu", window=(-1, 3), silu_norm=7.0, scale=0.3),
        dict(score="sigmoid", causal=True, window=(6, -1)),
    ]
    for load_balance in ("zigzag", None):
        lengths = (24,) if kind == "dense" else ((8, 16, 0, 24) if load_balance else (11, 2, 0, 19))
        lay = _layout(kind, lengths, size, load_balance)
        rows = _local_rows(lay, rank)
        for i, kw in enumerate(settings):
            gen = torch.Generator().manual_seed(seed + i)
            q, k, v, dout, cu = _problem(kind, lengths, 2, 1, 8, 8, torch.float64, gen)
            ref = _reference(kind, q, k, v, cu, lengths, dout, torch.float64, **kw)
            got = _run_cp(group, kind, q, k, v, dout, cu, rows, load_balance, strategy=strategy, backend="torch", **kw)
            _compare(failures, f"{kw} {load_balance}", kind, rows, got, ref, torch.float64)
    return failures


def case_uneven(group, strategy, seed):
    """Contiguous shards of different sizes, one of them empty; causal too (exact, unbalanced)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = {2: (0, 23), 4: (5, 0, 12, 6)}[size]
    failures = []
    for kind, lengths in (("dense", (sum(sizes),)), ("varlen", (9, 0, 11, 3))):
        lay = _layout(kind, lengths, size, None, sizes)
        rows = _local_rows(lay, rank)
        for score in ("softmax", "sigmoid", "silu"):
            for causal in (False, True):
                gen = torch.Generator().manual_seed(seed)
                q, k, v, dout, cu = _problem(kind, lengths, 4, 2, 8, 8, torch.float64, gen)
                ref = _reference(kind, q, k, v, cu, lengths, dout, torch.float64, score=score, causal=causal)
                got = _run_cp(group, kind, q, k, v, dout, cu, rows, None, score=score, causal=causal,
                              strategy=strategy, backend="torch")
                _compare(failures, f"{kind} {score} causal={causal} sizes={sizes}", kind, rows, got, ref, torch.float64)
    return failures


def case_hstu(group, load_balance, seed):
    """HSTU over a jagged batch split across ranks: targets, contextual prefix, max_attn_len, rab
    (shared and per head, weights' gradients summed over the group)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = (16, 8, 0, 24) if load_balance else (13, 7, 0, 20)
    lay = _layout("varlen", lengths, size, load_balance)
    rows = _local_rows(lay, rank)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    t = sum(lengths)
    failures = []
    settings = [
        dict(num_targets=torch.tensor([3, 1, 0, 4]), rab="shared"),
        dict(causal=False, contextual_seq_len=2, num_targets=torch.tensor([2, 0, 0, 3]), rab="heads"),
        # plain SiLU attention: context_parallel_attention's strategies
        dict(max_attn_len=5, rab=None, strategy="ring"),
        dict(causal=False, max_attn_len=3, num_targets=torch.tensor([0, 0, 0, 0]), rab=None, strategy="allgather"),
        dict(rab=None, silu_norm=7.0),
    ]
    for i, setting in enumerate(settings):
        kw = dict(setting)
        gen = torch.Generator().manual_seed(seed + i)
        q, k, v = (_rand((t, 2, 8), torch.float64, gen) for _ in range(3))
        dout = _rand((t, 2, 8), torch.float64, gen)
        rab_kind, strategy = kw.pop("rab"), kw.pop("strategy", "auto")
        rab = None
        if rab_kind:
            torch.manual_seed(seed + i)  # the same weights on every rank
            rab = oa.hstu.RelativeBias(32, 8, num_heads=2 if rab_kind == "heads" else None, dtype=torch.float64)
            kw["timestamps"] = torch.arange(t) * 37 % 1000
        rab_ref = copy.deepcopy(rab)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = oa.reference.hstu_attention(*leaves, cu, 32, rab=rab_ref, **kw)
        want = [leaves[0], leaves[1], leaves[2]] + ([rab_ref.pos_w, rab_ref.ts_w] if rab else [])
        ref_grads = torch.autograd.grad(out, want, dout)
        local = [x.index_select(0, rows).requires_grad_() for x in (q, k, v)]
        lkw = dict(kw)
        if rab:
            lkw["timestamps"] = kw["timestamps"].index_select(0, rows)
        got = cp.context_parallel_hstu_attention(*local, cu, 32, group=group, load_balance=load_balance, rab=rab,
                                                 strategy=strategy, backend="torch", **lkw)
        got_grads = torch.autograd.grad(got, local + ([rab.pos_w, rab.ts_w] if rab else []), dout.index_select(0, rows))
        label = f"hstu {setting} {load_balance}"
        scale = magnitude(out, *ref_grads)
        _check(failures, f"{label} out", got, out.detach().index_select(0, rows), out.detach().index_select(0, rows),
               torch.float64)
        for name, g_, r in zip(("dq", "dk", "dv"), got_grads[:3], ref_grads[:3]):
            r = r.index_select(0, rows)
            _check(failures, f"{label} {name}", g_, r, r, torch.float64, scale)
        for name, g_, r in zip(("d_pos_w", "d_ts_w"), got_grads[3:], ref_grads[3:]):
            _check(failures, f"{label} {name}", g_, r, r, torch.float64, scale)
    return failures


def case_single_rank_group(group):
    """A group of one rank: plain attention on the whole sequence it holds (documented behaviour)."""
    gen = torch.Generator().manual_seed(5)
    failures = []
    q, k, v, dout, cu = _problem("dense", (10,), 4, 2, 8, 8, torch.float64, gen)
    ref = _reference("dense", q, k, v, cu, (10,), dout, torch.float64, causal=True)
    rows = torch.arange(10)
    for strategy in ("ring", "allgather"):
        got = _run_cp(group, "dense", q, k, v, dout, cu, rows, "zigzag", causal=True, strategy=strategy, backend="torch")
        _compare(failures, f"1 rank {strategy}", "dense", rows, got, ref, torch.float64)
    return failures


def _expect_error(failures, label, fn, fragment, types=(ValueError,)):
    try:
        fn()
    except types as e:
        if fragment not in str(e):
            failures.append(f"{label}: error without {fragment!r}: {e}")
        return
    except Exception as e:
        failures.append(f"{label}: expected {types}, got {type(e).__name__}: {e}")
        return
    failures.append(f"{label}: no error")


def case_bad_inputs(group):
    """Clear errors, raised on EVERY rank (never a hang of the others), for inconsistent or
    invalid shards; the group keeps working afterwards."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    failures = []
    gen = torch.Generator().manual_seed(0)
    q, k, v = _rand((1, 8, 4, 8), torch.float64, gen), _rand((1, 8, 2, 8), torch.float64, gen), _rand((1, 8, 2, 8), torch.float64, gen)

    def call(q=q, k=k, v=v, **kw):
        return cp.context_parallel_attention(q, k, v, group=group, backend="torch", **kw)

    # different key/value head counts on different ranks
    k1 = k if rank == 0 else k[:, :, :1]
    _expect_error(failures, "heads", lambda: call(k=k1, v=k1), "key/value heads")
    # one rank's own input is invalid: that rank says why, the others that it rejected its inputs
    k_bad = k[..., :4] if rank == 1 else k
    _expect_error(failures, "local", lambda: call(k=k_bad), "head dim" if rank == 1 else "rejected their inputs")
    # zigzag needs every length to be a multiple of 2P
    _expect_error(failures, "zigzag", lambda: call(q[:, :3], k[:, :3], v[:, :3]), f"multiple of {2 * size}")
    # zigzag shards of different sizes
    n = 4 if rank == 0 else 8
    _expect_error(failures, "zigzag rows", lambda: call(q[:, :n], k[:, :n], v[:, :n]), "zigzag")
    # different arguments on different ranks
    _expect_error(failures, "args", lambda: call(causal=rank == 0), "arguments")
    _expect_error(failures, "strategy", lambda: call(strategy="tree"), "strategy" if rank == 0 else "")
    # packed: cu_seqlens that does not describe the shards
    cu = torch.tensor([0, 4 * size + 4], dtype=torch.int32)
    _expect_error(failures, "cu_seqlens", lambda: call(q[0], k[0], v[0], cu_seqlens=cu, load_balance=None), "cu_seqlens")
    h = 2 if rank == 0 else 1
    _expect_error(failures, "hstu", lambda: cp.context_parallel_hstu_attention(
        q[0, :, :h], k[0, :, :h], v[0, :, :h], torch.tensor([0, 8 * size]), 8 * size, group=group), "heads")
    _expect_error(failures, "hstu ring with targets", lambda: cp.context_parallel_hstu_attention(
        q[0, :, :2], k[0, :, :2], v[0, :, :2], torch.tensor([0, 8 * size]), 8 * size, group=group,
        num_targets=torch.tensor([2]), strategy="ring"), "strategy")
    # still in step: a good call works afterwards
    out = call(causal=True, load_balance=None)
    if out.shape != (1, 8, 4, 8):
        failures.append(f"after errors: shape {tuple(out.shape)}")
    return failures


def case_triton_interpreter(group, strategy):
    """The Triton backend's block calls (strided views, lse layouts) under Triton's interpreter, fp32."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    failures = []
    for kind, lengths in (("dense", (2 * 2 * size,)), ("varlen", (4 * size, 2 * size))):
        lay = _layout(kind, lengths, size, "zigzag")
        rows = _local_rows(lay, rank)
        for score in ("softmax", "sigmoid"):
            gen = torch.Generator().manual_seed(3)
            q, k, v, dout, cu = _problem(kind, lengths, 2, 1, 16, 16, torch.float32, gen, batch=1)
            ref = _reference(kind, q, k, v, cu, lengths, dout, torch.float32, score=score, causal=True)
            got = _run_cp(group, kind, q, k, v, dout, cu, rows, "zigzag", score=score, causal=True,
                          strategy=strategy, backend="triton")
            _compare(failures, f"triton {kind} {score}", kind, rows, got, ref, torch.float32)
    return failures


def case_tensor_parallel(group, score, causal, hkv, tiles, seed):
    """ParallelAttention (heads over the group, tiling-AllReduce) equals the unsplit layer,
    forward and backward, overlapped or not: one sequence (the tiles write their rows of the output
    in place) and a batch of two (the tiles are concatenated)."""
    return [f for b in (1, 2) for f in _tensor_parallel(group, score, causal, hkv, tiles, seed, b)]


def _tensor_parallel(group, score, causal, hkv, tiles, seed, b):
    size = dist.get_world_size(group)
    dim, hq, hd, n = 16, 4, 4, 11
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    x = _rand((b, n, dim), dt, gen)
    wq, wk, wv = _rand((hq * hd, dim), dt, gen) * 0.3, _rand((hkv * hd, dim), dt, gen) * 0.3, _rand((hkv * hd, dim), dt, gen) * 0.3
    wo = _rand((dim, hq * hd), dt, gen) * 0.3
    bq, bk, bv, bo = _rand((hq * hd,), dt, gen), _rand((hkv * hd,), dt, gen), _rand((hkv * hd,), dt, gen), _rand((dim,), dt, gen)
    dy = _rand((b, n, dim), dt, gen)
    window = (3, 0) if causal else (2, 3)
    # the unsplit layer, materialised
    leaves = [t.clone().requires_grad_() for t in (x, wq, wk, wv, wo, bq, bk, bv, bo)]
    xr, wqr, wkr, wvr, wor, bqr, bkr, bvr, bor = leaves
    qr = (xr @ wqr.T + bqr).view(b, n, hq, hd)
    kr = (xr @ wkr.T + bkr).view(b, n, hkv, hd)
    vr = (xr @ wvr.T + bvr).view(b, n, hkv, hd)
    a = oa.reference.attention(qr, kr, vr, score=score, causal=causal, window=window)
    y_ref = a.reshape(b, n, hq * hd) @ wor.T + bor
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    failures = []
    outs = {}
    from omniattn.nn import parallel

    parallel.LAST_TILE_MIN_PIECE, min_piece = 1, parallel.LAST_TILE_MIN_PIECE  # the last tile's projection in pieces
    for overlap in (True, False):
        layer = ParallelAttention(dim, hq, hkv, group=group, score=score, causal=causal, window=window,
                                        bias=True, tiles=tiles, overlap=overlap, backend="torch", dtype=dt)
        layer.load_dense_weights(wq, wk, wv, wo, bq, bk, bv, bo)
        xl = x.clone().requires_grad_()
        y = layer(xl)
        y.backward(dy)
        outs[overlap] = y.detach()
        label = f"tp={size} b={b} {score} causal={causal} hkv={hkv} tiles={tiles} overlap={overlap}"
        scale = magnitude(y_ref, *grads_ref)
        _check(failures, f"{label} y", y.detach(), y_ref.detach(), y_ref.detach(), dt)
        _check(failures, f"{label} dx", xl.grad, grads_ref[0], grads_ref[0], dt, scale)
        ref_layer = ParallelAttention(dim, hq, hkv, group=group, bias=True, backend="torch", dtype=dt)
        ref_layer.load_dense_weights(*grads_ref[1:])  # the reference gradients cut like the weights
        for name in ("qkv_weight", "out_weight", "qkv_bias", "out_bias"):
            r = getattr(ref_layer, name).detach()
            _check(failures, f"{label} d{name}", getattr(layer, name).grad, r, r, dt, scale)
    parallel.LAST_TILE_MIN_PIECE = min_piece
    if not torch.allclose(outs[True], outs[False], rtol=0, atol=1e-13):
        failures.append(f"b={b}: overlap vs plain differ by {max_err(outs[True], outs[False]):.2e}")
    return failures


def case_tensor_parallel_autocast(group):
    """ParallelAttention with float32 weights under autocast (bfloat16): the output in bfloat16, the
    gradients in the weights' and input's float32, close to the float32 layer; one sequence (tiles
    written in place) and a batch of two."""
    dim, hq, hkv, n = 32, 4, 2, 37
    failures = []
    for b in (1, 2):
        gen = torch.Generator().manual_seed(21 + b)
        x = _rand((b, n, dim), torch.float32, gen)
        dy = _rand((b, n, dim), torch.float32, gen)
        torch.manual_seed(3)  # the same weights on every rank for both layers
        layer = ParallelAttention(dim, hq, hkv, group=group, causal=True, bias=True, tiles=3, backend="torch")
        results = []
        for amp in (False, True):
            layer.zero_grad()
            xl = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = layer(xl)
            y.float().backward(dy)
            results.append((y.detach(), xl.grad, layer.qkv_weight.grad.clone(), layer.out_weight.grad.clone(),
                            layer.out_bias.grad.clone()))
        (y32, *g32), (y16, *g16) = results
        if y16.dtype != torch.bfloat16:
            failures.append(f"b={b}: autocast output is {y16.dtype}, expected bfloat16")
        for name, want, got in zip(("y", "dx", "dqkv_weight", "dout_weight", "dout_bias"), (y32, *g32), (y16, *g16)):
            if got.dtype != want.dtype and name != "y":
                failures.append(f"b={b}: {name} is {got.dtype}, expected {want.dtype}")
            err = max_err(got.float(), want)
            if not err <= 3e-2 * (want.abs().max().item() + 1e-6):
                failures.append(f"b={b}: {name} under autocast is {err:.2e} from float32")
    return failures


def case_autocast(group):
    """Context-parallel attention and HSTU under autocast (bfloat16) with float32 shards: computed as
    the bfloat16 shards are, output in bfloat16, gradients to the float32 shards in float32."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator().manual_seed(17)
    q, k, v, dout, cu = _problem("dense", (4 * size,), 4, 2, 8, 8, torch.float32, gen, batch=1)
    rows = _local_rows(_layout("dense", (4 * size,), size, "zigzag"), rank)
    ql, kl, vl = (_shard_rows(t, rows, "dense") for t in (q, k, v))
    hq, hk, hv = ql[0], ql[0] * 0.5, ql[0].flip(-1)  # HSTU: (T_local, H, D), as many kv heads as q heads
    offsets = torch.tensor([0, 4 * size], dtype=torch.int32)
    failures = []
    for name, fn, args in (
        ("cp", lambda a, b, c: cp.context_parallel_attention(a, b, c, group=group, causal=True, backend="torch"),
         (ql, kl, vl)),
        ("cp-hstu", lambda a, b, c: cp.context_parallel_hstu_attention(a, b, c, offsets, 4 * size, group=group,
                                                                       backend="torch"), (hq, hk, hv)),
    ):
        leaves = [t.clone().requires_grad_() for t in args]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(*leaves)
        want = fn(*(t.bfloat16() for t in args))
        if got.dtype != torch.bfloat16 or not torch.equal(got, want):
            failures.append(f"{name}: under autocast {got.dtype}, {max_err(got.float(), want.float()):.2e} from bfloat16 shards")
        got.float().sum().backward()
        if any(t.grad is None or t.grad.dtype != torch.float32 for t in leaves):
            failures.append(f"{name}: the float32 shards got no float32 gradient")
    return failures


def case_compile(group, strategy):
    """Under torch.compile (dynamo; graphs run eagerly): the same result and gradients as without,
    and the all-gather strategy's K/V gather is a functional collective inside a compiled graph."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator().manual_seed(11)
    q, k, v, dout, cu = _problem("dense", (4 * size,), 4, 1, 8, 8, torch.float64, gen, batch=1)
    rows = _local_rows(_layout("dense", (4 * size,), size, "zigzag"), rank)
    ql, kl, vl, dl = (_shard_rows(t, rows, "dense") for t in (q, k, v, dout))

    def layer(q, k, v):
        return cp.context_parallel_attention(q * 2, k, v, group=group, causal=True, strategy=strategy, backend="torch") + 1

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    failures = []
    results = []
    for fn in (layer, torch.compile(layer, backend=recording_backend)):
        leaves = [t.clone().requires_grad_() for t in (ql, kl, vl)]
        out = fn(*leaves)
        results.append((out.detach(), *torch.autograd.grad(out, leaves, dl)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        if not torch.allclose(a, b, rtol=0, atol=1e-12):
            failures.append(f"compiled {strategy} {name}: differs by {max_err(a, b):.2e}")
    if strategy == "allgather" and not any("_c10d_functional.all_gather" in code for code in graphs):
        failures.append("no functional all-gather in the compiled graphs")
    return failures


class _Block(torch.nn.Module):
    """A residual attention block: the unsplit model (group None) or its context-parallel twin."""

    def __init__(self, dim, heads, group=None):
        super().__init__()
        self.qkv, self.out, self.heads, self.group = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads, group

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        if self.group is None:
            o = oa.attention(q, k, v, causal=True, backend="torch")
        else:
            o = cp.context_parallel_attention(q, k, v, group=self.group, causal=True, backend="torch")
        return x + self.out(o.reshape(b, n, d))


def case_fsdp2(group):
    """The README recipe: FSDP2 over a flattened (dp, cp) mesh, context parallel attention on
    mesh["cp"]; the parameters' gradients equal the unsplit model's on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    torch.manual_seed(0)
    ref = torch.nn.Sequential(_Block(16, 2), _Block(16, 2)).double()
    model = torch.nn.Sequential(_Block(16, 2, mesh["cp"]), _Block(16, 2, mesh["cp"])).double()
    model.load_state_dict(ref.state_dict())
    flat = mesh["dp", "cp"]._flatten("dp_cp")
    for block in model:
        fully_shard(block, mesh=flat)
    fully_shard(model, mesh=flat)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # (dp, B, N, dim)
    ref(x.flatten(0, 1)).pow(2).mean().backward()
    local = cp.shard(x[mesh.get_local_rank("dp")], mesh["cp"])
    model(local).pow(2).mean().backward()  # the mean over local tokens; FSDP averages over dp x cp
    failures = []
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.full_tensor()
        _check(failures, f"fsdp2 d{name}", g, p_ref.grad, p_ref.grad, torch.float64, magnitude(p_ref.grad))
    return failures


def case_shard_helpers(group):
    """shard / unshard / shard_positions and the gathered reference agree with the layout."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    failures = []
    x = torch.arange(2 * 8 * size).view(2, 8 * size).float()
    for lb in ("zigzag", None):
        local = cp.shard(x, group, lb)
        if not torch.equal(cp.unshard(local, group, lb), x):
            failures.append(f"unshard(shard(x)) != x ({lb})")
        pos = cp.shard_positions(8 * size, group, lb)
        if not torch.equal(local[0], pos.float()):
            failures.append(f"shard_positions ({lb}): {pos.tolist()} vs {local[0].tolist()}")
    cu = torch.tensor([0, 4 * size, 4 * size, 10 * size], dtype=torch.int32)
    t = torch.arange(10 * size).float()
    local = cp.shard(t, group, "zigzag", cu_seqlens=cu)
    if not torch.equal(cp.unshard(local, group, "zigzag", cu_seqlens=cu), t):
        failures.append("unshard(shard(x)) != x (packed)")
    # uneven contiguous shards gather back in rank order
    piece = torch.full((rank + 1,), float(rank))
    want = torch.cat([torch.full((r + 1,), float(r)) for r in range(size)])
    if not torch.equal(cp.unshard(piece, group, None, dim=0), want):
        failures.append("unshard of uneven shards")
    gen = torch.Generator().manual_seed(2)
    q, k, v = (_rand((1, 4 * size + 3, 2, 8), torch.float64, gen) for _ in range(3))
    for lb, n in (("zigzag", 4 * size), (None, 4 * size + 3)):
        ql, kl, vl = (cp.shard(t[:, :n], group, lb) for t in (q, k, v))
        got = cp.context_parallel_attention(ql, kl, vl, group=group, causal=True, load_balance=lb, backend="torch")
        want = cp.reference.context_parallel_attention(ql, kl, vl, group=group, causal=True, load_balance=lb)
        _check(failures, f"distributed.reference {lb}", got, want, want, torch.float64)
    return failures


def case_bench_out_of_memory_agreement(group):
    """Only rank 0 runs out of memory (in its first timed call): every rank gets None at the same
    point, and the group's next collective still pairs up."""
    from omniattn.bench import distributed as bench

    rank = dist.get_rank(group)
    clock = bench.Clock(group, torch.device("cpu"))
    calls = []

    def step():
        calls.append(1)
        if rank == 0 and len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    failures = []
    if clock.time_ms(step, 1, 3, out_of_memory_ok=True) is not None:
        failures.append(f"rank {rank}: a measurement in which rank 0 ran out of memory was timed")
    after = torch.tensor([float(rank + 1)])
    dist.all_reduce(after, group=group)
    if after.item() != sum(range(1, dist.get_world_size(group) + 1)):
        failures.append(f"rank {rank}: the next all-reduce gave {after.item()}")
    return failures


def case_bench_smoke(group):
    """The multi-GPU benchmark's per-rank code at tiny sizes on gloo: rows in the results format."""
    from omniattn.bench import distributed as bench

    rows = bench.run_rank(group, bench.smoke_config(), device=torch.device("cpu"))
    failures = []
    if dist.get_rank(group) == 0:
        ops = {r["op"] for r in rows}
        for op in ("cp-softmax", "cp-sigmoid", "cp-hstu", "tp-allreduce"):
            if op not in ops:
                failures.append(f"no {op} row")
        for r in rows:
            if "error" in r:
                failures.append(f"row failed: {r}")
            if r.get("max_err") is not None and not r["max_err"] < 1e-4:  # fp32 against a float32 recomputation
                failures.append(f"large error: {r}")
            for key in ("op", "impl", "mode", "dtype", "seqlen", "heads", "head_dim", "causal", "ms", "world_size",
                        "strategy"):
                if key not in r:
                    failures.append(f"row without {key}: {r}")
        if not any(r.get("efficiency") for r in rows if r["op"].startswith("cp-") and r["world_size"] > 1):
            failures.append("no efficiency")
    return failures


# --------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize("kind,load_balance", [("dense", "zigzag"), ("varlen", "zigzag"), ("dense", None), ("varlen", None)])
def test_scores_masks_gqa(pool, size, strategy, kind, load_balance):
    dtype = "fp32" if (size, kind) == (2, "dense") else "fp64"
    pool.run("case_matrix", size, strategy, kind, load_balance, dtype, 100 * size)


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize("kind", ["dense", "varlen"])
def test_windows(pool, strategy, kind):
    pool.run("case_windows", 4, strategy, kind, 3)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_uneven_and_empty_shards(pool, size, strategy):
    pool.run("case_uneven", size, strategy, 9)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("load_balance", ["zigzag", None])
def test_hstu(pool, size, load_balance):
    pool.run("case_hstu", size, load_balance, 21)


def test_group_of_one_rank_is_plain_attention(pool):
    pool.run("case_single_rank_group", 1)


@pytest.mark.parametrize("size", [2, 4])
def test_bad_inputs_raise_on_every_rank(pool, size):
    pool.run("case_bad_inputs", size)


def test_triton_backend_blocks(pool):
    pool.run("case_triton_interpreter", 2, "ring")


@pytest.mark.parametrize("size,score,causal,hkv,tiles", [
    (2, "softmax", True, 2, 3), (2, "sigmoid", False, 4, 4), (4, "silu", True, 4, 2), (4, "softmax", False, 4, 5)])
def test_tensor_parallel_tiling_allreduce(pool, size, score, causal, hkv, tiles):
    pool.run("case_tensor_parallel", size, score, causal, hkv, tiles, 13)


def test_context_parallel_under_autocast(pool):
    pool.run("case_autocast", 2)


def test_tensor_parallel_under_autocast(pool):
    pool.run("case_tensor_parallel_autocast", 2)


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_torch_compile(pool, strategy):
    pool.run("case_compile", 2, strategy)


def test_fsdp2_recipe(pool):
    pool.run("case_fsdp2", 4)


def test_shard_helpers(pool):
    pool.run("case_shard_helpers", 4)


def test_benchmark_out_of_memory_on_one_rank(pool):
    pool.run("case_bench_out_of_memory_agreement", 2)


def test_benchmark_smoke(pool):
    pool.run("case_bench_smoke", 2)

"""HSTU's relative bias in the Triton kernels: time buckets (every gap, gaps at the bucket edges),
targets, causal or not, against the reference (outputs and every gradient, weights included).

Runs under TRITON_INTERPRET=1 on CI (float32: the interpreter's bf16 is wrong)."""

import pytest
import torch

import triton
import triton.language as tl

import omniattn as oa
from omniattn.backends.triton import _kernel_timestamps, supported
from omniattn.backends.triton.common import time_bucket
from omniattn.hstu.relative_bias import bucket_edges, bucketize

from .helpers import check_outputs_and_grads, rand, varlen_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not supported(torch.device(DEVICE), explicit=True)[0],
                                reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")


def _timestamps(kind: str, n: int, gen) -> torch.Tensor:
    if kind == "close":  # sorted, small gaps: tiles off the diagonal span few buckets (threshold path)
        return torch.randint(1, 40, (n,), generator=gen).cumsum(0)
    if kind == "unsorted":
        return torch.randint(0, 5000, (n,), generator=gen)
    if kind == "edges":  # consecutive gaps at a bucket edge, one below or one above it
        edges = bucket_edges(20, "log")[1:-1].double().round().long()
        gaps = edges[torch.randint(0, 20, (n,), generator=gen)] + torch.randint(-1, 2, (n,), generator=gen)
        return gaps.cumsum(0)
    if kind == "huge":  # gaps beyond int32: the float32 path must take over
        return torch.randint(0, 40, (n,), generator=gen).cumsum(0) * (1 << 33)
    return torch.full((n,), 7, dtype=torch.int64)  # "equal": every gap 0 -> bucket 0


CASES = [
    # (timestamps, num_buckets, bucketization, causal, targets, rab heads)
    ("close", 64, "log", True, None, None),
    ("close", 64, "sqrt", True, [0, 3, 1], 2),
    ("unsorted", 20, "log", True, [2, 0, 5], None),
    ("edges", 20, "log", False, None, None),
    ("huge", 128, "log", True, None, 2),
    ("equal", 8, "log", True, [1, 1, 1], None),
    ("close", 64, "log", False, [0, 4, 2], None),
    ("unsorted", 32, "sqrt", False, [3, 0, 1], 2),
]


def _poisoned_tables(monkeypatch, mode: str) -> list:
    """``mode`` "cached": the kernels' bias table (rab_cache) starts as NaN, so an entry read but
    never written fails the comparison; "per-pair": no table. Returns the list the tables built
    are recorded in."""
    from omniattn.backends.triton import rab_cache

    built = []
    if mode == "per-pair":  # the default: no budget for a table
        monkeypatch.delenv(rab_cache.BUDGET_ENV, raising=False)
        return built
    monkeypatch.setenv(rab_cache.BUDGET_ENV, "64")

    def poisoned(rows, stride, device):
        built.append((rows, stride))
        return torch.full((rows, stride), float("nan"), device=device)

    monkeypatch.setattr(rab_cache, "new_table", poisoned)
    return built


def _bias_problem(lens, num_buckets, ts_kind, gen, bucketization="log", heads=None):
    """A float32 varlen problem (2 heads of 16), a RelativeBias with random weights (max_seq_len 64)
    and timestamps of ``ts_kind``."""
    p = varlen_problem(lens, lens, 2, 2, 16, 16, torch.float32, gen, DEVICE)
    rab = oa.hstu.RelativeBias(64, num_buckets=num_buckets, bucketization=bucketization, num_heads=heads).to(DEVICE)
    with torch.no_grad():
        rab.pos_w.copy_(rand(rab.pos_w.shape, torch.float32, gen, DEVICE))
        rab.ts_w.copy_(rand(rab.ts_w.shape, torch.float32, gen, DEVICE))
    return p, rab, _timestamps(ts_kind, sum(lens), gen).to(DEVICE)


def _check_hstu(p, rab, gen, **kw) -> None:
    """The Triton HSTU call against the reference: output and every gradient, the bias weights' too."""
    def fn():
        return oa.hstu_attention(p.q, p.k, p.v, p.varlen[0], 64, backend="triton", rab=rab, **kw)

    def ref(dtype):
        return oa.reference.hstu_attention(p.q, p.k, p.v, p.varlen[0], 64, dtype=dtype, rab=rab, **kw)

    check_outputs_and_grads(p, "triton", gen, extra_leaves=[rab.pos_w, rab.ts_w], fn=fn, ref=ref)


# weights shared by the heads: the bias read from the call's table, and with the table turned off;
# per-head weights always take the per-pair path
TABLE_CASES = [(case, tables) for case in CASES
               for tables in (("cached", "per-pair") if case[-1] is None else ("cached",))]


@pytest.mark.parametrize("case, tables", TABLE_CASES,
                         ids=lambda c: "-".join(str(x) for x in c) if isinstance(c, tuple) else c)
def test_relative_bias_matches_reference(case, tables, monkeypatch):
    """Both ways the kernels get the bias: the per-call table (weights shared by the heads) and
    per pair (per-head weights, or the table turned off)."""
    kind, nb, bucketization, causal, targets, heads = case
    built = _poisoned_tables(monkeypatch, tables)
    gen = torch.Generator().manual_seed(10 * CASES.index(case))
    p, rab, ts = _bias_problem([37, 50, 21], nb, kind, gen, bucketization, heads)
    nt = torch.tensor(targets, device=DEVICE) if targets is not None else None
    _check_hstu(p, rab, gen, causal=causal, num_targets=nt, timestamps=ts)
    # the forward and the backward build the table when the weights are shared, never otherwise
    shared = heads is None and tables == "cached"
    assert len(built) == (2 if shared else 0), built


@pytest.mark.parametrize("causal", [True, False])
def test_relative_bias_table_with_contextual_prefix_and_max_attn_len(causal, monkeypatch):
    """The table (poisoned first) under the masks whose tiles the kernels visit in the most
    ways: a contextual prefix (the dK/dV kernel's extra pass over the prefix rows), a window of
    max_attn_len ids and targets, against the reference (outputs and every gradient)."""
    built = _poisoned_tables(monkeypatch, "cached")
    gen = torch.Generator().manual_seed(41 + causal)
    p, rab, ts = _bias_problem([53, 30, 44], 24, "unsorted", gen)
    _check_hstu(p, rab, gen, causal=causal, contextual_seq_len=3, max_attn_len=9,
                num_targets=torch.tensor([4, 0, 2], device=DEVICE), timestamps=ts)
    assert len(built) == 2, built


def test_relative_bias_table_only_within_its_budget(monkeypatch):
    """A call whose table would pass OMNIATTN_RAB_CACHE_MB computes the bias per pair (same
    results); a budget that is not a number of megabytes is a clear error."""
    from omniattn.backends.triton import rab_cache

    gen = torch.Generator().manual_seed(31)
    lens = [40, 23]
    p = varlen_problem(lens, lens, 2, 2, 16, 16, torch.float32, gen, DEVICE)
    rab = oa.hstu.RelativeBias(64, num_buckets=16).to(DEVICE)
    ts = _timestamps("unsorted", sum(lens), gen).to(DEVICE)
    built = []
    monkeypatch.setattr(rab_cache, "new_table", lambda *a: built.append(a) or torch.zeros(a[0], a[1], device=a[2]))

    def run():
        return oa.hstu_attention(p.q, p.k, p.v, p.varlen[0], 64, backend="triton", rab=rab, timestamps=ts)

    monkeypatch.delenv(rab_cache.BUDGET_ENV, raising=False)
    per_pair = run()
    table_bytes = sum(lens) * rab_cache.table_stride(max(lens)) * 4  # rows x the longest sequence
    monkeypatch.setenv(rab_cache.BUDGET_ENV, str((table_bytes - 1) / 2**20))
    torch.testing.assert_close(run(), per_pair, rtol=0, atol=0)
    assert built == []
    monkeypatch.setenv(rab_cache.BUDGET_ENV, str(table_bytes / 2**20))
    torch.testing.assert_close(run(), per_pair, rtol=0, atol=0)  # the table holds the per-pair values
    assert len(built) == 1
    monkeypatch.setattr(rab_cache, "MAX_ENTRIES", sum(lens) * rab_cache.table_stride(max(lens)) - 1)
    run()  # a table past 2^31 entries (here: past the patched limit) is never built, whatever the budget
    assert len(built) == 1
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(rab_cache.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match="OMNIATTN_RAB_CACHE_MB"):
            run()


@triton.jit
def _bucket_kernel(DT, EDGES, OUT, n, num_buckets, BUCKET_LOG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dt = tl.load(DT + offs, mask=offs < n, other=0)
    tl.store(OUT + offs, time_bucket(dt, EDGES, num_buckets, BUCKET_LOG, False), mask=offs < n)


@pytest.mark.parametrize("bucketization,num_buckets", [("log", 128), ("log", 7), ("sqrt", 64)])
def test_time_bucket_is_the_reference_bucket(bucketization, num_buckets):
    """The kernels' bucket (estimate + one edge comparison) equals the reference's float32 maths on
    every gap up to 4096, on random gaps of every size (negative too) and one either side of each edge."""
    gen = torch.Generator().manual_seed(1234)
    edges = bucket_edges(num_buckets, bucketization)
    finite = edges[torch.isfinite(edges)].double().clamp(max=2.0**62).round().long()
    dt = torch.cat([torch.arange(-5, 4096), torch.randint(-(2**62), 2**62, (4000,), generator=gen),
                    (finite[:, None] + torch.arange(-2, 3)).flatten(), torch.tensor([2**63 - 1, -(2**63) + 1])])
    out = torch.full_like(dt, -1, dtype=torch.int32).to(DEVICE)  # poisoned: unwritten entries fail
    _bucket_kernel[(triton.cdiv(dt.numel(), 1024),)](dt.to(DEVICE), edges.to(DEVICE), out, dt.numel(), num_buckets,
                                                      BUCKET_LOG=bucketization == "log", BLOCK=1024)
    torch.testing.assert_close(out.cpu().long(), bucketize(dt, num_buckets, bucketization), rtol=0, atol=0)


@pytest.mark.parametrize("dq_tiles, causal", [("32,16,1,1", True), ("32,16,1,1", False), ("16,32,1,1", True)])
def test_relative_bias_gradients_on_non_square_dq_tiles(dq_tiles, causal, monkeypatch):
    """The dQ kernel sums each tile's diagonals by rotating its rows; with more rows than columns a
    row wraps more than once (the GPU runs 64x32 tiles with the bias). Both shapes, against the
    reference, targets included (non-causal: history rows see the target keys too)."""
    monkeypatch.setenv("OMNIATTN_DQ_CONFIG", dq_tiles)
    gen = torch.Generator().manual_seed(77 + causal)
    p, rab, ts = _bias_problem([45, 29, 60], 32, "close", gen)
    _check_hstu(p, rab, gen, causal=causal, num_targets=torch.tensor([2, 0, 5], device=DEVICE), timestamps=ts)


@pytest.mark.parametrize("causal, heads_per_launch", [(True, 2), (False, 2), (True, 1)])
def test_query_windows_skip_rows_and_keep_the_read_ones(causal, heads_per_launch, monkeypatch):
    """Context-parallel HSTU reads a rank's rows of the whole batch (Call.query_windows): the
    kernels launch only the query tiles that meet those rows and visit only them from each key
    tile, and give the read rows' outputs, dQ, and dK/dV of the full call (the other rows: zero
    queries, zero output gradients). ``heads_per_launch`` 1: the float32 dK/dV budget forces one
    head per dK/dV launch (as 1M tokens x 32 heads do on a GPU)."""
    import dataclasses

    from omniattn import backends
    from omniattn import spec as _spec
    from omniattn.backends.triton import launch, launch_params

    if heads_per_launch == 1:
        monkeypatch.setattr(launch, "WINDOW_GRAD_BYTES", 153 * 64 * 4)  # one head's float32 dK + dV

    gen = torch.Generator().manual_seed(5)
    lens, windows = [70, 33, 50], (((0, 17), (52, 70)), ((9, 20),), ())  # windows: per sequence
    cu = torch.tensor([0, 70, 103, 153], dtype=torch.int32, device=DEVICE)
    q, k, v, dout = (rand((153, 2, 32), torch.float32, gen, DEVICE) for _ in range(4))
    read = torch.zeros(153, dtype=torch.bool, device=DEVICE)
    for s, ranges in enumerate(windows):
        for a, b in ranges:
            read[int(cu[s]) + a : int(cu[s]) + b] = True
    q, dout = q * read[:, None, None], dout * read[:, None, None]
    results = []
    for use_windows in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        spec, call = _spec.hstu_call(*leaves, cu, 70, alpha=0.2, causal=causal,
                                     num_targets=torch.tensor([3, 0, 5], device=DEVICE),
                                     contextual_seq_len=0, max_attn_len=0, rab=None, timestamps=None, silu_norm=None,
                                     precision="exact", backend="triton")
        if use_windows:
            call = dataclasses.replace(call, query_windows=windows)
        extras = launch_params(spec, call)[1]
        out = backends.run(spec, call, "triton")[0]
        results.append((extras, out, torch.autograd.grad(out, leaves, dout)))
    (full_x, full, full_g), (win_x, win, win_g) = results
    assert win_x.tiles_fwd.shape[0] < full_x.tiles_fwd.shape[0] and win_x.tiles_dq.shape[0] < full_x.tiles_dq.shape[0]
    assert win_x.q_windows is not None and full_x.q_windows is None
    assert launch.window_heads_per_launch(2, k, v) == heads_per_launch
    assert win_x.tiles_dkdv.shape[0] * (2 // heads_per_launch) == full_x.tiles_dkdv.shape[0]
    torch.testing.assert_close(win[read], full[read], rtol=0, atol=1e-6)
    torch.testing.assert_close(win_g[0][read], full_g[0][read], rtol=0, atol=1e-6)
    for got, want in zip(win_g[1:], full_g[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_query_windows_are_whole_tiles_and_never_overlap():
    from omniattn.backends.triton import schedule

    table = schedule.query_windows((((0, 17), (20, 40), (52, 70)), ((9, 20),), ()), 16, torch.device("cpu"))
    # (0, 17) -> [0, 32) meets (20, 40) -> [16, 48): one range; (52, 70) -> [48, 80): touches it, merged too
    assert table.tolist() == [[[0, 80], [0, 32], [0, 0]]]
    table = schedule.query_windows((((0, 10), (64, 70)),), 16, torch.device("cpu"))
    assert table.tolist() == [[[0, 16]], [[64, 80]]]


def test_kernel_timestamps_are_32_bit_offsets_where_the_span_fits():
    """int64 timestamps spanning less than 2^31 reach the kernels as int32 offsets from their
    minimum (every gap unchanged); a wider span, other dtypes and an empty tensor as given."""
    t = torch.tensor([1_700_000_000_123, 1_700_000_000_000, 1_700_000_000_000 + 2**31 - 1])
    got = _kernel_timestamps(t)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), t - t.min())
    assert torch.equal(got.long()[:, None] - got.long()[None, :], t[:, None] - t[None, :])
    wide = t.clone()
    wide[2] += 1  # span 2^31: a gap no longer fits
    for same in (wide, t.double(), t.to(torch.int32) * 0, torch.empty(0, dtype=torch.int64)):
        assert _kernel_timestamps(same) is same
    assert torch.equal(t, torch.tensor([1_700_000_000_123, 1_700_000_000_000, 1_700_000_000_000 + 2**31 - 1]))


@pytest.mark.parametrize("tables", ["per-pair", "cached"])
@pytest.mark.parametrize("span", ["near", "shifted", "far"])
@pytest.mark.parametrize("below", [False, True])
def test_each_pairs_bias_at_the_bucket_edges(tables, span, below, monkeypatch):
    """Every pair's bias on its own, at the gaps where a bucket starts (``below``: one less, the
    previous bucket's last gap): with q = k = 0, silu_norm 1 and one-hot values, output (i, j) is
    silu(pos_w[C + j - i] + ts_w[bucket]) of pair (i, j) alone, and neighbouring buckets' weights
    differ by 0.25. ``span``: "near", timestamps from 0; "shifted", all of them 1.7e12 later (past
    int32, while their span fits it: the kernels read 32-bit offsets); "far", every token but the
    first 2^40 later (gaps far past int32: the kernels read the int64 timestamps)."""
    built = _poisoned_tables(monkeypatch, tables)
    n, nb = 48, 40
    far = span == "far"
    gen = torch.Generator().manual_seed(3 + 2 * far + below)
    gaps = bucket_edges(nb, "log")[1:nb + 1].double().ceil().long() - int(below)
    t = torch.zeros(n, dtype=torch.long)
    t[2:2 + nb] = gaps  # t_next(i) - t_0 = gaps[i - 1]: the smallest gap of every bucket (or one less)
    t[2 + nb:] = gaps[-1] + torch.arange(1, n - 1 - nb) * 977
    if far:
        t[1:] += 2**40  # (then pair (i, 1) is the one at the edge)
    if span == "shifted":
        t += 1_700_000_000_000
    assert _kernel_timestamps(t).dtype == (torch.int64 if far else torch.int32)
    rab = oa.hstu.RelativeBias(n, nb).to(DEVICE)
    with torch.no_grad():
        rab.pos_w.copy_(rand(rab.pos_w.shape, torch.float32, gen, DEVICE))
        rab.ts_w.copy_(torch.arange(nb + 1) * 0.25 - 3.0)
    zeros = torch.zeros(n, 2, 16, device=DEVICE)
    v = torch.eye(n, device=DEVICE)[:, None, :].expand(n, 2, n).contiguous()
    offsets = torch.tensor([0, n], device=DEVICE)
    kw = dict(rab=rab, timestamps=t.to(DEVICE), silu_norm=1.0)
    with torch.no_grad():
        out = oa.hstu_attention(zeros, zeros, v, offsets, n, backend="triton", **kw)
        want = oa.reference.hstu_attention(zeros, zeros, v, offsets, n, dtype=torch.float64, **kw)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert len(built) == (1 if tables == "cached" else 0)

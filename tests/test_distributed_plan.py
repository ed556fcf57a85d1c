"""Context parallelism's host-side pieces, in one process: shard layouts, and the planner that
turns (query block, key block) pairs into exact kernel calls (checked element by element against
the true mask on random layouts, windows and uneven shards)."""

import math
import random

import pytest
import torch

from omniattn.distributed import blocks, layout as L, plan as PL
from omniattn.distributed.api import choose_strategy
from omniattn.distributed.comm import resolve_group


def _true_mask(lay, r, o, window):
    """(rows_r, rows_o) bool: query row of rank r may see key row of rank o (same sequence, band)."""
    lo, hi = PL.band(window)
    seq_q, pos_q = torch.full((lay.rows[r],), -1), torch.zeros(lay.rows[r], dtype=torch.long)
    seq_k, pos_k = torch.full((lay.rows[o],), -2), torch.zeros(lay.rows[o], dtype=torch.long)
    for seq, pos, segs in ((seq_q, pos_q, lay.segments[r]), (seq_k, pos_k, lay.segments[o])):
        for s in segs:
            seq[s.row : s.row + s.size] = s.seq
            pos[s.row : s.row + s.size] = torch.arange(s.start, s.stop)
    d = pos_k.view(1, -1) - pos_q.view(-1, 1)
    return (seq_q.view(-1, 1) == seq_k.view(1, -1)) & (d >= lo) & (d <= hi)


def _kernel_mask(lay, r, o, window):
    """What the planned calls compute: each piece's bottom-right-aligned window, counted."""
    count = torch.zeros(lay.rows[r], lay.rows[o], dtype=torch.int)
    for call in PL.plan_block(lay.segments[r], lay.segments[o], window, lay.dense):
        rows = [q for p in call.pieces for q in range(p.q0, p.q1)]
        assert len(rows) == len(set(rows)), "a call's pieces share query rows"
        assert all(p.window == call.window for p in call.pieces)
        for p in call.pieces:
            nq, nk = p.q1 - p.q0, p.k1 - p.k0
            lo, hi = PL.band(p.window)
            d = torch.arange(nk).view(1, -1) - torch.arange(nq).view(-1, 1) - (nk - nq)
            count[p.q0 : p.q1, p.k0 : p.k1] += ((d >= lo) & (d <= hi)).int()
    return count


def _random_layout(rng):
    world = rng.choice([1, 2, 3, 4])
    dense = rng.random() < 0.5
    zigzag = rng.random() < 0.5
    if dense:
        lengths = (2 * world * rng.randint(0, 5),) if zigzag else (rng.randint(0, 30),)
    else:
        n = rng.randint(1, 4)
        lengths = tuple(2 * world * rng.randint(0, 4) for _ in range(n)) if zigzag else tuple(rng.randint(0, 20) for _ in range(n))
    if zigzag:
        return L.build(lengths, world, dense, "zigzag")
    total = sum(lengths)
    cuts = sorted(rng.randint(0, total) for _ in range(world - 1))
    return L.build(lengths, world, dense, None, [b - a for a, b in zip([0] + cuts, cuts + [total])])


WINDOWS = [(-1, -1), (-1, 0), (3, 0), (0, 0), (5, 2), (-1, 3), (2, -1), (0, -1), (7, 7), (1, 9)]


def test_planned_calls_compute_exactly_the_true_mask():
    rng = random.Random(1234)
    for _ in range(150):
        lay = _random_layout(rng)
        window = rng.choice(WINDOWS)
        for r in range(lay.world):
            for o in range(lay.world):
                want = _true_mask(lay, r, o, window)
                got = _kernel_mask(lay, r, o, window)
                assert got.numel() == 0 or got.max() <= 1, f"a pair computed twice: {lay} {window} {r} {o}"
                assert torch.equal(got.bool(), want), f"mask differs: {lay} window={window} ranks {r}, {o}"


def test_zigzag_causal_steps_are_one_call_each():
    """The load-balanced causal ring: every step is one kernel call of equal work on every rank."""
    world, n = 4, 64
    lay = L.build((n,), world, True, "zigzag")
    c = n // (2 * world)
    for r in range(world):
        work = 0
        for step in range(world):
            calls = PL.plan_block(lay.segments[r], lay.segments[(r - step) % world], (-1, 0), True)
            assert len(calls) == 1
            p = calls[0].pieces[0]
            if step == 0:  # the diagonal: [chunk r, chunk 2P-1-r] against itself, causal
                assert (p.q0, p.q1, p.k0, p.k1, p.window) == (0, 2 * c, 0, 2 * c, (-1, 0))
                work += (2 * c) ** 2 // 2
            else:  # a block of earlier keys or later queries: unmasked
                assert p.window == (-1, -1)
                work += (p.q1 - p.q0) * (p.k1 - p.k0)
        assert work == 2 * c * c + (world - 1) * 2 * c * c


def test_zigzag_layout_and_indices():
    lay = L.build((8,), 2, True, "zigzag")
    assert L.global_rows(lay, 0).tolist() == [0, 1, 6, 7]
    assert L.global_rows(lay, 1).tolist() == [2, 3, 4, 5]
    packed = L.build((8, 0, 4), 2, False, "zigzag")
    assert L.global_rows(packed, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert L.positions(packed, 1).tolist() == [2, 3, 4, 5, 1, 2]
    # gathered buffers [rank 0 rows, rank 1 rows] back to global order
    assert L.gathered_index(lay, 4).tolist() == [0, 1, 4, 5, 6, 7, 2, 3]
    assert L.gathered_index(L.build((8,), 2, True, None), 4) is None  # even contiguous: already in order
    uneven = L.build((7,), 2, True, None, (2, 5))
    assert L.gathered_index(uneven, 5).tolist() == [0, 1, 5, 6, 7, 8, 9]  # rank 0 padded to 5 rows


def test_zigzag_needs_lengths_divisible_by_twice_the_ranks():
    with pytest.raises(ValueError, match="multiple of 4"):
        L.build((10,), 2, True, "zigzag")
    with pytest.raises(ValueError, match="sequence 1 has 6 tokens"):
        L.build((8, 6), 2, False, "zigzag")


def test_contiguous_packed_layout_straddles_sequences():
    lay = L.build((3, 0, 4), 2, False, None, (5, 2))
    assert lay.segments[0] == (L.Segment(0, 0, 3, 0), L.Segment(2, 0, 2, 3))
    assert lay.segments[1] == (L.Segment(2, 2, 4, 0),)
    assert L.even_split(7, 3) == (3, 2, 2)


def test_ranges_index():
    assert L.ranges_index([5, 0, 9], [2, 0, 3]).tolist() == [5, 6, 9, 10, 11]
    assert L.ranges_index([], []).numel() == 0


def test_softmax_merge_of_partials():
    """Merging two halves of the keys equals the whole; empty rows stay 0 / -inf; NaN stays NaN."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, 10, generator=gen, dtype=torch.float64)  # (B, H, N, keys)
    v = torch.randn(2, 10, 3, 4, generator=gen, dtype=torch.float64)  # (B, keys, H, Dv)
    s[0, 1, 2, :] = -math.inf  # a row that sees nothing

    def part(a, b):
        lse = torch.logsumexp(s[..., a:b], -1)
        p = torch.exp(s[..., a:b] - lse.nan_to_num(neginf=0).unsqueeze(-1))
        return torch.einsum("bhnk,bkhd->bnhd", p, v[:, a:b]), lse

    acc = torch.zeros(2, 5, 3, 4, dtype=torch.float64)
    acc_lse = torch.full((2, 3, 5), -math.inf, dtype=torch.float64)
    for a, b in ((0, 4), (4, 10)):
        out, lse = part(a, b)
        blocks.merge_into(acc, acc_lse, blocks.Rows(0, 5), out, lse, dense=True)
    want, want_lse = part(0, 10)
    assert torch.allclose(acc, want.nan_to_num(), atol=1e-12) and torch.allclose(acc_lse, want_lse)
    assert acc[0, 2, 1].abs().sum() == 0 and acc_lse[0, 1, 2] == -math.inf
    out, lse = part(0, 4)
    lse[1, 0, 0] = math.nan
    blocks.merge_into(acc, acc_lse, blocks.Rows(index=torch.tensor([4, 0, 1, 2, 3])), out, lse, dense=True)
    assert torch.isnan(acc[1, 4, 0]).all() and not torch.isnan(acc[0]).any()


def test_strategy_rule_and_uninitialised_group():
    assert choose_strategy(32, 8) == "allgather" and choose_strategy(32, 32) == "ring" and choose_strategy(8, 4) == "ring"
    with pytest.raises(RuntimeError, match="init_process_group"):
        resolve_group(None)


@pytest.mark.parametrize("n, tiles", [(32768, 4), (8192, 3), (1001, 3), (7, 4), (5, 8), (9, 1)])
def test_tiling_allreduce_rows(n, tiles):
    """Every row in exactly one tile, even shares, boundaries on the kernels' block grid where n allows."""
    from omniattn.nn.parallel import TILE_ALIGN, tile_rows

    rows = tile_rows(n, tiles)
    assert len(rows) == tiles and sum(rows) == n and min(rows) >= 0
    align = TILE_ALIGN if n >= TILE_ALIGN * tiles else 1
    assert all(sum(rows[: t + 1]) % align == 0 for t in range(tiles - 1))
    assert max(rows) - min(rows) <= align


@pytest.mark.parametrize("rows", [8192, 5000, 2047, 100, 1])
def test_last_tile_projection_pieces(rows):
    """The last tile's projection pieces: halving, on the block grid, every row once, none below the minimum."""
    from omniattn.nn.parallel import LAST_TILE_MIN_PIECE, TILE_ALIGN, last_tile_pieces

    pieces = last_tile_pieces(rows)
    assert sum(pieces) == rows and all(p > 0 for p in pieces)
    assert all(p % TILE_ALIGN == 0 for p in pieces[:-1])
    assert len(pieces) == 1 or min(pieces) >= LAST_TILE_MIN_PIECE
    assert all(a >= b for a, b in zip(pieces[:-2], pieces[1:-1]))


def test_benchmark_compare_to_fewer_gpus():
    """--compare-to: a context-parallel row gains its per-GPU throughput over the same problem's on
    fewer GPUs; other lengths, strategies, the tiling-AllReduce rows and equal world sizes don't."""
    from omniattn.bench.distributed import compare_to

    def row(op, n, world, strategy, per_gpu):
        return dict(op=op, mode="fwdbwd", seqlen=n, heads=32, kv_heads=8, head_dim=128, dtype="bf16",
                    world_size=world, strategy=strategy, tflops_per_gpu=per_gpu)

    two = [row("cp-softmax", 262144, 2, "ring", 340.0), row("cp-softmax", 262144, 2, "allgather", 300.0),
           row("cp-sigmoid", 262144, 2, "ring", 380.0), row("cp-softmax", 262144, 1, "single-gpu", 360.0)]
    four = [row("cp-softmax", 262144, 4, "ring", 306.0), row("cp-softmax", 1048576, 4, "ring", 330.0),
            row("cp-sigmoid", 262144, 4, "allgather", 350.0), row("cp-softmax", 262144, 2, "allgather", 310.0),
            dict(op="tp-allreduce", mode="fwd", seqlen=32768, world_size=4, strategy="tiling-allreduce")]
    compare_to(four, two)
    assert four[0]["efficiency_vs_2gpu"] == 0.9
    assert not any(k.startswith("efficiency_vs_") for r in four[1:] for k in r)


def test_benchmark_out_of_memory_becomes_a_row():
    """A measurement that runs out of GPU memory gives None (an error row), not a dead run; the
    ranks' agreement decides: a rank that fitted still reports None when another ran out."""
    import torch

    from omniattn.bench.distributed import Clock

    class FakeClock(Clock):  # the agreement of the other ranks, without a process group
        def __init__(self, others_failed):
            self.device, self.others_failed = torch.device("cpu"), others_failed

        def align(self):
            pass

        def agree_max(self, value):
            return max(value, 1.0 if self.others_failed else 0.0)

    calls = []

    def oom_on_second_call():
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    assert FakeClock(False).time_ms(lambda: None, 1, 2, out_of_memory_ok=True) >= 0
    assert FakeClock(False).time_ms(oom_on_second_call, 1, 2, out_of_memory_ok=True) is None  # the first timed call
    assert FakeClock(True).time_ms(lambda: None, 1, 1, out_of_memory_ok=True) is None

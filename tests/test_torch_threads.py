"""Issue 14, the CPU path under load: the tiled path's own worker threads (omniattn.backends.torch_threads).

Timing under a background load is measured by the benchmark, not here (see the CPU section of
the README); these tests pin down what makes that design correct: every tile op runs on one
intra-op thread, results do not depend on the thread count or on which worker ran what, the
caller's thread settings are left as they were, errors surface in the caller."""

import threading

import pytest
import torch

import omniattn as oa
from omniattn.backends import torch_threads

from .helpers import rand, varlen_problem


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_workers_run_one_intra_op_thread_and_leave_the_caller_alone(two_threads):
    seen = []
    torch_threads.run(lambda _, i: seen.append((i, torch.get_num_threads(), threading.get_ident())), range(6))
    assert sorted(i for i, _, _ in seen) == list(range(6))
    assert all(n == 1 for _, n, _ in seen), seen
    assert all(ident != threading.get_ident() for _, _, ident in seen)
    assert torch.get_num_threads() == 2
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [2], "threads created later start with the caller's count, not the workers' 1"


def test_one_thread_budget_runs_inline():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        idents = []
        torch_threads.run(lambda _, i: idents.append(threading.get_ident()), range(4))
        assert set(idents) == {threading.get_ident()}
    finally:
        torch.set_num_threads(before)


def test_states_errors_and_nesting(two_threads):
    states = torch_threads.run(lambda st, i: st.append(i), range(10), init=list)
    assert sorted(x for st in states for x in st) == list(range(10))

    def boom(_, i):
        if i == 3:
            raise RuntimeError("tile 3 failed")

    with pytest.raises(RuntimeError, match="tile 3 failed"):
        torch_threads.run(boom, range(8))
    inner = []
    torch_threads.run(lambda _, i: torch_threads.run(lambda __, j: inner.append((i, j)), range(3)), range(4))
    assert len(inner) == 12  # a call from a worker runs inline instead of waiting for busy workers


def _results(fn, leaves):
    for t in leaves:
        t.grad = None
    out = fn()
    out.backward(torch.ones_like(out))
    return [out.detach().clone()] + [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("case", ["dense-causal-silu", "dense-gqa-softmax-mask", "varlen-sigmoid-dropout"])
def test_results_are_bit_identical_for_any_thread_count(case):
    gen = torch.Generator().manual_seed(8)
    if case.startswith("dense"):
        q = rand((2, 300, 4, 32), torch.float32, gen).requires_grad_()
        hkv = 2 if "gqa" in case else 4
        k, v = (rand((2, 300, hkv, 32), torch.float32, gen).requires_grad_() for _ in range(2))
        mask = torch.rand(2, 1, 300, 300, generator=gen) > 0.2 if "mask" in case else None
        score = case.split("-")[-1] if "mask" not in case else "softmax"
        leaves = [q, k, v]

        def fn():
            return oa.attention(q, k, v, score=score, causal="causal" in case, attn_mask=mask, backend="torch")
    else:
        p = varlen_problem([100, 3, 257, 40], [90, 3, 300, 40], 4, 2, 16, 16, torch.float32, gen)
        leaves = p.leaves()

        def fn():
            torch.manual_seed(0)  # the dropout seed
            return oa.attention_varlen(p.q, p.k, p.v, *p.varlen, score="sigmoid", dropout_p=0.2, backend="torch")

    before = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            runs.append(_results(fn, leaves))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_second_derivatives(small_tiles, score):
    """Double backward (create_graph=True) runs the tiled backward with autograd recording."""
    gen = torch.Generator().manual_seed(2)
    leaves = [rand((1, 11, 1, 4), torch.float64, gen).requires_grad_() for _ in range(3)]

    def f(q, k, v):
        return oa.attention(q, k, v, score=score, causal=True, softcap=3.0, backend="torch")

    assert torch.autograd.gradgradcheck(f, tuple(leaves), eps=1e-6, atol=1e-7)


def test_a_forked_child_gets_its_own_workers(two_threads):
    """After fork (DataLoader workers), the child must not wait for the parent's threads."""
    import multiprocessing as mp

    torch_threads.run(lambda _, i: None, range(4))  # the parent's pool exists
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply_async(_child_attention).get(timeout=60)


def _child_attention():
    q = torch.randn(1, 600, 2, 16)
    torch.set_num_threads(2)
    out = oa.attention(q, q, q, score="sigmoid", backend="torch")
    return bool(torch.isfinite(out).all())


def test_thread_budget_is_per_thread_nests_and_restores():
    """longctx's host part runs beside the device part with fewer workers: the cap must bind only
    the thread that set it and come off afterwards."""
    cpu = torch.device("cpu")
    full = torch_threads.budget()
    seen = {}
    with torch_threads.thread_budget(1):
        assert torch_threads.workers_for(cpu, 64) == 1
        with torch_threads.thread_budget(5):  # never above the enclosing cap
            assert torch_threads.budget() == 1
        other = threading.Thread(target=lambda: seen.update(n=torch_threads.budget()))
        other.start()
        other.join()
    assert seen["n"] == torch.get_num_threads() and torch_threads.budget() == full

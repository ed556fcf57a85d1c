"""Worker threads for the tiled PyTorch path on CPUs: the tiles are the parallel work.

Why not PyTorch's own intra-op threads: every CPU op runs on its OpenMP team and ends in a
barrier, and the tiled path runs about ten ops per tile. When another process is busy on the
machine, one team member is descheduled and each barrier waits for it for up to a scheduler time
slice: the tiled path slowed 10-25x under load while a single fused op (SDPA) barely noticed.

Here independent pieces of work (query blocks) go to worker threads that run their ops on ONE
intra-op thread each and take the next piece when done: no barrier per op, a descheduled worker
delays only the piece it holds, and the others take the rest. PyTorch ops release the GIL, so the
workers compute in parallel; the Python between ops is a small share of a tile's time.

The pool is process-wide and grows to the caller's ``torch.get_num_threads()`` (the user's
thread budget is respected; with 1 thread everything runs inline in the caller).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Callable, Iterable, Optional

import torch

_local = threading.local()  # .worker is True inside a pool thread
_lock = threading.Lock()
_jobs: "queue.SimpleQueue[_Job]" = queue.SimpleQueue()
_workers: list[threading.Thread] = []


def _forget_workers_after_fork() -> None:
    """A forked child (e.g. a DataLoader worker) has none of the parent's threads: start afresh."""
    global _lock, _jobs
    _lock = threading.Lock()
    _jobs = queue.SimpleQueue()
    _workers.clear()


os.register_at_fork(after_in_child=_forget_workers_after_fork)


class _Job:
    """One call's pieces of work, shared by the workers that pick it up."""

    def __init__(self, fn: Callable, items: list, init: Callable, grad: bool, takers: int):
        self.fn, self.init, self.grad = fn, init, grad
        self.items = list(reversed(items))  # pop() from the end takes them in the given order
        self.items_lock = threading.Lock()
        self.states: list = []
        self.error: Optional[BaseException] = None
        self.pending = takers
        self.done = threading.Event()

    def next_item(self):
        with self.items_lock:
            if self.error is not None or not self.items:
                return None, False
            return self.items.pop(), True

    def work(self) -> None:
        state, started = None, False
        try:
            with torch.set_grad_enabled(self.grad):
                while True:
                    item, ok = self.next_item()
                    if not ok:
                        break
                    if not started:
                        state, started = self.init(), True
                    self.fn(state, item)
        except BaseException as e:  # re-raised in the caller
            with self.items_lock:
                self.error = self.error or e
        with self.items_lock:
            if started:
                self.states.append(state)
            self.pending -= 1
            if self.pending == 0:
                self.done.set()


def _worker_main(ready: threading.Barrier) -> None:
    _local.worker = True
    torch.get_num_threads()  # PyTorch's lazy per-thread init first: it would reset the count below
    torch.set_num_threads(1)  # this thread's OpenMP and MKL teams: one thread, no barriers
    ready.wait()
    while True:
        _jobs.get().work()


def _ensure_workers(n: int) -> None:
    with _lock:
        missing = n - len(_workers)
        if missing <= 0:
            return
        caller_threads = torch.get_num_threads()
        ready = threading.Barrier(missing + 1)
        for _ in range(missing):
            t = threading.Thread(target=_worker_main, args=(ready,), name="omniattn-tiles", daemon=True)
            t.start()
            _workers.append(t)
        ready.wait()
        # torch.set_num_threads in a worker also sets the count that threads created later
        # start with; put the caller's back (its own team is unchanged by this call).
        torch.set_num_threads(caller_threads)


def budget() -> int:
    """The caller's thread count (the one it had before :func:`caller_on_one_thread`)."""
    return getattr(_local, "budget", None) or torch.get_num_threads()


@contextlib.contextmanager
def caller_on_one_thread(device: torch.device):
    """Run the caller's own ops (planning, O(N) sums and copies around the tiles) on one intra-op
    thread: under load every parallel op pays an OpenMP barrier, a sum over 0.5M floats took
    8 ms with 2 threads against 0.03 ms with one. The tiles still use :func:`budget` workers."""
    n = torch.get_num_threads()
    if device.type != "cpu" or getattr(_local, "worker", False) or getattr(_local, "budget", None) or n == 1:
        yield
        return
    _local.budget = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _local.budget = None


@contextlib.contextmanager
def thread_budget(n: int):
    """Tiled calls made by this thread use at most ``n`` workers (thread-local; nests)."""
    before = getattr(_local, "budget", None)
    _local.budget = max(1, min(n, budget()))
    try:
        yield
    finally:
        _local.budget = before


def workers_for(device: torch.device, items: int) -> int:
    """How many threads a call with ``items`` independent pieces uses on ``device``."""
    if device.type != "cpu" or items < 1 or getattr(_local, "worker", False):
        return 1
    return max(1, min(items, budget()))


def run(fn: Callable, items: Iterable, init: Callable = lambda: None, device: torch.device = torch.device("cpu"),
        threads: Optional[int] = None) -> list:
    """Call ``fn(state, item)`` for every item, on up to ``threads`` workers (default
    :func:`workers_for`); each worker makes its own ``state = init()`` before its first item.
    Items are taken in the given order (put the longest first). Returns the states of the
    workers that took at least one item, to be reduced by the caller. Grad mode is the caller's.
    """
    items = list(items)
    n = workers_for(device, len(items)) if threads is None else threads
    if n <= 1:
        state = init()
        for item in items:
            fn(state, item)
        return [state] if items else []
    _ensure_workers(n)
    job = _Job(fn, items, init, torch.is_grad_enabled(), n)
    for _ in range(n):
        _jobs.put(job)
    job.done.wait()
    if job.error is not None:
        raise job.error
    return job.states

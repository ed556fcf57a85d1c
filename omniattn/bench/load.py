"""`omniattn bench --background-load N`: N busy processes beside the benchmark, as on a shared machine.

Each worker multiplies two 256x256 float32 matrices with one thread, over and over: a compute-
and cache-heavy neighbour like another training job, not a sleeping one. Workers start before the
first measurement (each reports once it is busy) and stop when the benchmark ends, including
when it is interrupted; a worker whose parent died (kill -9) notices and exits by itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue

SIZE = 256
READY_TIMEOUT_S = 120.0  # spawning imports torch in each worker; slow on a loaded machine


def _busy(stop, ready, parent: int) -> None:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(SIZE, SIZE), torch.randn(SIZE, SIZE)
    a @ b
    ready.put(os.getpid())
    n = 0
    while not stop.is_set():
        a @ b
        n += 1
        if n % 64 == 0 and os.getppid() != parent:  # orphaned: the benchmark was killed
            return


@contextlib.contextmanager
def background_load(n: int):
    """Run ``n`` busy worker processes for the duration of the ``with`` block (0: none)."""
    if n <= 0:
        yield []
        return
    ctx = mp.get_context("spawn")  # a fresh interpreter: no fork of this process's thread pools
    stop, ready = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_busy, args=(stop, ready, os.getpid()), daemon=True) for _ in range(n)]
    try:
        for w in workers:
            w.start()
        _wait_ready(ready, n)
        yield workers
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
                w.join(timeout=5)


def _wait_ready(ready, n: int) -> None:
    """Block until every worker is busy, so the first measurement already runs under the load."""
    for _ in range(n):
        try:
            ready.get(timeout=READY_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError(f"--background-load: {n} workers did not start within {READY_TIMEOUT_S:.0f} s") from None

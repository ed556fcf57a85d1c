"""The device's view of a host KV cache: a resident mirror of its prefix and double-buffered streaming.

``Mirror`` holds tokens [0, valid) of the cache on the device, up to its capacity; it lives on the
cache between calls (decoding reads the same prefix every step) and refills only what changed
(``HostKVCache.truncate`` lowers ``valid``). ``DeviceKV`` serves one call: it loads the missing part
of the mirror and streams the chunks past it through two buffers on its own CUDA stream. The copy
of a chunk waits (on the GPU, through an event) until the compute that last read its buffer is
done, and the compute waits for the copy's event: copy i+1 overlaps compute i with no host sync.

On a CPU device with ``stage=False`` nothing is copied: the "device" reads host memory directly
(exact storage; a quantized cache goes through the buffers, dequantized on the way).
"""

from __future__ import annotations

from typing import Optional

import torch

from .cache import dequantize


class Mirror:
    """Device copy of the cache's tokens [0, valid) in buffers of ``capacity`` tokens."""

    def __init__(self, cache, device: torch.device, capacity: int):
        self.device = device
        self.capacity = capacity
        b, h = cache.batch, cache.num_kv_heads
        self.k = torch.empty(b, capacity, h, cache.head_dim, dtype=cache.dtype, device=device)
        self.v = torch.empty(b, capacity, h, cache.v_dim, dtype=cache.dtype, device=device)
        self.valid = 0

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


STAGE_TOKENS = 1024  # quantized storage: tokens per staged copy (its values and scales on the device)


def _copy_tokens(dst_k, dst_v, cache, t0: int, t1: int, d0: int) -> None:
    """Host tokens [t0, t1) into device rows [d0, d0 + t1 - t0): one plain copy per batch entry.
    Quantized storage: the stored values and scales travel (half the bytes of 16-bit K/V) in
    pieces of STAGE_TOKENS and are dequantized into the rows on arrival, so the device holds
    ``dtype`` K/V as for exact storage, plus one piece of staging (~2 MiB at 8 kv heads of 128)."""
    for b in range(cache.batch):
        if not cache.quantized:
            dst_k[b, d0 : d0 + t1 - t0].copy_(cache._k[b, t0:t1], non_blocking=True)
            dst_v[b, d0 : d0 + t1 - t0].copy_(cache._v[b, t0:t1], non_blocking=True)
            continue
        for s0 in range(t0, t1, STAGE_TOKENS):
            s1 = min(s0 + STAGE_TOKENS, t1)
            rows = slice(d0 + s0 - t0, d0 + s1 - t0)
            for dst, values, scales in ((dst_k, cache._k, cache._ks), (dst_v, cache._v, cache._vs)):
                dev = dst.device
                dequantize(values[b, s0:s1].to(dev, non_blocking=True), scales[b, s0:s1].to(dev, non_blocking=True),
                           cache.dtype, out=dst[b, rows])


class DeviceKV:
    """Keys [0, end) of one call on ``device``: the mirrored prefix plus streamed chunks."""

    def __init__(self, cache, device: torch.device, resident_cap: int, chunk: int, end: int, stage: bool):
        self.cache, self.device, self.chunk = cache, device, chunk
        self.cuda = device.type == "cuda"
        # CPU, no staging, exact storage: read host memory in place
        self.direct = not self.cuda and not stage and not cache.quantized
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.loads: list[tuple[int, Optional[torch.cuda.Event]]] = []  # (mirror end after the load, event)
        self.slots: list = []
        self.slot_free: list = [None, None]
        self.next_slot = 0
        self.resident = end if self.direct else min(resident_cap, end)
        if not self.direct:
            self.mirror = self._mirror(resident_cap, end)
            self._after_compute()
            self._load_mirror()

    # -------------------------------------------------------------------- the resident prefix

    def _mirror(self, resident_cap: int, end: int) -> Optional[Mirror]:
        cache = self.cache
        want = min(resident_cap, end)
        m = cache._mirror
        if m is not None and (m.device != self.device or m.capacity > resident_cap or m.capacity < want):
            cache._mirror = m = None  # wrong place or size: free it before allocating (the budget)
        if m is None and want > 0:
            # room to grow for decoding without reallocating each step, within the budget
            cap = min(resident_cap, max(want + self.chunk, 2 * want) if want < resident_cap else want)
            m = cache._mirror = Mirror(cache, self.device, cap)
        return m

    def _load_mirror(self) -> None:
        """Issue copies of the mirror's missing tokens, chunk by chunk, each with an event."""
        m = self.mirror
        if m is None:
            return
        goal = self.resident
        while m.valid < goal:
            t0, t1 = m.valid, min(m.valid + self.chunk, goal)
            ev = self._on_copy_stream(lambda: _copy_tokens(m.k, m.v, self.cache, t0, t1, t0))
            m.valid = t1
            self.loads.append((t1, ev))

    def resident_kv(self, end: int):
        """Views (B, n, Hkv, D) of keys [0, min(end, resident)) for the compute stream (waits for their loads)."""
        n = min(end, self.resident)
        if self.direct:
            return self.cache._k[:, :n], self.cache._v[:, :n]
        for t1, ev in self.loads:
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)
            if t1 >= n:
                break
        return self.mirror.k[:, :n], self.mirror.v[:, :n]

    # -------------------------------------------------------------------- streamed chunks

    def _after_compute(self) -> None:
        """Buffers just allocated may reuse memory that queued compute still reads: copies wait for it."""
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def finish(self) -> None:
        """Later work on the compute stream (and frees of these buffers) comes after every copy."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def _on_copy_stream(self, copy) -> Optional[torch.cuda.Event]:
        if not self.cuda:
            copy()
            return None
        with torch.cuda.stream(self.copy_stream):
            copy()
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.cache.record_read(ev)
        return ev

    def issue(self, t0: int, t1: int):
        """Start copying tokens [t0, t1) (at most one chunk) into the next buffer; returns a handle."""
        if not self.slots:
            c = self.cache
            shape = (c.batch, self.chunk, c.num_kv_heads)
            self.slots = [(torch.empty(*shape, c.head_dim, dtype=c.dtype, device=self.device),
                           torch.empty(*shape, c.v_dim, dtype=c.dtype, device=self.device)) for _ in range(2)]
            self._after_compute()
        s = self.next_slot
        self.next_slot = 1 - s
        k, v = self.slots[s]
        if self.cuda and self.slot_free[s] is not None:
            self.copy_stream.wait_event(self.slot_free[s])  # the compute that last read this buffer
        ev = self._on_copy_stream(lambda: _copy_tokens(k, v, self.cache, t0, t1, 0))
        return s, t1 - t0, ev

    def wait(self, handle):
        """Views of a streamed chunk for the compute stream (waits for its copy)."""
        s, n, ev = handle
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        k, v = self.slots[s]
        return k[:, :n], v[:, :n]

    def release(self, handle) -> None:
        """The compute stream has queued every read of this buffer: it may be refilled after that."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.slot_free[handle[0]] = ev

    @property
    def device_kv_bytes(self) -> int:
        slots = sum(t.numel() * t.element_size() for pair in self.slots for t in pair)
        mirror = self.mirror.nbytes if not self.direct and self.mirror is not None else 0
        return slots + mirror

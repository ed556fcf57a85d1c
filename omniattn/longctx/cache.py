"""HostKVCache: one attention layer's K and V in host memory (pinned), growing as tokens arrive."""

from __future__ import annotations

from typing import Optional

import torch

from ..spec import FLOAT_DTYPES

INITIAL_CAPACITY = 4096  # tokens, when the capacity is not fixed; then it doubles as needed
# storage -> element dtype; one float32 scale per (entry, token, kv head) (quant.quantize_rows)
QUANTIZED_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected an int > 0, got {value!r}")
    return value


class HostKVCache:
    """K (B, capacity, Hkv, D) and V (B, capacity, Hkv, Dv) in host memory; tokens [0, len) are valid.

    Args:
        batch, num_kv_heads, head_dim: the layout of the keys; ``v_dim`` of the values (default head_dim).
        dtype: storage dtype (K and V appended must have it).
        pin_memory: page-locked host memory, so host->GPU copies run asynchronously at full link speed
            (only where a CUDA device exists; on CPU-only machines plain memory).
        capacity: tokens to allocate once, fixed (append beyond it raises); ``None`` starts at
            4096 tokens and doubles as needed (each growth copies the cache once: amortised O(1)).
        storage: ``"exact"`` (``dtype``), ``"int8"`` or ``"fp8"`` (e4m3): K and V stored quantized
            with one float32 scale per (entry, token, kv head) = amax over its channels / 127 (448),
            about half the host memory and host->GPU bytes of 16-bit storage (D=128: 0.52x). Tokens are
            dequantized to ``dtype`` when they reach the device (or the CPU part of a cooperative
            step), so attention runs on ``dtype`` values: the same results as an exact cache holding
            the dequantized ``k`` / ``v``.

    Each batch entry's tokens are contiguous (``[b, t0:t1]`` is one block), so a chunk of tokens
    travels to the GPU as B plain copies. A GPU mirror of a prefix of the cache (see
    :func:`omniattn.longctx.attention`) stays with the cache between calls; ``release_device()``
    frees it.

    Example::

        cache = HostKVCache(1, 8, 128)
        cache.append(k, v)          # (1, n, 8, 128) each, from any device
        out = omniattn.longctx.attention(q, cache, gpu_budget_bytes=2 << 30)
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, v_dim: Optional[int] = None,
                 dtype: torch.dtype = torch.bfloat16, pin_memory: bool = True, capacity: Optional[int] = None,
                 storage: str = "exact"):
        self.batch = _positive_int("batch", batch)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.v_dim = head_dim if v_dim is None else _positive_int("v_dim", v_dim)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dtype}")
        if storage != "exact" and storage not in QUANTIZED_STORAGE:
            raise ValueError(f"storage: expected 'exact', 'int8' or 'fp8', got {storage!r}")
        if not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory: expected a bool, got {type(pin_memory).__name__}")
        self.dtype = dtype
        self.storage = storage
        self.pinned = pin_memory and torch.cuda.is_available()
        self.fixed_capacity = capacity is not None
        cap = _positive_int("capacity", capacity) if capacity is not None else INITIAL_CAPACITY
        self._k, self._v, self._ks, self._vs = self._alloc(cap)
        self._len = 0
        self._mirror = None  # the device mirror of a prefix (longctx/stream.py), kept between calls
        self._reads: list = []  # CUDA events after asynchronous copies that read host memory

    # ----------------------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        return self.storage != "exact"

    def _alloc(self, cap: int):
        """K, V and (quantized storage) their scales (B, cap, Hkv) float32, else None."""
        stored = QUANTIZED_STORAGE[self.storage] if self.quantized else self.dtype
        shape = (self.batch, cap, self.num_kv_heads)
        k = torch.empty(*shape, self.head_dim, dtype=stored, pin_memory=self.pinned)
        v = torch.empty(*shape, self.v_dim, dtype=stored, pin_memory=self.pinned)
        if not self.quantized:
            return k, v, None, None
        return (k, v, torch.empty(shape, dtype=torch.float32, pin_memory=self.pinned),
                torch.empty(shape, dtype=torch.float32, pin_memory=self.pinned))

    def _tokens(self, values: torch.Tensor, scales: Optional[torch.Tensor], t0: int, t1: int) -> torch.Tensor:
        """Tokens [t0, t1) of K or V in ``dtype``: a view for exact storage, a dequantized copy else."""
        if scales is None:
            return values[:, t0:t1]
        return dequantize(values[:, t0:t1], scales[:, t0:t1], self.dtype)

    def dequantized(self, t0: int, t1: int):
        """K and V tokens [t0, t1) in ``dtype`` (views for exact storage, new tensors else)."""
        return self._tokens(self._k, self._ks, t0, t1), self._tokens(self._v, self._vs, t0, t1)

    def _wait_reads(self) -> None:
        """Host memory is about to change: let asynchronous copies that read it finish first."""
        for ev in self._reads:
            ev.synchronize()
        self._reads.clear()

    def record_read(self, event) -> None:
        """An asynchronous copy out of this cache's memory completes at ``event`` (a CUDA event)."""
        self._reads = [e for e in self._reads if not e.query()]
        self._reads.append(event)

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token position over the whole batch, in ``dtype``: what a token
        takes on the device (the budget's unit), whatever the storage."""
        return self.batch * self.num_kv_heads * (self.head_dim + self.v_dim) * self.dtype.itemsize

    @property
    def k(self) -> torch.Tensor:
        """Valid keys (B, len, Hkv, D) in ``dtype``: a view of host memory (quantized storage: a
        dequantized copy)."""
        return self._tokens(self._k, self._ks, 0, self._len)

    @property
    def v(self) -> torch.Tensor:
        return self._tokens(self._v, self._vs, 0, self._len)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (f"HostKVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"v_dim={self.v_dim}, dtype={self.dtype}, storage={self.storage!r}, len={self._len}, "
                f"capacity={self.capacity}, pinned={self.pinned})")

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add n tokens: k (B, n, Hkv, D), v (B, n, Hkv, Dv), from any device (copied, never kept)."""
        for name, t, d in (("k", k, self.head_dim), ("v", v, self.v_dim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor of shape ({self.batch}, n, {self.num_kv_heads}, {d}), "
                                f"got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != self.batch or t.shape[2] != self.num_kv_heads or t.shape[3] != d:
                raise ValueError(f"{name}: expected shape ({self.batch}, n, {self.num_kv_heads}, {d}), "
                                 f"got {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{name}: expected dtype {self.dtype} (the cache's), got {t.dtype}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"v: expected {k.shape[1]} tokens (as k), got {v.shape[1]}")
        n = k.shape[1]
        need = self._len + n
        if need > self.capacity:
            if self.fixed_capacity:
                raise ValueError(f"k: appending {n} tokens to {self._len} exceeds the fixed capacity {self.capacity}")
            self._grow(need)
        self._wait_reads()
        if self.quantized:
            from ..quant.quantize import quantize_rows

            (k, ks), (v, vs) = quantize_rows(k, self.storage), quantize_rows(v, self.storage)
            self._ks[:, self._len : need].copy_(ks)
            self._vs[:, self._len : need].copy_(vs)
        self._k[:, self._len : need].copy_(k)
        self._v[:, self._len : need].copy_(v)
        self._len = need

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        new = self._alloc(cap)
        self._wait_reads()
        for dst, src in zip(new, (self._k, self._v, self._ks, self._vs)):
            if src is not None:
                dst[:, : self._len].copy_(src[:, : self._len])
        self._k, self._v, self._ks, self._vs = new

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (0 <= n <= len): e.g. to drop rejected speculative tokens."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self._len:
            raise ValueError(f"n: expected an int in 0..{self._len} (the cache's length), got {n!r}")
        self._wait_reads()
        self._len = n
        if self._mirror is not None:
            self._mirror.valid = min(self._mirror.valid, n)

    def release_device(self) -> None:
        """Free the device mirror of this cache's prefix (it is rebuilt on the next call that needs it)."""
        self._mirror = None


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: Optional[torch.Tensor] = None):
    """values * scales (one scale per leading index of the last dim) in ``dtype``, into ``out`` if
    given: the values are converted into it, then scaled in place (float32 arithmetic per element,
    one rounding; no temporary of the full size)."""
    if out is None:
        out = torch.empty(values.shape, dtype=dtype, device=values.device)
    out.copy_(values)
    return out.mul_(scales.unsqueeze(-1))

"""Contexts beyond GPU memory: a host-resident KV cache, streamed attention within a device memory
budget, and CPU-GPU cooperative decoding (FastAttention's CPU-GPU strategy). Inference only.

    cache = omniattn.longctx.HostKVCache(batch, num_kv_heads, head_dim)
    cache.append(k, v)
    out = omniattn.longctx.attention(q, cache, gpu_budget_bytes=2 << 30)
"""

from .schedule import attention
from .cache import HostKVCache
from .calibrate import calibrate, set_bandwidths
from .plan import Bandwidths

__all__ = ["HostKVCache", "attention", "Bandwidths", "calibrate", "set_bandwidths"]

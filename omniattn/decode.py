"""Attention of a few new queries against a KV cache (decoding), dense or paged, every score function.

``attention_with_kvcache`` validates its arguments into a :class:`omniattn.spec.Spec` (the same
checks as every other entry point) and a :class:`KVCacheCall`, then runs the split-KV Triton
kernel (omniattn/backends/triton/decode.py) on GPUs, or the split-KV PyTorch path
(omniattn/backends/torch_decode.py) on any device. Inference only: nothing here records autograd.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import spec as _spec
from .spec import Spec

Tensor = torch.Tensor

DECODE_MAX_NQ = 16  # the decode regime: the Triton path packs (Hq/Hkv) x Nq rows into one tile


@dataclass
class KVCacheCall:
    """The tensors of one KV-cache call.

    ``q`` (B, Nq, Hq, D); ``k``/``v`` (B, S, Hkv, D|Dv), or paged (num_pages, page_size, Hkv, D|Dv)
    with ``block_table`` (B, max_pages) int32; ``seqlens`` (B,) int32 on q's device and ``lens``
    the same on the host: entry b has keys 0..lens[b]-1 and its query i sits at key position
    i + lens[b] - Nq.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    seqlens: Tensor
    lens: tuple[int, ...]
    block_table: Optional[Tensor] = None
    alibi: Optional[Tensor] = None  # (B, Hq) float32
    num_splits: int = 0  # 0: chosen from the SM count and the context length

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return max(self.lens, default=0)

    def keys(self, b: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        """K and V rows of entry b at ``positions`` (any shape P), shaped P + (Hkv, D)."""
        if not self.paged:
            return self.k[b, positions], self.v[b, positions]
        pages = self.block_table[b, positions // self.page_size].long()
        slots = positions % self.page_size
        return self.k[pages, slots], self.v[pages, slots]

    def contiguous_keys(self, b: int, j0: int, j1: int) -> Optional[tuple[Tensor, Tensor]]:
        """Views of keys j0..j1-1 of entry b when they need no gather (dense caches), else None."""
        if self.paged:
            return None
        return self.k[b, j0:j1], self.v[b, j0:j1]


# Host copies of cache_seqlens / block_table are checked once per tensor version (a decode loop
# passes the same tensors every step); the key is the tensor object itself through a weak reference.
_checked: dict = {}


def _host_values(name: str, t: Tensor, extra) -> Optional[list]:
    hit = _checked.get((name, id(t)))
    if hit is not None and hit[0]() is t and hit[1] == (t._version, extra):
        return hit[2]
    return None


def _remember(name: str, t: Tensor, extra, values) -> None:
    if len(_checked) > 128:
        _checked.clear()
    _checked[(name, id(t))] = (weakref.ref(t), (t._version, extra), values)


def _check_seqlens(cache_seqlens, batch: int, capacity: int, device) -> tuple[Tensor, tuple[int, ...]]:
    if cache_seqlens is None:
        return torch.full((batch,), capacity, dtype=torch.int32, device=device), (capacity,) * batch
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"cache_seqlens: expected an int32 tensor of shape ({batch},), "
                        f"got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens: expected dtype int32 (or int64), got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens: expected shape ({batch},) (one length per batch entry), "
                         f"got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens: expected a tensor on {device} (the device of q), got {cache_seqlens.device}")
    lens = _host_values("cache_seqlens", cache_seqlens, capacity)
    if lens is None:
        lens = tuple(int(x) for x in cache_seqlens.tolist())
        for b, n in enumerate(lens):
            if n < 0 or n > capacity:
                raise ValueError(f"cache_seqlens: entry {b} has {n} keys; expected 0..{capacity} "
                                 f"(the cache holds {capacity})")
        _remember("cache_seqlens", cache_seqlens, capacity, lens)
    return cache_seqlens.to(torch.int32).contiguous(), lens


def _check_block_table(block_table, batch: int, num_pages: int, device) -> Tensor:
    if not isinstance(block_table, Tensor):
        raise TypeError(f"block_table: expected an int32 tensor of shape ({batch}, max_pages), "
                        f"got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table: expected dtype int32 (flash-attn's paged layout), got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected shape ({batch}, max_pages), got {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table: expected a tensor on {device} (the device of q), got {block_table.device}")
    if num_pages == 0:
        raise ValueError("k_cache: a paged cache needs at least one page (shape (num_pages, page_size, heads, dim))")
    return block_table if block_table.stride(-1) == 1 else block_table.contiguous()


def _check_pages_in_range(block_table: Tensor, lens: tuple[int, ...], page_size: int, num_pages: int) -> None:
    key = (lens, page_size, num_pages)
    if _host_values("block_table", block_table, key) is not None:
        return
    host = block_table.cpu()
    for b, n in enumerate(lens):
        used = host[b, : -(-n // page_size)]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
            raise ValueError(f"block_table: entry {b} uses page ids outside 0..{num_pages - 1} "
                             f"(the cache has {num_pages} pages)")
    _remember("block_table", block_table, key, True)


def kvcache_call(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, num_splits,
                 **scalars) -> tuple[Spec, KVCacheCall]:
    """Validate ``attention_with_kvcache``'s arguments (see there)."""
    _spec._require_tensor("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
    layout = ("(num_pages, page_size, heads_kv, head_dim)" if block_table is not None
              else "(batch, seqlen_cache, heads_kv, head_dim)")
    _spec._require_tensor("k_cache", k_cache, 4, layout)
    _spec._require_tensor("v_cache", v_cache, 4, layout.replace("head_dim)", "head_dim_v)"))
    try:
        _spec._check_qkv_dtypes_devices(q, k_cache, v_cache)
        _spec._check_heads_and_dims(q, k_cache, v_cache, token_axes=2)
    except (TypeError, ValueError) as e:  # name the cache arguments as the caller does
        msg = str(e).replace("k: ", "k_cache: ", 1).replace("v: ", "v_cache: ", 1)
        raise type(e)(msg) from None
    batch = q.shape[0]
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache: expected batch {batch} (the batch of q), got {k_cache.shape[0]}; "
                             "a paged cache needs block_table")
        capacity = k_cache.shape[1]
    else:
        block_table = _check_block_table(block_table, batch, k_cache.shape[0], q.device)
        capacity = block_table.shape[1] * k_cache.shape[1]
    seqlens, lens = _check_seqlens(cache_seqlens, batch, capacity, q.device)
    if block_table is not None:
        _check_pages_in_range(block_table, lens, k_cache.shape[1], k_cache.shape[0])
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits: expected an int >= 0 (0 = chosen automatically), got {num_splits!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise ValueError("attention_with_kvcache is inference only (no gradients): call it under torch.no_grad() "
                         "or pass tensors that do not require grad")
    if scalars.get("silu_norm") is None and scalars.get("score") == "silu":
        scalars["silu_norm"] = float(max(max(lens, default=1), 1))  # DESIGN: max over the batch of cache_seqlens
    spec = _spec._check_common(head_dim=q.shape[-1], precision="exact", **scalars)
    alibi = _spec._check_alibi(alibi_slopes, batch, q.shape[2], q.device)
    return spec, KVCacheCall(q, k_cache, v_cache, seqlens, lens, block_table, alibi, num_splits)


def run(spec: Spec, call: KVCacheCall, backend: str, out_dtype: Optional[torch.dtype] = None):
    """(out (B, Nq, Hq, Dv), lse (B, Hq, Nq) float32 or None) from a validated call."""
    from . import backends

    name = backends.resolve_for_tensor(call.q) if backend == "auto" else backend
    if name == "triton":
        ok, why = backends.triton_supported(call.q.device, explicit=True)
        if not ok:
            raise NotImplementedError(f"backend='triton': {why}; use backend='torch' or 'auto'")
        from .backends.triton import check_inputs
        from .backends.triton.decode import DecodeParams, decode_forward

        check_inputs(call)  # head dims and dtypes the kernels take
        p = DecodeParams(
            score={"softmax": 0, "sigmoid": 1, "silu": 2}[spec.score],
            window_left=spec.window[0], window_right=spec.window[1], scale=spec.scale, softcap=spec.softcap,
            sigmoid_bias=spec.sigmoid_bias, silu_scale=1.0 / spec.silu_norm if spec.silu_norm else 1.0,
        )
        return decode_forward(call.q, call.k, call.v, call.seqlens, call.block_table, call.alibi, p, call.max_len,
                              call.num_splits, out_dtype)
    if name == "reference":
        return _reference(spec, call, out_dtype)
    from .backends import torch_decode

    return torch_decode.attention(spec, call, out_dtype)


def _reference(spec: Spec, call: KVCacheCall, out_dtype):
    """The maths materialised, entry by entry (gathers each entry's keys): for tests and checks."""
    from . import reference

    outs, lses = [], []
    cdtype = torch.float64 if call.q.dtype == torch.float64 else torch.float32
    for b, n in enumerate(call.lens):
        k, v = call.keys(b, torch.arange(n, device=call.q.device))
        s = spec
        if spec.score == "sigmoid" and spec.sigmoid_bias is None:
            s = dataclasses.replace(spec, sigmoid_bias=-math.log(max(n, 1)))
        sub = _spec.Call(call.q[b : b + 1], k[None], v[None], None, None, (call.q.shape[1],), (n,), call.q.shape[1], n,
                         alibi=call.alibi[b : b + 1] if call.alibi is not None else None)
        o, lse = reference.run(s, sub, cdtype)
        outs.append(sub.unpack(o))
        lses.append(sub.unpack_lse(lse) if lse is not None else None)
    out = torch.cat(outs).to(out_dtype or call.q.dtype)
    return out, (torch.cat(lses).float() if spec.score == "softmax" else None)


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Optional[Tensor] = None,
    *,
    block_table: Optional[Tensor] = None,
    score: str = "softmax",
    causal: bool = True,
    window: tuple[int, int] = (-1, -1),
    scale: Optional[float] = None,
    sigmoid_bias: Optional[float] = None,
    silu_norm: Optional[float] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    return_lse: bool = False,
    num_splits: int = 0,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of Nq new queries per batch entry against a KV cache (inference; no autograd).

    Args:
        q: (B, Nq, Hq, D). Nq <= 16 is the decode regime (one kernel reads each entry's keys once
            for all Nq queries and the Hq/Hkv query heads of each kv head); any Nq works.
        k_cache, v_cache: (B, S, Hkv, D) and (B, S, Hkv, Dv); or paged, (num_pages, page_size, Hkv, D)
            with ``block_table``. Hq % Hkv == 0. Never copied, never modified.
        cache_seqlens: (B,) int32, valid keys per entry (default: all S, or all pages of the
            block table). Entry b's query i sits at key position i + cache_seqlens[b] - Nq
            (bottom-right aligned, flash-attn's convention)::

                cache_seqlens[b]=6, Nq=2, causal:   1 1 1 1 1 0
                                                    1 1 1 1 1 1

        block_table: (B, max_pages) int32: key j of entry b is row j % page_size of page
            block_table[b, j // page_size] (flash-attn's paged layout; any page size).
        score: ``"softmax"``; ``"sigmoid"`` with ``sigmoid_bias`` defaulting to -ln(cache_seqlens[b])
            of each entry; ``"silu"`` with ``silu_norm`` defaulting to max(cache_seqlens) (as
            attention_varlen's max_seqlen_k).
        causal, window, scale, softcap, alibi_slopes: as :func:`omniattn.attention`, positions as above.
        return_lse: softmax only: also the float32 lse (B, Hq, Nq).
        num_splits: key splits per (entry, kv head) for the Triton kernel; 0 chooses from the SM
            count and the context length (flash-decoding).
        backend: ``"auto"`` (Triton on CUDA sm80+, else the PyTorch split path), ``"triton"``,
            ``"torch"``, ``"reference"``.

    Returns:
        (B, Nq, Hq, Dv) in q's dtype (and the lse). A query with no visible key gets 0 (lse -inf).

    Example::

        out = omniattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens)            # dense
        out = omniattn.attention_with_kvcache(q, kp, vp, lens, block_table=table, score="sigmoid")
    """
    spec, call = kvcache_call(
        q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, num_splits, score=score, causal=causal,
        window=window, scale=scale, sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=softcap,
        backend=backend, return_lse=return_lse,
    )
    with torch.no_grad():
        out, lse = run(spec, call, backend)
    return (out, lse) if return_lse else out

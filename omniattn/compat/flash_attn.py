"""flash-attn 2.8's Python API on omniattn: ``from omniattn.compat.flash_attn import flash_attn_func``.

Same names, positional order, defaults and return values as ``flash_attn.flash_attn_interface``
(2.8.3); every function computes through :func:`omniattn.attention` / :func:`omniattn.attention_varlen`
(or the split-KV decode kernel), so it runs on any device omniattn runs on, in fp16/bf16/fp32/fp64,
with gradients.

Semantics kept from flash-attn (its C++ entry points, not only its docstrings):

- ``causal`` is bottom-right aligned; with ``causal=True`` any ``window_size[1]`` is accepted and
  clipped to 0 (transformers passes ``(w - 1, w - 1)`` with causal for sliding-window models).
- a window side >= seqlen_k (``max_seqlen_k`` for varlen, the cache length for the KV cache) means
  unbounded, and any negative side means unbounded.
- ``softcap <= 0`` is off; ``alibi_slopes`` (H,) or (B, H) adds ``-slope * |i + Nk - Nq - j|``.
- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: lse (B, H, Nq) dense, (H, Tq)
  varlen, float32. The third element, flash-attn's ``S_dmask`` (the (B, H, Nq, Nk) probabilities,
  "for testing only"), is never materialised by omniattn: it is ``None``, as flash-attn returns it
  without dropout.
- ``dropout_p > 0`` applies dropout whenever it is passed (flash-attn leaves train/eval to the
  caller), with omniattn's counter-based RNG seeded from torch's default generator.
- ``deterministic=True`` is passed on: the backward then sums in a fixed order (bit-identical
  gradients run to run; only Hopper's Gluon backward, which sums dQ by float32 TMA reductions,
  does not, and it steps aside).

``flash_attn_with_kvcache`` appends ``k``/``v`` into the caller's cache IN PLACE at
``cache_seqlens`` (flash-attn's contract), paged through ``block_table`` or indexed by
``cache_batch_idx``, with optional rotary embedding of q and the new k. ``cache_leftpad`` is not
supported (NotImplementedError).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import usage
from ..api import attention, attention_varlen

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

# The decode path takes at most this many query tokens per sequence (the split-KV kernel's range).
DECODE_MAX_QUERIES = 16


def _window(window_size, seqlen_k: int) -> tuple[int, int]:
    """flash-attn's window rules: a negative side or one >= seqlen_k is unbounded (-1)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size: expected a pair (left, right), -1 for unbounded, got {window_size!r}")
    out = []
    for w in window_size:
        if isinstance(w, bool) or not isinstance(w, int):
            raise ValueError(f"window_size: expected a pair of ints, got {window_size!r}")
        out.append(-1 if w < 0 or w >= seqlen_k else w)
    return out[0], out[1]


def _keywords(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, seqlen_k, deterministic=False) -> dict:
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
        raise ValueError(f"softcap: expected a float (<= 0 is off), got {softcap!r}")
    return dict(dropout_p=dropout_p, scale=softmax_scale, causal=causal, window=_window(window_size, seqlen_k),
                softcap=max(float(softcap), 0.0), alibi_slopes=alibi_slopes, deterministic=bool(deterministic))


def _result(out, lse, return_attn_probs: bool):
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (B, Nq, H, D), k/v (B, Nk, Hk, D): out (B, Nq, H, D) [, lse (B, H, Nq), None]."""
    usage.count("flash_attn.flash_attn_func")
    kw = _keywords(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, k.shape[1], deterministic)
    out, lse = attention(q, k, v, return_lse=True, **kw)
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv (B, N, 3, H, D): out (B, N, H, D) [, lse, None]."""
    _require_packed("qkv", qkv, 5, 3)
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (B, Nq, H, D), kv (B, Nk, 2, Hk, D): out (B, Nq, H, D) [, lse, None]."""
    _require_packed("kv", kv, 5, 2)
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """q (Tq, H, D), k/v (Tk, Hk, D), cu_seqlens (B+1,) int32: out (Tq, H, D) [, lse (H, Tq), None].

    With ``block_table`` (B, max_blocks) int32, k/v are paged caches (num_blocks, page_size, Hk, D)
    and sequence b's keys are its pages in order (gathered into a packed copy of its keys).
    """
    usage.count("flash_attn.flash_attn_varlen_func")
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if block_table is not None:
        k, v = _gather_pages(k, v, block_table, cu_seqlens_k)
    kw = _keywords(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, max_seqlen_k, deterministic)
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse=True, **kw)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv (T, 3, H, D): out (T, H, D) [, lse (H, T), None]."""
    _require_packed("qkv", qkv, 4, 3)
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (Tq, H, D), kv (Tk, 2, Hk, D): out (Tq, H, D) [, lse (H, Tq), None]."""
    _require_packed("kv", kv, 4, 2)
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention of q (B, Nq, H, D) over a KV cache, after appending k/v (B, Nnew, Hk, D) to it.

    k_cache/v_cache: (B_cache, S, Hk, D), or (num_blocks, page_size, Hk, D) with ``block_table``
    (B, max_blocks) int32. ``cache_seqlens`` (int or (B,) int32): tokens already in each cache;
    the new k/v are written at [cache_seqlens, cache_seqlens + Nnew) IN PLACE, and the queries
    are the last Nq positions of the cache's cache_seqlens + Nnew keys (bottom-right).
    ``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2): rotate the new k at its positions
    and q at the same positions (causal or local) or all at cache_seqlens (otherwise), GPT-J
    style pairs with ``rotary_interleaved`` else GPT-NeoX halves. ``num_splits``: key splits of
    the split-KV decode kernel (0 = chosen for the device), used for Nq <= 16; longer query
    blocks gather the valid keys and run ``attention_varlen``. Returns out (B, Nq, H, D)
    [, lse (B, H, Nq) float32].
    """
    usage.count("flash_attn.flash_attn_with_kvcache")
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad: not supported by omniattn's flash_attn_with_kvcache; pass None")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both new keys and new values, or neither")
    if rotary_cos is not None and k is None:
        raise ValueError("rotary_cos: rotary embedding needs the new k and v to append")
    b, dev = q.shape[0], q.device
    pages, page_size = _cache_pages(k_cache, block_table, cache_batch_idx, b)
    capacity = pages.shape[1] * page_size
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens: required when appending k/v (where in the cache they go)")
        seqlens = torch.full((b,), capacity, dtype=torch.int32, device=dev)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=dev)
    elif isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.shape == (b,) and not cache_seqlens.is_floating_point():
        seqlens = cache_seqlens.to(device=dev, dtype=torch.int32)
    else:
        raise ValueError(f"cache_seqlens: expected an int or a ({b},) int32 tensor, got {cache_seqlens!r}")
    if k is not None:
        new = k.shape[1]
        if rotary_cos is not None:
            q, k = _rotate(q, k, rotary_cos, rotary_sin, seqlens, causal or tuple(window_size) != (-1, -1),
                           rotary_interleaved)
        pos = seqlens.long().view(b, 1) + torch.arange(new, device=dev).view(1, new)
        if bool((pos >= capacity).any()):
            raise ValueError(f"k: appending {new} tokens at cache_seqlens overflows the cache of {capacity} tokens")
        page = pages.gather(1, torch.div(pos, page_size, rounding_mode="floor"))
        k_cache[page, pos % page_size] = k.to(k_cache.dtype)
        v_cache[page, pos % page_size] = v.to(v_cache.dtype)
        seqlens = seqlens + new
    kw = _keywords(0.0, softmax_scale, causal, window_size, softcap, alibi_slopes, capacity)
    del kw["dropout_p"], kw["deterministic"]  # inference: no dropout, no backward
    out, lse = _cache_attention(q, k_cache, v_cache, seqlens, pages, page_size, block_table, cache_batch_idx,
                                num_splits, kw)
    return (out, lse) if return_softmax_lse else out


# --------------------------------------------------------------------------------------------
# helpers


def _require_packed(name: str, t, ndim: int, n: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.shape[ndim - 3] != n:
        layout = "(batch, seqlen, {n}, heads, head_dim)" if ndim == 5 else "(total, {n}, heads, head_dim)"
        raise ValueError(f"{name}: expected shape {layout.format(n=n)}, got {getattr(t, 'shape', type(t).__name__)}")


def _cache_pages(k_cache, block_table, cache_batch_idx, batch: int) -> tuple[torch.Tensor, int]:
    """Every cache layout as pages: (B, max_pages) int64 page ids and the page size. A plain cache
    is one page of S tokens per batch row (row ``cache_batch_idx[b]``, default b)."""
    dev = k_cache.device
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: not supported with a paged cache (block_table), as in flash-attn")
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table: expected a ({batch}, max_blocks) int32 tensor, got {getattr(block_table, 'shape', block_table)}")
        return block_table.to(device=dev, dtype=torch.int64), k_cache.shape[1]
    if cache_batch_idx is not None:
        if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.shape != (batch,):
            raise ValueError(f"cache_batch_idx: expected a ({batch},) int32 tensor, got {cache_batch_idx!r}")
        return cache_batch_idx.to(device=dev, dtype=torch.int64).view(batch, 1), k_cache.shape[1]
    if k_cache.shape[0] < batch:
        raise ValueError(f"k_cache: expected at least {batch} cache rows (the batch of q), got {k_cache.shape[0]}")
    return torch.arange(batch, device=dev).view(batch, 1), k_cache.shape[1]


def _rotate(q, k, cos, sin, seqlens, per_token: bool, interleaved: bool):
    """flash-attn's rotary: k at cache_seqlens + t; q likewise (causal/local) or all at cache_seqlens."""
    b, dev = q.shape[0], q.device
    k_pos = seqlens.long().view(b, 1) + torch.arange(k.shape[1], device=dev)
    q_pos = seqlens.long().view(b, 1) + (torch.arange(q.shape[1], device=dev) if per_token else torch.zeros(
        q.shape[1], dtype=torch.long, device=dev))
    return _rotary(q, cos, sin, q_pos, interleaved), _rotary(k, cos, sin, k_pos, interleaved)


def _rotary(x, cos, sin, pos, interleaved: bool):
    """x (B, N, H, D) with its first 2 * cos.shape[1] dims rotated at positions pos (B, N)."""
    rd = 2 * cos.shape[1]
    if rd > x.shape[-1]:
        raise ValueError(f"rotary_cos: rotary dim {rd} is larger than the head dim {x.shape[-1]}")
    cd = torch.promote_types(x.dtype, torch.float32)
    c, s = cos[pos].unsqueeze(2).to(cd), sin[pos].unsqueeze(2).to(cd)  # (B, N, 1, rd/2)
    xr = x[..., :rd].to(cd)
    if interleaved:  # pairs (0, 1), (2, 3), ...
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    else:  # halves (0, rd/2), (1, rd/2 + 1), ...
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), -1)


def _cache_attention(q, k_cache, v_cache, seqlens, pages, page_size, block_table, cache_batch_idx, num_splits, kw):
    """out (B, Nq, H, Dv), lse (B, H, Nq): the split-KV decode kernel for short query blocks, else
    (or where it is not installed) the valid keys gathered into packed sequences."""
    b, nq = q.shape[0], q.shape[1]
    if nq <= DECODE_MAX_QUERIES:
        try:
            from ..decode import attention_with_kvcache
        except ImportError:
            attention_with_kvcache = None
        if attention_with_kvcache is not None:
            if block_table is not None or cache_batch_idx is not None:
                table = pages.to(torch.int32)  # a plain cache indexed by row is one page per row
            else:
                table, k_cache, v_cache = None, k_cache[:b], v_cache[:b]
            return attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, return_lse=True,
                                          num_splits=num_splits, **kw)
    lens = seqlens.long()
    cu_k = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = lens.cumsum(0)
    k, v = _gather_pages(k_cache, v_cache, pages, cu_k)
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * nq
    out, lse = attention_varlen(q.reshape(b * nq, *q.shape[2:]), k, v, cu_q, cu_k, nq, pages.shape[1] * page_size,
                                return_lse=True, **kw)
    return out.view(b, nq, *out.shape[1:]), lse.view(lse.shape[0], b, nq).transpose(0, 1)


def _gather_pages(k_cache, v_cache, block_table, cu_seqlens_k):
    """Sequence b's first cu[b+1] - cu[b] tokens of its pages, packed: (Tk, Hk, D) copies."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise ValueError(f"block_table: expected a (batch, max_blocks) int32 tensor, got {getattr(block_table, 'shape', block_table)}")
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1:
        raise ValueError("cu_seqlens_k: expected a (B+1,) int32 tensor of offsets")
    page_size = k_cache.shape[1]
    cu = cu_seqlens_k.to(device=k_cache.device, dtype=torch.int64)
    total = int(cu[-1])
    tok = torch.arange(total, device=k_cache.device)
    seq = torch.searchsorted(cu[1:], tok, right=True)  # sequence of each packed key
    t = tok - cu[seq]
    if total and bool((t // page_size >= block_table.shape[1]).any()):
        raise ValueError(f"block_table: a sequence has more keys than its {block_table.shape[1]} pages of {page_size} hold")
    page = block_table.to(device=k_cache.device, dtype=torch.int64)[seq, t // page_size]
    return k_cache[page, t % page_size], v_cache[page, t % page_size]

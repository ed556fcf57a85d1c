"""Padded batches as packed sequences: find which keys a padding mask keeps, gather them, scatter back.

A key-padding mask (each batch entry keeps the same keys for every query row and head) means the
padded batch is a packed variable-length batch in disguise: ``attention_varlen`` over the kept
tokens computes it without ever touching the padded positions, and without any tensor of the
size of the padded scores. The SDPA drop-in and the transformers integration both use this.

The analysis needs the kept lengths on the host (one small copy, which waits for the GPU); a model
passes the same mask object to every layer, so the result is remembered per mask object (a weak
reference plus its ``_version``, bumped by any in-place change), as spec.py does for cu_seqlens.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Padding:
    """The kept positions of a (B, N) padded layout.

    ``b_idx``/``n_idx`` (T,) int64: batch entry and position of each kept token, in order;
    ``cu`` (B+1,) int32 offsets on the mask's device; ``lens`` the kept count per entry (host);
    ``runs``: every entry keeps one contiguous run of positions (then distances between kept
    tokens equal distances in the padded layout, so sliding windows are exact after packing).
    """

    b_idx: torch.Tensor
    n_idx: torch.Tensor
    cu: torch.Tensor
    lens: tuple
    runs: bool

    @property
    def max_len(self) -> int:
        return max(self.lens, default=0)


_cache: dict = {}


def _remember(key_tensor: torch.Tensor, tag: tuple, compute):
    hit = _cache.get(id(key_tensor))
    if hit is not None and hit[0]() is key_tensor and hit[1] == (key_tensor._version,) + tag:
        return hit[2]
    value = compute()
    if len(_cache) > 64:
        _cache.clear()
    _cache[id(key_tensor)] = (weakref.ref(key_tensor), (key_tensor._version,) + tag, value)
    return value


def from_keep(keep: torch.Tensor) -> Padding:
    """``keep`` (B, N) bool (True = a real token) to :class:`Padding`; one host copy per mask object."""
    return _remember(keep, ("keep", tuple(keep.shape)), lambda: _analyse(keep, None)[1])


def from_keep_qk(keep: torch.Tensor, seqlen_q: int) -> tuple[Padding, Padding]:
    """Kept queries and keys of a causal padded layout: ``keep`` (B, Nk) marks the real keys, and
    the Nq queries are the last Nq key positions (bottom-right, as with a KV cache), so the kept
    queries are ``keep[:, -Nq:]``. Remembered per ``keep`` object (every layer shares it)."""
    def compute():
        return _analyse(keep[:, keep.shape[1] - seqlen_q:], None)[1], _analyse(keep, None)[1]

    return _remember(keep, ("keep_qk", tuple(keep.shape), seqlen_q), compute)


def _analyse(keep: torch.Tensor, ok: Optional[torch.Tensor]) -> tuple[bool, Optional[Padding]]:
    """One host copy of [ok, lens..., starts of runs...]; ``ok`` a device bool scalar or None."""
    keep = keep.to(torch.bool)
    b, n = keep.shape
    lens = keep.sum(-1, dtype=torch.int32)
    starts = (keep[:, 1:] & ~keep[:, :-1]).sum(-1) + keep[:, :1].sum(-1) if n else lens * 0  # runs per entry
    flags = torch.cat([(ok if ok is not None else torch.ones((), dtype=torch.bool, device=keep.device)).view(1).to(torch.int64),
                       (starts <= 1).all().view(1).to(torch.int64), lens.to(torch.int64)])
    host = flags.tolist()
    if not host[0]:
        return False, None
    lens_host = tuple(host[2:])
    idx = torch.nonzero_static(keep.reshape(-1), size=sum(lens_host)).squeeze(1)  # size known: no second sync
    cu = torch.zeros(b + 1, dtype=torch.int32, device=keep.device)
    cu[1:] = lens.cumsum(0)
    return True, Padding(idx // max(n, 1), idx % max(n, 1), cu, lens_host, bool(host[1]))


def key_padding(attn_mask: torch.Tensor, batch: int, seqlen_q: int, seqlen_k: int) -> Optional[Padding]:
    """If ``attn_mask`` (broadcastable to (B, H, Nq, Nk)) only masks keys, the kept keys; else None.

    Only masks keys: for each batch entry every query row and head allows the same set of keys,
    shapes (B|1, 1, 1|Nq, Nk) (fewer leading dims broadcast). Bool: True = allowed. Float: entries
    0 (allowed) or masked: -inf, or at most half the dtype's lowest value (transformers' masks use
    ``finfo.min``); such an entry weighs exactly 0 in softmax whenever its row has an allowed key
    (exp underflows), so an entry with no allowed key at all and finite masked values (where
    PyTorch would average every value) is not treated as padding.
    """
    m = attn_mask
    if m.dim() > 4:
        return None
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    mb, mh, mq, mk = m.shape
    if mh != 1 or mk != seqlen_k or mb not in (1, batch) or mq not in (1, seqlen_q):
        return None

    def compute():
        if m.dtype == torch.bool:
            if mq == 1:
                keep, ok = m[:, 0, 0, :], None
            else:
                col = m[:, 0].sum(-2)  # (mb, Nk): rows allowing each key; padding iff 0 or all rows
                keep, ok = col > 0, ((col == 0) | (col == mq)).all()
        else:
            low = torch.finfo(m.dtype).min / 2
            zero = (m[:, 0] == 0).sum(-2)
            masked = (m[:, 0] <= low).sum(-2)
            keep = zero == mq
            ok = ((zero == 0) | (zero == mq)).all() & ((zero + masked) == mq).all()
            finite_masked = ((m[:, 0] != -math.inf) & (m[:, 0] != 0)).any(-1).any(-1)  # (mb,)
            ok = ok & ~((keep.sum(-1) == 0) & finite_masked).any()
        keep = keep.expand(batch, seqlen_k)
        good, pad = _analyse(keep, ok)
        return pad if good else None

    return _remember(attn_mask, ("sdpa", batch, seqlen_q, seqlen_k), compute)


def gather(x: torch.Tensor, pad: Padding) -> torch.Tensor:
    """(B, N, H, D) -> (T, H, D): the kept tokens, packed (one gather; any strides)."""
    return x[pad.b_idx, pad.n_idx]


def scatter(packed: torch.Tensor, pad: Padding, batch: int, seqlen: int) -> torch.Tensor:
    """(T, H, D) -> (B, N, H, D) with zeros at the padded positions (differentiable)."""
    out = packed.new_zeros((batch, seqlen) + tuple(packed.shape[1:]))
    return out.index_put((pad.b_idx, pad.n_idx), packed)

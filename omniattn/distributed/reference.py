"""The specification of context parallelism: gather the whole sequence, run
:mod:`omniattn.reference` on it, keep this rank's rows. Materialised, float64 by default, not
differentiable across ranks: for tests and for checking a setup on small inputs."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference as _reference
from . import layout as _layout
from .api import _helper_layout, unshard
from .comm import exchange_metadata, resolve_group


def context_parallel_attention(q, k, v, *, group=None, load_balance: Optional[str] = "zigzag", cu_seqlens=None,
                               max_seqlen: Optional[int] = None, dtype=torch.float64, **kwargs) -> torch.Tensor:
    """What :func:`omniattn.distributed.context_parallel_attention` must return on this rank
    (``kwargs``: score, causal, window, scale, sigmoid_bias, silu_norm, softcap), in ``dtype``."""
    g = resolve_group(group)
    full = [unshard(t, group, load_balance, cu_seqlens=cu_seqlens) for t in (q, k, v)]
    if cu_seqlens is None:
        out = _reference.attention(*full, dtype=dtype, **kwargs)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        n = max_seqlen if max_seqlen is not None else max(lengths, default=0)
        out = _reference.attention_varlen(*full, cu_seqlens, cu_seqlens, n, n, dtype=dtype, **kwargs)
    d = 1 if cu_seqlens is None else 0
    rows = [r[0] for r in exchange_metadata(g, [q.shape[d]], q.device)]
    lay, d = _helper_layout(q, g, load_balance, cu_seqlens, d, rows)
    return out.index_select(d, _layout.global_rows(lay, g.rank, out.device))

"""generative-recommenders' ``hstu_mha`` on omniattn: change one import.

    # from generative_recommenders.ops.hstu_attention import hstu_mha
    from omniattn.compat.generative_recommenders import hstu_mha

Same positional order, names and defaults as ``generative_recommenders.ops.hstu_attention.hstu_mha``
(their ``kernel``/``enable_tma`` choose among their own kernels and are accepted and ignored here),
plus ``attn_scale`` from their CUDA kernel (``cuda_hstu_mha``). Semantics, from their PyTorch
reference (``pytorch_hstu_mha``) and CUDA kernel:

    o_i = sum_j silu(alpha * q_i.k_j) * scale * v_j    over the pairs HSTU's mask allows,

with ``scale = 1 / max_seq_len``, or ``attn_scale[0]`` when given (their kernel reads its first
element). The mask is omniattn's HSTU mask (targets, contextual prefix, ``max_attn_len``);
``min_full_attn_seq_len`` m > 0 (with ``max_attn_len`` > 0) lifts the ``max_attn_len`` limit for
the query rows whose id is >= max_id - m (the last m history positions and the targets). Because
SiLU attention is pointwise, those rows are taken from a second call without the limit: exact,
at up to twice the work. ``dropout_pr`` applies when ``training`` (dropout on the attention
weights, kept ones scaled by 1 / (1 - p), omniattn's counter-based RNG: the same distribution as
their ``F.dropout``, not the same draws). ``sort_by_length`` is a scheduling hint, ignored.
Unlike theirs, ``causal=False`` is supported (ids compared by |distance|).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends, spec as _spec, usage


def hstu_mha(
    max_seq_len: int,
    alpha: float,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    causal: bool = True,
    dropout_pr: float = 0.0,
    training: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    max_attn_len: int = 0,
    contextual_seq_len: int = 0,
    min_full_attn_seq_len: int = 0,
    sort_by_length: bool = False,
    kernel=None,
    enable_tma: bool = False,
    attn_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """HSTU attention over jagged sequences: q, k (L, H, D), v (L, H, V), seq_offsets (B+1,) -> (L, H, V)."""
    usage.count("hstu_mha")
    min_full = _spec._require_int("min_full_attn_seq_len", min_full_attn_seq_len, 0)
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    dropout = _spec.check_dropout(dropout_pr) if training else 0.0

    def run(limit: int) -> torch.Tensor:
        spec, call = _spec.hstu_call(
            q, k, v, seq_offsets, max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
            contextual_seq_len=contextual_seq_len, max_attn_len=limit, rab=None, timestamps=None,
            silu_norm=_norm(attn_scale, max_seq_len), precision="exact", backend="auto",
        )
        spec, call.dropout_seed = _spec.with_dropout(spec, dropout)
        return backends.run(spec, call, "auto")[0]

    out = run(max_attn_len)
    if min_full > 0 and max_attn_len > 0:
        full_rows = _full_attention_rows(seq_offsets, num_targets, contextual_seq_len, min_full, q.shape[0])
        out = torch.where(full_rows.view(-1, 1, 1), run(0), out)
    return out


def _norm(attn_scale, max_seq_len) -> Optional[float]:
    """silu_norm for hstu_call: None (their default 1 / max_seq_len) or 1 / attn_scale[0]."""
    if attn_scale is None:
        return None
    if isinstance(attn_scale, torch.Tensor):
        if not attn_scale.is_floating_point() or attn_scale.numel() == 0:
            raise ValueError(f"attn_scale: expected a non-empty float tensor (its first element scales silu), got {attn_scale!r}")
        flat = attn_scale.detach().reshape(-1)
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise NotImplementedError("attn_scale: per-element scales are not supported (their kernel reads attn_scale[0] only)")
        value = float(flat[0])
    else:
        value = _spec._require_float("attn_scale", attn_scale)
    if value <= 0:
        raise ValueError(f"attn_scale: expected a scale > 0, got {value}")
    return 1.0 / value


def _full_attention_rows(seq_offsets, num_targets, contextual: int, min_full: int, total: int) -> torch.Tensor:
    """(L,) bool: token rows whose HSTU id is >= max_id - min_full (their ``row_ids >= max_ids - m``)."""
    dev = seq_offsets.device
    offsets = seq_offsets.long()
    tok = torch.arange(total, device=dev)
    seq = torch.searchsorted(offsets[1:], tok, right=True)
    pos = tok - offsets[seq]
    lens = offsets[1:] - offsets[:-1]
    ids, max_ids = pos, lens[seq]
    if contextual > 0:
        ids = (ids - contextual + 1).clamp(min=0)
        max_ids = max_ids - contextual + 1
    if num_targets is not None:
        max_ids = max_ids - num_targets.to(device=dev, dtype=torch.long)[seq]
        ids = torch.minimum(ids, max_ids)
    return ids >= max_ids - min_full


__all__ = ["hstu_mha"]

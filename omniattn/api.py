"""Public functions: validate the arguments (omniattn.spec), run a backend, return the caller's layout."""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

from . import backends, spec as _spec

Tensor = torch.Tensor


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    score: str = "softmax",
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    scale: Optional[float] = None,
    sigmoid_bias: Optional[float] = None,
    silu_norm: Optional[float] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    precision: str = "exact",
    backend: str = "auto",
    return_lse: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Fused attention over dense batches, flash-attn layout.

    Args:
        q: (B, Nq, Hq, D); k: (B, Nk, Hkv, D); v: (B, Nk, Hkv, Dv). Hq % Hkv == 0 (GQA / MQA:
            query head h reads key/value head h // (Hq // Hkv)). float16, bfloat16, float32 or float64.
        score: ``"softmax"``; ``"sigmoid"``: sigmoid(s + sigmoid_bias), sigmoid_bias defaulting to
            -ln(Nk); ``"silu"``: silu(s) / silu_norm, silu_norm defaulting to Nk (HSTU's convention).
        causal: key j visible from query i iff j <= i + Nk - Nq (bottom-right aligned)::

                Nq=2, Nk=5:  1 1 1 1 0
                             1 1 1 1 1

        window: (left, right) sliding window, i + Nk - Nq - left <= j <= i + Nk - Nq + right; -1 = unbounded.
        scale: multiplies q.k; default 1/sqrt(D).
        softcap: c > 0 replaces the score s by c * tanh(s / c).
        alibi_slopes: (Hq,) or (B, Hq): adds -slope * |i + Nk - Nq - j| to the score.
        precision: ``"exact"`` (accumulation in float32).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` (tiled, any device) or ``"reference"``.
        return_lse: softmax only; also return the log-sum-exp (B, Hq, Nq), float32.

    Returns:
        (B, Nq, Hq, Dv) in q's dtype (and lse with ``return_lse``). A query with no visible key
        gets 0 (lse -inf).

    Example::

        out = omniattn.attention(q, k, v, causal=True)                  # softmax
        out = omniattn.attention(q, k, v, score="sigmoid")              # FlashSigmoid
        out = omniattn.attention(q, k, v, score="silu", window=(256, 0))
    """
    spec, call = _spec.dense_call(
        q, k, v, score=score, causal=causal, window=window, scale=scale, sigmoid_bias=sigmoid_bias,
        silu_norm=silu_norm, softcap=softcap, alibi_slopes=alibi_slopes, precision=precision,
        backend=backend, return_lse=return_lse,
    )
    out, lse = backends.run(spec, call, backend)
    return (out, lse) if return_lse else out


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    score: str = "softmax",
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    scale: Optional[float] = None,
    sigmoid_bias: Optional[float] = None,
    silu_norm: Optional[float] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    precision: str = "exact",
    backend: str = "auto",
    return_lse: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over packed sequences of different lengths.

    Args:
        q: (Tq, Hq, D); k: (Tk, Hkv, D); v: (Tk, Hkv, Dv): the sequences laid end to end.
        cu_seqlens_q, cu_seqlens_k: (B+1,) int32/int64 offsets: sequence b is rows
            cu[b]:cu[b+1]. Starting at 0, non-decreasing, ending at Tq / Tk; empty sequences allowed.
        max_seqlen_q, max_seqlen_k: at least the longest sequence (the silu default norm is max_seqlen_k).
        The keywords are those of :func:`attention`; masks apply per sequence, and a query never
        sees keys of another sequence.

    Returns:
        (Tq, Hq, Dv), and with ``return_lse`` the lse (Hq, Tq) in float32.

    Example::

        cu = torch.tensor([0, 3, 10], dtype=torch.int32)      # two sequences: 3 and 7 tokens
        out = omniattn.attention_varlen(q, k, v, cu, cu, 7, 7, causal=True)
    """
    spec, call = _spec.varlen_call(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, score=score, causal=causal,
        window=window, scale=scale, sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=softcap,
        alibi_slopes=alibi_slopes, precision=precision, backend=backend, return_lse=return_lse,
    )
    out, lse = backends.run(spec, call, backend)
    return (out, lse) if return_lse else out


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: Optional[float] = None,
    causal: bool = True,
    num_targets: Optional[Tensor] = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    rab=None,
    timestamps: Optional[Tensor] = None,
    silu_norm: Optional[float] = None,
    precision: str = "exact",
    backend: str = "auto",
) -> Tensor:
    """HSTU pointwise attention over jagged user sequences (generative-recommenders layout).

    ``o_i = sum_j silu(alpha * q_i.k_j + rab_ij) / n * v_j`` over the pairs HSTU's mask allows.

    Args:
        q, k: (T, H, Dqk); v: (T, H, Dv); seq_offsets: (B+1,) int32/int64 jagged offsets.
        max_seq_len: N, at least the longest sequence; the default norm n = N.
        alpha: score scale, default 1/sqrt(Dqk).
        causal: ids must decrease from query to key (else any different id).
        num_targets: (B,) the last num_targets[b] tokens of sequence b are candidates: they see the
            history and themselves, never each other (M-FALCON).
        contextual_seq_len: a prefix of contextual tokens that see, and are seen by, every non-target.
        max_attn_len: > 0 limits attention to id distance <= max_attn_len.
        rab: an :class:`omniattn.hstu.RelativeBias`; with ``timestamps`` (T,) adds the learnable
            relative position + time-bucket bias, computed per tile (never an (N, N) tensor), with
            gradients for its weights.
        silu_norm: n; default max_seq_len.

    Returns:
        (T, H, Dv) in q's dtype.

    Example::

        rab = omniattn.hstu.RelativeBias(max_seq_len=256)
        out = omniattn.hstu_attention(q, k, v, offsets, 256, num_targets=nt, rab=rab, timestamps=ts)
    """
    spec, call = _spec.hstu_call(
        q, k, v, seq_offsets, max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
        contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, rab=rab, timestamps=timestamps,
        silu_norm=silu_norm, precision=precision, backend=backend,
    )
    return backends.run(spec, call, backend)[0]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on (B, H, N, D) tensors.

    Runs omniattn's softmax attention. What omniattn does not compute (an explicit ``attn_mask``,
    ``dropout_p > 0``, ``is_causal`` with Nq != Nk, which PyTorch aligns top-left, or inputs that
    are not 4-D) is passed to PyTorch's own function, with a warning.
    """
    fallback = None
    if attn_mask is not None:
        fallback = "attn_mask"
    elif dropout_p != 0.0:
        fallback = "dropout_p > 0"
    elif not all(isinstance(t, Tensor) and t.dim() == 4 for t in (query, key, value)):
        fallback = "inputs that are not 4-D (B, H, N, D)"
    elif is_causal and query.shape[-2] != key.shape[-2]:
        fallback = "is_causal with different query and key lengths (PyTorch aligns it top-left)"
    if fallback is not None:
        warnings.warn(f"omniattn.scaled_dot_product_attention: {fallback} runs on torch's implementation", stacklevel=2)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError(
            f"key: {key.shape[1]} heads but query has {query.shape[1]}; pass enable_gqa=True for grouped-query attention"
        )
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal, scale=scale)
    return out.transpose(1, 2)


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact softmax attention over the union of two key sets, from the two partial results.

    ``out_*`` (..., N, H, Dv) and ``lse_*`` (..., H, N) as returned with ``return_lse=True`` (dense
    or varlen layout). Returns (out, lse) in out_a's dtype and float32 (float64 for float64 inputs).
    Rows empty in both stay 0 / -inf.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if out_a.dim() < 3:
        raise ValueError(f"out_a: expected (..., N, H, Dv), got shape {tuple(out_a.shape)}")
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b: expected shape {tuple(out_a.shape)} (as out_a), got {tuple(out_b.shape)}")
    want = tuple(out_a.shape[:-3]) + (out_a.shape[-2], out_a.shape[-3])
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape {want} (..., H, N) to match the output, got {tuple(t.shape)}")
    cd = torch.promote_types(torch.promote_types(out_a.dtype, lse_a.dtype), torch.float32)
    la, lb = lse_a.to(cd), lse_b.to(cd)
    lse = torch.logaddexp(la, lb)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, 0.0)
    wa = torch.where(finite, torch.exp(la - safe), 0.0).transpose(-1, -2).unsqueeze(-1)  # (..., N, H, 1)
    wb = torch.where(finite, torch.exp(lb - safe), 0.0).transpose(-1, -2).unsqueeze(-1)
    out = wa * out_a.to(cd) + wb * out_b.to(cd)
    return out.to(out_a.dtype), lse

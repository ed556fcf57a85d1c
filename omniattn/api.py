"""Public functions: validate the arguments (omniattn.spec), run a backend, return the caller's layout."""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import backends, padding as _padding, spec as _spec, usage

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
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    quant_config=None,
    deterministic: bool = False,
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
            With ``causal=True`` any ``right`` is accepted and clipped to 0, as flash-attn does.
        scale: multiplies q.k; default 1/sqrt(D).
        softcap: c > 0 replaces the score s by c * tanh(s / c).
        alibi_slopes: (Hq,) or (B, Hq): adds -slope * |i + Nk - Nq - j| to the score.
        precision: ``"exact"`` (the inputs' dtype, float32 accumulation) or, for inference,
            ``"int8"`` (INT8 Q.K, 16-bit P.V), ``"int8-fp8"`` (INT8 Q.K, FP8 P.V), ``"fp8"`` (FP8 Q, K,
            V), ``"int4-fp8"`` (INT4 Q.K packed two per byte, computed on INT8 units: Hopper has no
            INT4 tensor cores), ``"auto"`` (the fastest of these this GPU runs at omniattn's accuracy
            bar; exact on CPUs). Quantized calls take no gradients. On CPUs ``backend="torch"``
            runs an emulation with the kernels' scales and roundings.
        quant_config: an :class:`omniattn.QuantConfig` (granularity, smoothing, P.V accumulator).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` (tiled, any device) or ``"reference"``.
        return_lse: softmax only; also return the log-sum-exp (B, Hq, Nq), float32.
        attn_mask: bool (True = allowed) or float (added to the score after softcap/ALiBi),
            broadcastable to (B, Hq, Nq, Nk); read tile by tile, never expanded. Combines with
            ``causal``/``window`` (a pair must be allowed by both).
        dropout_p: training dropout on the attention weights (kept ones scaled by 1/(1-p)); the
            pattern is a counter-based hash of a seed drawn from torch's default generator.
        deterministic: the backward's sums in a fixed order, so two backward passes give
            identical bits. Only Hopper's Gluon backward reduces dQ in no fixed order (float32 TMA
            reductions); it then steps aside for the template's (slower at long lengths: see the
            README), as it does under ``torch.use_deterministic_algorithms(True)``.

    Returns:
        (B, Nq, Hq, Dv) in q's dtype (and lse with ``return_lse``). A query with no visible key
        gets 0 (lse -inf).

    Example::

        out = omniattn.attention(q, k, v, causal=True)                  # softmax
        out = omniattn.attention(q, k, v, score="sigmoid")              # FlashSigmoid
        out = omniattn.attention(q, k, v, score="silu", window=(256, 0))
    """
    q, k, v = _spec.autocast_qkv(q, k, v)
    spec, call = _spec.dense_call(
        q, k, v, score=score, causal=causal, window=window, scale=scale, sigmoid_bias=sigmoid_bias,
        silu_norm=silu_norm, softcap=softcap, alibi_slopes=alibi_slopes, precision=precision,
        backend=backend, return_lse=return_lse, attn_mask=attn_mask, dropout_p=dropout_p, quant_config=quant_config,
        deterministic=deterministic,
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
    dropout_p: float = 0.0,
    quant_config=None,
    deterministic: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over packed sequences of different lengths.

    Args:
        q: (Tq, Hq, D); k: (Tk, Hkv, D); v: (Tk, Hkv, Dv): the sequences laid end to end.
        cu_seqlens_q, cu_seqlens_k: (B+1,) int32/int64 offsets: sequence b is rows
            cu[b]:cu[b+1]. Starting at 0, non-decreasing, ending at Tq / Tk; empty sequences allowed.
        max_seqlen_q, max_seqlen_k: at least the longest sequence (the silu default norm is max_seqlen_k).
        The keywords are those of :func:`attention` (but ``attn_mask``); masks apply per sequence,
        and a query never sees keys of another sequence.

    Returns:
        (Tq, Hq, Dv), and with ``return_lse`` the lse (Hq, Tq) in float32.

    Example::

        cu = torch.tensor([0, 3, 10], dtype=torch.int32)      # two sequences: 3 and 7 tokens
        out = omniattn.attention_varlen(q, k, v, cu, cu, 7, 7, causal=True)
    """
    q, k, v = _spec.autocast_qkv(q, k, v)
    spec, call = _spec.varlen_call(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, score=score, causal=causal,
        window=window, scale=scale, sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=softcap,
        alibi_slopes=alibi_slopes, precision=precision, backend=backend, return_lse=return_lse,
        dropout_p=dropout_p, quant_config=quant_config, deterministic=deterministic,
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
    quant_config=None,
    deterministic: bool = False,
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
        precision, quant_config, backend, deterministic: as :func:`attention` (quantized HSTU:
            inference only).

    Returns:
        (T, H, Dv) in q's dtype.

    Example::

        rab = omniattn.hstu.RelativeBias(max_seq_len=256)
        out = omniattn.hstu_attention(q, k, v, offsets, 256, num_targets=nt, rab=rab, timestamps=ts)
    """
    q, k, v = _spec.autocast_qkv(q, k, v)
    spec, call = _spec.hstu_call(
        q, k, v, seq_offsets, max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
        contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, rab=rab, timestamps=timestamps,
        silu_norm=silu_norm, precision=precision, backend=backend, quant_config=quant_config,
        deterministic=deterministic,
    )
    return backends.run(spec, call, backend)[0]


# PyTorch's own kernel, captured when omniattn is imported: once a user patches
# ``torch.nn.functional.scaled_dot_product_attention = omniattn.scaled_dot_product_attention``, a
# fallback that looked the name up at call time would call itself.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention

# cu_seqlens of the dense queries of a padded batch, (B+1,) int32: one tensor object per shape and
# device, so spec.py's host check of it is cached after the first call.
_dense_offsets: dict = {}


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: str = "auto",
    precision: str = "exact",
    quant_config=None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: (B, H, N, D) or (H, N, D).

    omniattn computes every call it can express exactly:

    - no mask: softmax attention (``is_causal``, ``scale``, ``enable_gqa`` as PyTorch);
    - ``is_causal`` with Nq != Nk: PyTorch aligns the mask top-left (key j visible iff j <= i);
      omniattn computes exactly that (keys past Nq are never visible: with Nq < Nk they are
      dropped from the call, with Nq > Nk it is the window (-1, Nq - Nk));
    - a key-padding mask (bool, or float with 0 / -inf / dtype-min entries; shape (B|1, 1, 1|Nq,
      Nk): every query row of a batch entry allows the same keys) runs as packed sequences
      through ``attention_varlen`` over the kept keys only (no tensor of the padded scores size);
    - any other bool or float mask is read tile by tile by the backend (``Call.attn_mask``);
    - ``dropout_p > 0``: dropout on the attention weights, seeded from torch's default generator.

    ``precision``/``quant_config`` (keywords beyond PyTorch's): quantized inference, as in
    :func:`attention`; a calibration plan (omniattn.quant.calibrate) applied around a model sets
    them per call site.

    What it cannot express (nested tensors, inputs that are not 3-D/4-D, batch broadcasting
    between query and key, a mask that requires grad, dtypes it does not compute) runs on
    PyTorch's own function, with one warning per reason, counted in :func:`omniattn.stats`.

    Example::

        torch.nn.functional.scaled_dot_product_attention = omniattn.scaled_dot_product_attention
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=padding_mask)
    """
    query, key, value = _spec.autocast_qkv(query, key, value)
    reason = _sdpa_unsupported(query, key, value, attn_mask)
    if reason is not None:
        usage.fallback("sdpa", reason)
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask: pass either an explicit attn_mask or is_causal=True, not both (as PyTorch)")
    if not enable_gqa and query.shape[-3] != key.shape[-3]:
        raise ValueError(
            f"key: {key.shape[-3]} heads but query has {query.shape[-3]}; pass enable_gqa=True for grouped-query attention"
        )
    unbatched = query.dim() == 3
    q, k, v = (t.unsqueeze(0) if unbatched else t for t in (query, key, value))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, D) views
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    causal, window = bool(is_causal), (-1, -1)
    if causal and nq != nk:  # PyTorch's top-left alignment, exactly
        if nq < nk:
            k, v = k[:, :nq], v[:, :nq]
        else:
            causal, window = False, (-1, nq - nk)
    if attn_mask is not None:
        _spec.check_attn_mask(attn_mask, b, q.shape[2], nq, nk, q.device)
    try:
        pad = _padding.key_padding(attn_mask, b, nq, nk) if attn_mask is not None else None
        if pad is not None:
            usage.count("sdpa.varlen")
            out = _sdpa_varlen(q, k, v, pad, scale, dropout_p, backend, precision, quant_config)
        else:
            usage.count("sdpa.masked" if attn_mask is not None else "sdpa.dense")
            out = attention(q, k, v, causal=causal, window=window, scale=scale, attn_mask=attn_mask,
                            dropout_p=dropout_p, backend=backend, precision=precision, quant_config=quant_config)
    except NotImplementedError as e:  # the backend cannot run this call: PyTorch computes it
        usage.fallback("sdpa", str(e))
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    usage.count("sdpa")
    out = out.transpose(1, 2)
    return out.squeeze(0) if unbatched else out


def _sdpa_unsupported(query, key, value, attn_mask) -> Optional[str]:
    """Why omniattn cannot compute this SDPA call exactly, or None."""
    tensors = (query, key, value)
    if not all(isinstance(t, Tensor) for t in tensors):
        return None  # spec's checks name the argument that is not a tensor
    if any(t.is_nested for t in tensors):
        return "nested tensors"
    if not all(t.dim() == query.dim() for t in tensors) or query.dim() not in (3, 4):
        return "inputs that are not all 3-D (H, N, D) or all 4-D (B, H, N, D)"
    if query.dim() == 4 and not key.shape[0] == value.shape[0] == query.shape[0]:
        return "a key/value batch different from the query's (broadcast batch)"
    if any(t.dtype not in _spec.FLOAT_DTYPES or t.dtype != query.dtype for t in tensors):
        return "dtypes other than one of float16/bfloat16/float32/float64 for query, key and value"
    if attn_mask is not None and isinstance(attn_mask, Tensor):
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return "an attn_mask that requires grad (omniattn computes no mask gradient)"
        if attn_mask.is_nested:
            return "a nested attn_mask"
    return None


def _sdpa_varlen(q, k, v, pad, scale, dropout_p, backend, precision, quant_config) -> Tensor:
    """A key-padding mask as packed sequences: every query row, only the kept keys. (B, Nq, H, Dv)."""
    b, nq = q.shape[0], q.shape[1]
    key = (b, nq, q.device)
    if key not in _dense_offsets:
        if len(_dense_offsets) > 64:
            _dense_offsets.clear()
        _dense_offsets[key] = torch.arange(b + 1, dtype=torch.int32, device=q.device) * nq
    out = attention_varlen(q.reshape(b * nq, *q.shape[2:]), _padding.gather(k, pad), _padding.gather(v, pad),
                           _dense_offsets[key], pad.cu, nq, pad.max_len, scale=scale, dropout_p=dropout_p,
                           backend=backend, precision=precision, quant_config=quant_config)
    return out.view(b, nq, *out.shape[1:])


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

"""HuggingFace transformers: ``attn_implementation="omniattn"`` (softmax) and ``"omniattn-sigmoid"``.

    import omniattn.integrations.transformers as oa_hf
    oa_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="omniattn")

``register()`` adds an attention function to transformers' ``AttentionInterface`` and the matching
mask function to ``AttentionMaskInterface`` (without a registered mask function transformers
passes no mask at all to a custom implementation, and padded batches would silently attend to
padding). The mask function hands over what omniattn needs, never a (B, 1, Nq, Nk) tensor for the
standard patterns:

- causal / bidirectional / sliding-window patterns without padding: ``None`` (the attention
  function applies ``is_causal`` and ``sliding_window`` itself, bottom-right aligned, which is
  where transformers puts the queries of a KV cache);
- the same with padding: the (B, Nk) boolean of real keys; the attention function packs the real
  tokens and runs ``attention_varlen`` (a sliding window over a mask with holes inside a row runs
  as the dense call with the key mask instead, so window distances stay those of the positions);
- any other pattern (``or_mask_function``/``and_mask_function`` overlays such as image tokens,
  packed-sequence or block overlays, chunked attention): transformers' own (B, 1, Nq, Nk) boolean
  mask, which omniattn's backends read tile by tile.

Sliding windows: transformers' causal window of size w keeps keys i - w < j <= i, omniattn's
window (w - 1, 0); flash-attn receives (w - 1, w - 1) with causal, which omniattn accepts too.
Softcap (Gemma-2), GQA, dropout in training and scaling come from the model's attention module.

``"omniattn-sigmoid"`` is sigmoid attention (FlashSigmoid) for models trained with it: weights
sigmoid(s + b) with one constant b per model, ``config.sigmoid_bias`` if the config has it, else
-ln(config.max_position_embeddings) (b = -ln n with n the training length, as FlashSigmoid
trains). A constant keeps a token's attention the same in a full forward and in cached decoding.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch

from .. import padding as _padding, usage
from ..api import attention, attention_varlen

SOFTMAX = "omniattn"
SIGMOID = "omniattn-sigmoid"


def register() -> None:
    """Register ``attn_implementation="omniattn"`` and ``"omniattn-sigmoid"`` with transformers.

    Call once before building or loading the model. Requires transformers >= 4.56 (the
    ``AttentionMaskInterface``); tested with 5.24.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError(
            "omniattn.integrations.transformers needs transformers with AttentionInterface and "
            "AttentionMaskInterface (>= 4.56): pip install 'transformers>=4.56'"
        ) from e
    AttentionInterface.register(SOFTMAX, softmax_attention_forward)
    AttentionInterface.register(SIGMOID, sigmoid_attention_forward)
    AttentionMaskInterface.register(SOFTMAX, attention_mask)
    AttentionMaskInterface.register(SIGMOID, attention_mask)


# --------------------------------------------------------------------------------------------
# mask function (AttentionMaskInterface)


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
):
    """What the attention function needs: None, a (B, kv_length) bool of real keys, or (for
    patterns omniattn does not generate itself) transformers' own 4-D boolean mask."""
    from transformers import masking_utils as mu

    if use_vmap or not _standard_pattern(mask_function, mu):
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            use_vmap=use_vmap, device=device, **kwargs)
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if attention_mask is None:
        if kv_offset + kv_length <= q_offset + q_length:
            return None
        # a static cache: slots past the last query are empty, not keys
        attention_mask = torch.ones(batch_size, q_offset + q_length, dtype=torch.bool, device=device)
    keep = mu.prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)
    keep = keep[:, kv_offset : kv_offset + kv_length]
    if bool(keep.all()):
        return None
    return keep


_OVERLAYS = ("sliding_window_overlay.<locals>.inner_mask", "sliding_window_bidirectional_overlay.<locals>.inner_mask")


def _standard_pattern(fn, mu) -> bool:
    """Causal or bidirectional, optionally AND a sliding-window overlay: what the attention function
    computes from ``is_causal`` and ``sliding_window``. Anything else (unknown closures included)
    gets the materialised mask, so a pattern is never guessed."""
    if fn is None or fn is mu.causal_mask_function or fn is mu.bidirectional_mask_function:
        return True
    if getattr(fn, "__module__", None) != mu.__name__ or getattr(fn, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return False
    parts = inspect.getclosurevars(fn).nonlocals.get("mask_functions", ())
    return bool(parts) and all(
        p is mu.causal_mask_function or p is mu.bidirectional_mask_function
        or (getattr(p, "__module__", None) == mu.__name__ and getattr(p, "__qualname__", "") in _OVERLAYS)
        for p in parts
    )


# --------------------------------------------------------------------------------------------
# attention functions (AttentionInterface)


def softmax_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention signature: query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D[v]).
    Returns ((B, Nq, Hq, Dv), None)."""
    return _forward(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, is_causal,
                    {"score": "softmax"}, kwargs), None


def sigmoid_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """As :func:`softmax_attention_forward`, with sigmoid attention and the model's constant bias."""
    score = {"score": "sigmoid", "sigmoid_bias": _sigmoid_bias(module)}
    return _forward(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, is_causal,
                    score, kwargs), None


def _sigmoid_bias(module) -> float:
    config = getattr(module, "config", None)
    bias = getattr(config, "sigmoid_bias", None)
    if bias is not None:
        return float(bias)
    n = getattr(config, "max_position_embeddings", None)
    if not n:
        raise ValueError(
            "omniattn-sigmoid: the model config needs sigmoid_bias or max_position_embeddings to fix the bias b = -ln(n)"
        )
    return -math.log(n)


def _forward(module, query, key, value, mask, dropout, scaling, sliding_window, softcap, is_causal, score, kwargs):
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"omniattn's transformers integration: {name} is not supported; use 'sdpa' or 'eager'")
    usage.count("transformers")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = (-1, -1)
    if sliding_window:
        window = (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)
    kw = dict(scale=scaling, softcap=float(softcap or 0.0), dropout_p=float(dropout or 0.0), **score)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, H, D) views
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]

    if mask is None:
        packed = _packed_offsets(kwargs, b, nq, nk, q.device)
        if packed is None:
            return attention(q, k, v, causal=causal, window=window, **kw)
        usage.count("transformers.varlen")
        cu_q, cu_k, max_q, max_k = packed
        out = attention_varlen(q.reshape(b * nq, *q.shape[2:]), k.reshape(b * nk, *k.shape[2:]),
                               v.reshape(b * nk, *v.shape[2:]), cu_q, cu_k, max_q, max_k, causal=causal,
                               window=window, **kw)
        return out.view(b, nq, *out.shape[1:])

    if mask.dim() == 4:  # a pattern transformers materialised (see attention_mask)
        usage.count("transformers.masked")
        return attention(q, k, v, attn_mask=mask, **kw)

    if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] != nk:
        raise ValueError(f"attention_mask: expected None, (B, Nk) = ({b}, {nk}) or a 4-D mask, got {tuple(mask.shape)}")
    keep = mask if mask.dtype == torch.bool else mask.to(torch.bool)
    if causal:
        pad_q, pad_k = _padding.from_keep_qk(keep, nq)
    else:  # every query row computes (the rows are independent); only keys are packed
        pad_q, pad_k = None, _padding.from_keep(keep)
    if window != (-1, -1) and (not causal or not pad_k.runs):
        # packing would shorten distances across holes (or misplace dense queries): the positions' window
        usage.count("transformers.masked")
        return attention(q, k, v, causal=causal, window=window, attn_mask=keep[:, None, None, :], **kw)
    usage.count("transformers.varlen")
    if pad_q is None:
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * nq
        out = attention_varlen(q.reshape(b * nq, *q.shape[2:]), _padding.gather(k, pad_k), _padding.gather(v, pad_k),
                               cu_q, pad_k.cu, nq, pad_k.max_len, causal=False, window=window, **kw)
        return out.view(b, nq, *out.shape[1:])
    out = attention_varlen(_padding.gather(q, pad_q), _padding.gather(k, pad_k), _padding.gather(v, pad_k),
                           pad_q.cu, pad_k.cu, pad_q.max_len, pad_k.max_len, causal=causal, window=window, **kw)
    return _padding.scatter(out, pad_q, b, nq)


def _packed_offsets(kwargs, b, nq, nk, device):
    """Padding-free batches (several sequences laid end to end in one row): from the cu_seq_lens
    transformers' collators pass, or from position ids that restart; None for an ordinary batch."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        lens_q, lens_k = torch.diff(cu_q), torch.diff(cu_k)
        max_q = int(max_q) if max_q is not None else int(lens_q.max()) if lens_q.numel() else 0
        max_k = int(max_k) if max_k is not None else int(lens_k.max()) if lens_k.numel() else 0
        return cu_q, cu_k, max_q, max_k
    pos = kwargs.get("position_ids")
    if pos is None or b != 1 or nq != nk or nq <= 1 or pos.shape[-1] != nq:
        return None
    pos = pos.reshape(-1)
    if bool((pos[1:] == pos[:-1] + 1).all()):
        return None
    starts = (pos == pos.min()).nonzero().view(-1).to(torch.int32)
    if starts.numel() == 0 or int(starts[0]) != 0:
        return None
    cu = torch.cat([starts, torch.tensor([nq], dtype=torch.int32, device=device)])
    max_len = int(torch.diff(cu).max())
    return cu, cu, max_len, max_len

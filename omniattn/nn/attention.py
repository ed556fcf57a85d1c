"""Attention layers on omniattn's kernels: ``Attention`` (softmax / sigmoid / SiLU, GQA, QK-norm,
LayerScale, rotary) with FlashSigmoid's recipe by name, and a ``torch.nn.MultiheadAttention``
drop-in with the same constructor, parameters (state_dict) and forward outputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import api


class Attention(nn.Module):
    """Multi-head self- (or cross-) attention with a choice of score function.

    Args:
        dim: model width; inputs (B, N, dim), or packed (T, dim) with ``cu_seqlens``.
        num_heads: query heads; ``num_kv_heads`` key/value heads (GQA/MQA; default num_heads).
        score: ``"softmax"``, ``"sigmoid"`` (sigmoid(s + b), b = ``sigmoid_bias`` or -ln(Nk) of
            each sequence) or ``"silu"`` (silu(s) / n, n = ``silu_norm`` or max_seqlen_k).
        head_dim: default dim // num_heads.
        qk_norm: normalise q and k per head before the product: ``True``/``"layer"`` (LayerNorm)
            or ``"rms"`` (RMSNorm); keeps sigmoid attention's logits bounded.
        layer_scale: None, or the initial value of a learnable per-channel scale of the output
            (LayerScale).
        rope: None, or the base of rotary position embeddings (e.g. 10000.0; ``True`` = 10000.0),
            GPT-NeoX halves, applied to q and k by position in each sequence.
        bias: biases of the q/k/v/output projections.
        dropout: dropout on the attention weights in training (omniattn's counter-based RNG).
        causal, window, softcap: omniattn's mask and score options (bottom-right causal).

    Example::

        attn = omniattn.nn.Attention(256, 8, num_kv_heads=2, rope=10000.0, causal=True)
        y = attn(x)                                   # x (B, N, 256)
        sig = omniattn.nn.Attention.flash_sigmoid(256, 8)
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *, score: str = "softmax",
                 head_dim: Optional[int] = None, qk_norm=False, layer_scale: Optional[float] = None, rope=None,
                 bias: bool = True, dropout: float = 0.0, causal: bool = False, window: tuple = (-1, -1),
                 softcap: float = 0.0, sigmoid_bias: Optional[float] = None, silu_norm: Optional[float] = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = dim // num_heads if head_dim is None else head_dim
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: must divide num_heads ({num_heads}), got {num_kv_heads}")
        if head_dim <= 0:
            raise ValueError(f"head_dim: expected > 0 (dim // num_heads by default), got {head_dim}")
        if score not in ("softmax", "sigmoid", "silu"):
            raise ValueError(f"score: expected 'softmax', 'sigmoid' or 'silu', got {score!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        fk = dict(device=device, dtype=dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.score, self.causal, self.window, self.softcap = score, causal, tuple(window), softcap
        self.sigmoid_bias, self.silu_norm, self.dropout, self.backend = sigmoid_bias, silu_norm, dropout, backend
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(num_heads * head_dim, dim, bias=bias, **fk)
        self.q_norm = self.k_norm = None
        if qk_norm:
            norm = {True: nn.LayerNorm, "layer": nn.LayerNorm, "rms": nn.RMSNorm}.get(qk_norm)
            if norm is None:
                raise ValueError(f"qk_norm: expected False, True, 'layer' or 'rms', got {qk_norm!r}")
            self.q_norm, self.k_norm = norm(head_dim, **fk), norm(head_dim, **fk)
        self.layer_scale = None
        if layer_scale is not None:
            self.layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale), **fk))
        self.rope_base = None
        if rope is not None and rope is not False:
            self.rope_base = 10000.0 if rope is True else float(rope)
            if head_dim % 2:
                raise ValueError(f"rope: rotary embeddings need an even head_dim, got {head_dim}")

    @classmethod
    def flash_sigmoid(cls, dim: int, num_heads: int, **kwargs) -> "Attention":
        """FlashSigmoid's recipe (Ramapuram et al. 2024): sigmoid attention with b = -ln(n) (n the
        number of keys of each sequence), QK-norm (LayerNorm) and LayerScale (init 1e-4 unless
        ``layer_scale`` is given). Other keywords as :class:`Attention`."""
        kwargs.setdefault("qk_norm", True)
        kwargs.setdefault("layer_scale", 1e-4)
        return cls(dim, num_heads, score="sigmoid", **kwargs)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *, causal: Optional[bool] = None,
                attn_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim); keys/values from ``context`` (B, M, dim) if given.

        Packed sequences: x (T, dim) with ``cu_seqlens`` (B+1,) and ``max_seqlen`` (self-attention).
        ``attn_mask``: dense inputs only, bool (True = allowed) or float, broadcastable to (B, H, N, M).
        """
        causal = self.causal if causal is None else causal
        kv = x if context is None else context
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(kv).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(kv).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        kw = dict(score=self.score, causal=causal, window=self.window, softcap=self.softcap,
                  dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        if self.score == "sigmoid":
            kw["sigmoid_bias"] = self.sigmoid_bias
        if self.score == "silu":
            kw["silu_norm"] = self.silu_norm
        if cu_seqlens is not None:
            if context is not None or attn_mask is not None:
                raise ValueError("cu_seqlens: packed inputs are self-attention without attn_mask")
            if max_seqlen is None:
                raise ValueError("max_seqlen: required with cu_seqlens")
            if self.rope_base is not None:
                pos = _packed_positions(cu_seqlens, x.shape[0])
                q, k = _rope(q, pos, self.rope_base), _rope(k, pos, self.rope_base)
            out = api.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)
        else:
            if self.rope_base is not None:  # queries sit at the last positions of the keys
                nq, nk = q.shape[1], k.shape[1]
                q = _rope(q, torch.arange(nk - nq, nk, device=q.device), self.rope_base)
                k = _rope(k, torch.arange(nk, device=k.device), self.rope_base)
            out = api.attention(q, k, v, attn_mask=attn_mask, **kw)
        out = self.out_proj(out.flatten(-2))
        return out * self.layer_scale if self.layer_scale is not None else out


def _packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    tok = torch.arange(total, device=cu_seqlens.device)
    starts = cu_seqlens.long()
    return tok - starts[torch.searchsorted(starts[1:], tok, right=True)]


def _rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding, GPT-NeoX halves: x (..., N, H, D) at positions pos (N,), float32 angles."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.to(torch.float32).view(-1, 1) * inv  # (N, D/2)
    cos, sin = ang.cos().unsqueeze(-2), ang.sin().unsqueeze(-2)  # (N, 1, D/2)
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2 :].float()
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).to(x.dtype)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` computed by omniattn: same constructor, parameters (load a
    torch module's state_dict as is) and forward outputs.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None), with
    PyTorch's layouts ((L, B, E) or batch_first (B, L, E); unbatched (L, E)) and mask conventions
    (bool True = NOT allowed, or float added). A key_padding_mask alone runs as packed sequences.
    ``need_weights=True`` (PyTorch's default) also returns the (B, L, S) weights, which must be
    materialised for that: pass ``need_weights=False`` to keep memory O(N). With dropout in
    training the returned weights are those before dropout.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # now (L, B, E) as PyTorch's functional form
        tgt_len, bsz, embed = query.shape
        h, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = nn.functional.linear(query, w_q, b_q)
        k = nn.functional.linear(key, w_k, b_k)
        v = nn.functional.linear(value, w_v, b_v)
        mask = _allowed_mask(attn_mask, key_padding_mask, bsz, h, tgt_len, key.shape[0], q.dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, embed)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, embed)])
            mask = _pad_key(mask)
        q, k, v = (t.reshape(t.shape[0], bsz, h, hd).permute(1, 2, 0, 3) for t in (q, k, v))  # (B, H, N, hd)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, h, 1, hd)], 2)
            v = torch.cat([v, v.new_zeros(bsz, h, 1, hd)], 2)
            mask = _pad_key(mask)
        causal = bool(is_causal) and attn_mask is None and key_padding_mask is None
        dropout = self.dropout if self.training else 0.0
        out = api.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed)
        out = self.out_proj(out)
        weights = None
        if need_weights:
            cd = torch.promote_types(q.dtype, torch.float32)
            s = (q.to(cd) @ k.to(cd).transpose(-1, -2)) / math.sqrt(hd)
            if causal:
                s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
            weights = torch.softmax(s, -1).to(q.dtype)
            if average_attn_weights:
                weights = weights.mean(1)
            if unbatched:
                weights = weights.squeeze(0)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _allowed_mask(attn_mask, key_padding_mask, bsz, heads, tgt_len, src_len, dtype):
    """PyTorch MHA's masks (bool True = masked out, or float added) as one SDPA mask (bool True =
    allowed, or float), broadcastable to (B, H, L, S); None when there is none."""
    def canonical(m, shape):
        if m is None:
            return None
        if m.dtype == torch.bool:
            return (~m).reshape(shape)
        if not m.is_floating_point():
            raise TypeError(f"attn_mask/key_padding_mask: expected bool or float, got {m.dtype}")
        return m.to(dtype).reshape(shape)

    pad = canonical(key_padding_mask, (bsz, 1, 1, src_len))
    if attn_mask is not None and attn_mask.dim() == 3:
        am = canonical(attn_mask, (bsz, heads, tgt_len, src_len))
    else:
        am = canonical(attn_mask, (1, 1, tgt_len, src_len))
    if pad is None or am is None:
        return pad if pad is not None else am
    if pad.dtype == am.dtype == torch.bool:
        return pad & am
    as_float = lambda m: m if m.dtype != torch.bool else torch.zeros_like(m, dtype=dtype).masked_fill(~m, -math.inf)  # noqa: E731
    return as_float(pad) + as_float(am)


def _pad_key(mask):
    """One more key (bias_kv / zero attention), visible to every query."""
    if mask is None:
        return None
    fill = True if mask.dtype == torch.bool else 0.0
    return nn.functional.pad(mask, (0, 1), value=fill)

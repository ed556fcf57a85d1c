"""The maths of DESIGN.md, materialised: the specification every backend is tested against.

Each sequence's full (Lq, Lk) score matrix is built explicitly, in float64 by default, and
gradients come from autograd. Obviously correct beats fast here; never use this for long inputs.

The functions take the same arguments as the public API (plus ``dtype``, the compute dtype) and
return results in that compute dtype, so tests can measure a backend's error against it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import spec as _spec
from .spec import Call, Spec

__all__ = [
    "attention",
    "attention_varlen",
    "hstu_attention",
    "allowed_mask",
    "hstu_allowed_mask",
    "hstu_ids",
    "relative_bias",
    "run",
]


def allowed_mask(lq: int, lk: int, window: tuple[int, int], device=None) -> torch.Tensor:
    """(lq, lk) bool: key j is visible from query i. ``window`` is (left, right), -1 unbounded;
    causal is window right = 0. Bottom-right aligned: query i sits at key position i + lk - lq."""
    i = torch.arange(lq, device=device).view(-1, 1) + (lk - lq)
    j = torch.arange(lk, device=device).view(1, -1)
    left, right = window
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def hstu_ids(length: int, num_targets: int, contextual_seq_len: int, device=None) -> tuple[torch.Tensor, int]:
    """HSTU's position ids of one sequence and its max_id (DESIGN.md)."""
    p = torch.arange(length, device=device)
    if contextual_seq_len > 0:
        ids = (p - contextual_seq_len + 1).clamp(min=0)
        max_id = length - contextual_seq_len + 1
    else:
        ids, max_id = p, length
    max_id -= num_targets
    return ids.clamp(max=max_id), max_id


def hstu_allowed_mask(
    length: int,
    causal: bool = True,
    num_targets: int = 0,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    device=None,
) -> torch.Tensor:
    """(L, L) bool mask of HSTU attention for one sequence (targets never see each other)."""
    ids, max_id = hstu_ids(length, num_targets, contextual_seq_len, device)
    d = ids.view(-1, 1) - ids.view(1, -1)
    if not causal:
        d = d.abs()
    eye = torch.eye(length, dtype=torch.bool, device=device)
    ok = eye | (d > 0)
    if max_attn_len > 0:
        ok &= d <= max_attn_len
    if contextual_seq_len > 0:
        ok |= (ids.view(-1, 1) == 0) & (ids.view(1, -1) < max_id)
    return ok


def relative_bias(
    pos_w: torch.Tensor, ts_w: torch.Tensor, timestamps: torch.Tensor, max_seq_len: int, num_buckets: int,
    bucketization: str, num_targets: int = 0,
) -> torch.Tensor:
    """(Hr, L, L) materialised rab of one sequence: pos_w[M-1+p(j)-p(i)] + ts_w[bucket(t_next(i) - t_j)],
    p(i) = min(i, L - num_targets): the targets share one position, as they share one id."""
    length = timestamps.shape[0]
    p = torch.arange(length, device=timestamps.device).clamp(max=length - num_targets)
    rel = (max_seq_len - 1) + p.view(1, -1) - p.view(-1, 1)
    t_next = torch.cat([timestamps[1:], timestamps[-1:]])
    dt = t_next.view(-1, 1) - timestamps.view(1, -1)
    x = dt.abs().to(torch.float32).clamp(min=1.0)
    x = torch.log(x) / 0.301 if bucketization == "log" else torch.sqrt(x)
    bucket = x.floor().clamp(0, num_buckets).long()
    return pos_w[:, rel] + ts_w[:, bucket]


def _sequence(q, k, v, spec: Spec, call: Call, b: int, q0: int, k0: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (Lq, Hq, Dv) and lse (Hq, Lq) of sequence b."""
    lq, lk = call.lens_q[b], call.lens_k[b]
    hq, g = q.shape[1], q.shape[1] // k.shape[1]
    qh = q[q0 : q0 + lq].to(dtype).transpose(0, 1)  # (Hq, Lq, D)
    kh = k[k0 : k0 + lk].to(dtype).transpose(0, 1).repeat_interleave(g, 0)  # (Hq, Lk, D)
    vh = v[k0 : k0 + lk].to(dtype).transpose(0, 1).repeat_interleave(g, 0)  # (Hq, Lk, Dv)
    s = spec.scale * qh @ kh.transpose(1, 2)  # (Hq, Lq, Lk)
    if spec.softcap > 0:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if call.alibi is not None:
        i = torch.arange(lq, device=q.device).view(-1, 1) + (lk - lq)
        j = torch.arange(lk, device=q.device).view(1, -1)
        s = s - call.alibi[b].to(dtype).view(-1, 1, 1) * (i - j).abs().to(dtype)
    if call.rab is not None:
        r = call.rab
        ts = r.timestamps[q0 : q0 + lq]
        t = call.targets_host[b] if call.targets_host is not None else 0
        s = s + relative_bias(r.pos_w.to(dtype), r.ts_w.to(dtype), ts, r.max_seq_len, r.num_buckets, r.bucketization, t)
    if spec.hstu is not None:
        h = spec.hstu
        t = call.targets_host[b] if call.targets_host is not None else 0
        ok = hstu_allowed_mask(lq, h.causal, t, h.contextual_seq_len, h.max_attn_len, q.device)
    else:
        ok = allowed_mask(lq, lk, spec.window, q.device)
    if spec.score == "softmax":
        s = s.masked_fill(~ok, -math.inf)
        lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no allowed key
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    elif spec.score == "sigmoid":
        bias = spec.sigmoid_bias if spec.sigmoid_bias is not None else -math.log(max(lk, 1))
        p = torch.sigmoid(s + bias) * ok
        lse = torch.full((hq, lq), math.nan, dtype=dtype, device=q.device)
    else:
        norm = spec.silu_norm if spec.silu_norm is not None else float(max(call.max_k, 1))
        p = F.silu(s) / norm * ok
        lse = torch.full((hq, lq), math.nan, dtype=dtype, device=q.device)
    return (p @ vh).transpose(0, 1), lse


def run(spec: Spec, call: Call, dtype=torch.float64) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Packed output (Tq, Hq, Dv) in ``dtype`` and, for softmax, lse (Hq, Tq) (float32 unless dtype is float64)."""
    q, k, v = call.packed()
    outs, lses = [], []
    q0 = k0 = 0
    for b in range(call.batch):
        o, lse = _sequence(q, k, v, spec, call, b, q0, k0, dtype)
        outs.append(o)
        lses.append(lse)
        q0 += call.lens_q[b]
        k0 += call.lens_k[b]
    hq, dv = q.shape[1], v.shape[2]
    out = torch.cat(outs, 0) if outs else q.new_zeros((0, hq, dv), dtype=dtype)
    if spec.score != "softmax":
        return out, None
    lse = torch.cat(lses, 1) if lses else q.new_zeros((hq, 0), dtype=dtype)
    return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)


# Public mirrors of the API, computing in `dtype` (float64 by default) and returning that dtype.


def attention(q, k, v, *, score="softmax", causal=False, window=(-1, -1), scale=None, sigmoid_bias=None,
              silu_norm=None, softcap=0.0, alibi_slopes=None, return_lse=False, dtype=torch.float64):
    """Reference of :func:`omniattn.attention` (dense (B, N, H, D) layout)."""
    spec, call = _spec.dense_call(
        q, k, v, score=score, causal=causal, window=window, scale=scale, sigmoid_bias=sigmoid_bias,
        silu_norm=silu_norm, softcap=softcap, alibi_slopes=alibi_slopes, precision="exact",
        backend="reference", return_lse=return_lse,
    )
    out, lse = run(spec, call, dtype)
    out = call.unpack(out)
    return (out, call.unpack_lse(lse)) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, score="softmax",
                     causal=False, window=(-1, -1), scale=None, sigmoid_bias=None, silu_norm=None, softcap=0.0,
                     alibi_slopes=None, return_lse=False, dtype=torch.float64):
    """Reference of :func:`omniattn.attention_varlen` (packed (T, H, D) layout)."""
    spec, call = _spec.varlen_call(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, score=score, causal=causal,
        window=window, scale=scale, sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=softcap,
        alibi_slopes=alibi_slopes, precision="exact", backend="reference", return_lse=return_lse,
    )
    out, lse = run(spec, call, dtype)
    return (out, lse) if return_lse else out


def hstu_attention(q, k, v, seq_offsets, max_seq_len, *, alpha=None, causal=True, num_targets=None,
                   contextual_seq_len=0, max_attn_len=0, rab=None, timestamps=None, silu_norm=None,
                   dtype=torch.float64):
    """Reference of :func:`omniattn.hstu_attention` (jagged (T, H, D) layout)."""
    spec, call = _spec.hstu_call(
        q, k, v, seq_offsets, max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
        contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, rab=rab, timestamps=timestamps,
        silu_norm=silu_norm, precision="exact", backend="reference",
    )
    return run(spec, call, dtype)[0]

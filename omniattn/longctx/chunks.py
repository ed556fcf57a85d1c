"""Attention of a block of query rows over one chunk of keys, and the exact merge of partial results.

Query rows are the last rows of the context: row r of an m-row block sits at position
q_end - m + r; the chunk holds keys at positions k_start .. k_end - 1. Causal attention needs no
positional mask beyond flash-attn's bottom-right alignment: rows up to position k_end - 1 go in
one causal call whose rows END at the chunk's end (its last row is at position k_end - 1, aligned
with the last key, so each row sees exactly the keys at or before its position), and rows past
the chunk see all of it (one unmasked call). Few rows (decoding) run the split-KV decode kernel;
many rows the regular kernels through ``omniattn.backends.forward``. No autograd.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backends, decode
from ..spec import Call, Spec


def chunk_spec(score: str, scale: float, causal: bool, sigmoid_bias: Optional[float], silu_norm: Optional[float]) -> Spec:
    """The Spec of every chunk call: the score constants pinned to the WHOLE context's values."""
    return Spec(score=score, scale=scale, causal=causal, window=(-1, 0) if causal else (-1, -1),
                sigmoid_bias=sigmoid_bias if score == "sigmoid" else None,
                silu_norm=silu_norm if score == "silu" else None, return_lse=score == "softmax")


def _call(spec: Spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str):
    """(out, lse) of q (B, m, Hq, D) against all of k, v (B, n, Hkv, D), bottom-right aligned."""
    b, m, n = q.shape[0], q.shape[1], k.shape[1]
    if m <= decode.DECODE_MAX_NQ:
        lens = torch.full((b,), n, dtype=torch.int32, device=q.device)
        call = decode.KVCacheCall(q, k, v, lens, (n,) * b)
        return decode.run(spec, call, backend, out_dtype=torch.float32)
    call = Call(q, k, v, None, None, (m,) * b, (n,) * b, m, n)
    return backends.forward(spec, call, backend)


def attend(spec: Spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_end: int, k_start: int,
           backend: str = "auto") -> list:
    """Partial results of rows q (B, m, Hq, D) at positions q_end - m .. q_end - 1 over keys k, v
    (B, n, Hkv, D) at positions k_start .. k_start + n - 1: a list of (row slice, out, lse)
    (out (B, rows, Hq, Dv), lse (B, Hq, rows) float32 or None for the pointwise scores)."""
    m, n = q.shape[1], k.shape[1]
    if n == 0 or m == 0:
        return []
    k_end = k_start + n
    if not spec.causal:
        return [(slice(0, m), *_call(spec, q, k, v, backend))]
    first = q_end - m  # position of row 0
    if first >= k_end:  # every row past the chunk: it is wholly visible
        return [(slice(0, m), *_call(_unmasked(spec), q, k, v, backend))]
    masked_rows = min(k_end - first, m)  # rows at positions <= k_end - 1; the last is at k_end - 1 exactly
    parts = [(slice(0, masked_rows), *_call(spec, q[:, :masked_rows], k, v, backend))]
    if masked_rows < m:
        parts.append((slice(masked_rows, m), *_call(_unmasked(spec), q[:, masked_rows:], k, v, backend)))
    return parts


def _unmasked(spec: Spec) -> Spec:
    return Spec(score=spec.score, scale=spec.scale, causal=False, window=(-1, -1), sigmoid_bias=spec.sigmoid_bias,
                silu_norm=spec.silu_norm, return_lse=spec.return_lse)


class Accumulator:
    """The merged result of one query block: out (B, m, Hq, Dv) float32 and lse (B, Hq, m) float32."""

    def __init__(self, shape, softmax: bool, device):
        b, m, hq, dv = shape
        self.out = torch.zeros(b, m, hq, dv, dtype=torch.float32, device=device)
        self.lse = torch.full((b, hq, m), -math.inf, dtype=torch.float32, device=device) if softmax else None
        self.empty = True

    def add(self, rows: slice, out: torch.Tensor, lse: Optional[torch.Tensor]) -> None:
        acc = self.out[:, rows]
        acc_lse = self.lse[:, :, rows] if self.lse is not None else None
        if out.device != acc.device:
            out = out.to(acc.device, non_blocking=True)
            lse = lse.to(acc.device, non_blocking=True) if lse is not None else None
        merge_into(acc, acc_lse, out, lse)


def merge_into(acc: torch.Tensor, acc_lse: Optional[torch.Tensor], out: torch.Tensor, lse: Optional[torch.Tensor]) -> None:
    """In place: (acc, acc_lse) <- exact merge with (out, lse); sigmoid/SiLU (no lse): acc += out.
    acc (B, m, H, Dv) float32, lse (B, H, m). The Triton kernel on GPUs, tensor ops elsewhere."""
    if acc.is_cuda:
        from ..backends.triton.decode import merge_states_

        merge_states_(acc, acc_lse, out, lse)
        return
    if acc_lse is None:
        acc.add_(out)
        return
    m = torch.maximum(acc_lse, lse)
    m_safe = m.masked_fill(m == -math.inf, 0.0)
    wa = (acc_lse - m_safe).exp()
    wb = (lse - m_safe).exp()
    total = wa + wb
    empty = total == 0  # `== 0`: a NaN row stays NaN
    inv = 1.0 / total.masked_fill(empty, 1.0)
    acc.mul_((wa * inv).transpose(1, 2).unsqueeze(-1)).add_(out * (wb * inv).transpose(1, 2).unsqueeze(-1))
    acc_lse.copy_((m_safe + total.masked_fill(empty, 1.0).log()).masked_fill(empty, -math.inf))

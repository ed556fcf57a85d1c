"""The HSTU layer (Zhai et al. 2024, "Actions Speak Louder than Words"), on jagged sequences.

    U, V, Q, K = split(SiLU(W1 · LayerNorm(x)))            pointwise projection
    A V        = hstu_attention(Q, K, V, rab)               pointwise SiLU attention
    y          = x + W2 · Dropout(LayerNorm(A V) ⊙ U)       gated output, residual
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..api import hstu_attention
from ..hstu.relative_bias import RelativeBias


class HSTULayer(nn.Module):
    """One HSTU block over jagged sequences ``x (T, dim)`` with ``offsets (B+1,)``.

    Args:
        dim: model width.
        num_heads: attention heads.
        attention_dim: per-head width of Q and K (default dim // num_heads).
        linear_dim: per-head width of U and V (default dim // num_heads).
        dropout: on the gated attention output.
        max_seq_len: longest sequence (the relative bias's size and the SiLU norm).
        relative_bias: add HSTU's learnable relative position + time bias (needs ``timestamps``).
        num_buckets: time buckets of the bias.
        backend: omniattn backend for the attention.

    Example::

        layer = HSTULayer(dim=64, num_heads=2, max_seq_len=200)
        y = layer(x, offsets, timestamps=ts, num_targets=nt)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention_dim: Optional[int] = None,
        linear_dim: Optional[int] = None,
        dropout: float = 0.0,
        max_seq_len: int = 256,
        relative_bias: bool = True,
        num_buckets: int = 128,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1:
            raise ValueError(f"dim, num_heads: expected positive ints, got {dim}, {num_heads}")
        self.num_heads = num_heads
        self.attention_dim = attention_dim or max(dim // num_heads, 1)
        self.linear_dim = linear_dim or max(dim // num_heads, 1)
        self.max_seq_len = max_seq_len
        self.backend = backend
        self.input_norm = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, num_heads * (2 * self.linear_dim + 2 * self.attention_dim))
        self.output_norm = nn.LayerNorm(num_heads * self.linear_dim)
        self.output = nn.Linear(num_heads * self.linear_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.rab = RelativeBias(max_seq_len, num_buckets) if relative_bias else None

    def project(self, x: torch.Tensor):
        """u (T, H*dv), v (T, H, dv), q and k (T, H, dqk): the pointwise half of the layer."""
        h, dv, dqk = self.num_heads, self.linear_dim, self.attention_dim
        u, v, q, k = F.silu(self.uvqk(self.input_norm(x))).split([h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        return u, v.view(-1, h, dv), q.view(-1, h, dqk), k.view(-1, h, dqk)

    def finish(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Gate, project and add the residual: the half after the attention."""
        y = self.output_norm(attn.reshape(attn.shape[0], -1)) * u
        return x + self.output(self.dropout(y))

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: Optional[torch.Tensor] = None,
        num_targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        u, v, q, k = self.project(x)
        attn = hstu_attention(
            q, k, v, offsets, self.max_seq_len, num_targets=num_targets,
            rab=self.rab, timestamps=timestamps if self.rab is not None else None, backend=self.backend,
        )
        return self.finish(x, u, attn)

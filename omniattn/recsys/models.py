"""Sequential recommenders on omniattn: HSTU (pointwise SiLU attention, relative bias) and SASRec
(softmax attention). Both embed items with learned absolute positions, encode jagged histories
causally, and score items by cosine similarity over a temperature (HSTU's sampled-softmax setup).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..api import attention_varlen
from ..nn import HSTULayer
from .data import JaggedBatch


class SequentialRecommender(nn.Module):
    """Item + position embeddings, an encoder of ``blocks``, L2-normalised outputs."""

    def __init__(self, num_items: int, dim: int, max_seq_len: int, dropout: float):
        super().__init__()
        self.num_items = num_items
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def embed(self, batch: JaggedBatch) -> torch.Tensor:
        x = self.item_emb(batch.items) * math.sqrt(self.dim) + self.pos_emb(batch.positions)
        return self.dropout(x)

    def encode(self, batch: JaggedBatch) -> torch.Tensor:
        """(T, dim) unit vectors: the representation after each token, predicting the next item."""
        raise NotImplementedError

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        w = self.item_emb.weight if items is None else self.item_emb(items)
        return F.normalize(w, dim=-1)


class HSTU(SequentialRecommender):
    """The generative recommender of Zhai et al. 2024: a stack of HSTU layers."""

    def __init__(self, num_items: int, dim: int = 50, num_blocks: int = 2, num_heads: int = 1, max_seq_len: int = 200,
                 dropout: float = 0.2, relative_bias: bool = True, backend: str = "auto"):
        super().__init__(num_items, dim, max_seq_len, dropout)
        self.layers = nn.ModuleList(
            HSTULayer(dim, num_heads, dropout=dropout, max_seq_len=max_seq_len, relative_bias=relative_bias,
                      backend=backend)
            for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(dim)

    def encode(self, batch: JaggedBatch, num_targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(batch)
        for layer in self.layers:
            x = layer(x, batch.offsets, timestamps=batch.times, num_targets=num_targets)
        return F.normalize(self.norm(x), dim=-1)


class _SASRecBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, backend: str):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, offsets, max_len):
        h = self.num_heads
        q, k, v = self.qkv(self.norm1(x)).view(x.shape[0], 3, h, -1).unbind(1)
        a = attention_varlen(q, k, v, offsets, offsets, max_len, max_len, causal=True, backend=self.backend)
        x = x + self.dropout(self.proj(a.reshape(x.shape[0], -1)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SASRec(SequentialRecommender):
    """Kang & McAuley 2018, pre-norm, causal softmax self-attention (omniattn.attention_varlen)."""

    def __init__(self, num_items: int, dim: int = 50, num_blocks: int = 2, num_heads: int = 1, max_seq_len: int = 200,
                 dropout: float = 0.2, backend: str = "auto"):
        super().__init__(num_items, dim, max_seq_len, dropout)
        if dim % num_heads:
            raise ValueError(f"dim: {dim} is not a multiple of num_heads={num_heads}")
        self.blocks = nn.ModuleList(_SASRecBlock(dim, num_heads, dropout, backend) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)

    def encode(self, batch: JaggedBatch) -> torch.Tensor:
        x = self.embed(batch)
        max_len = int((batch.offsets[1:] - batch.offsets[:-1]).max()) if batch.offsets.numel() > 1 else 0
        for block in self.blocks:
            x = block(x, batch.offsets, max_len)
        return F.normalize(self.norm(x), dim=-1)


MODELS = {"hstu": HSTU, "sasrec": SASRec}

"""Attention across several GPUs (or CPU processes) on torch.distributed.

Context parallelism: every rank holds a shard of the sequence, (B, N/P, H, D).

* :func:`context_parallel_attention`: softmax, sigmoid and SiLU attention, causal / windows, GQA,
  packed varlen batches, forward and backward; strategies "ring" (K/V blocks travel around the
  ranks under the compute) and "allgather" (Llama 3 style; dK/dV reduce-scattered).
* :func:`context_parallel_hstu_attention`: HSTU over a jagged batch split across ranks.
* :func:`shard` / :func:`unshard` / :func:`shard_positions`: cut a full tensor into this rank's
  shard (zigzag: rank r holds chunks r and 2P-1-r of every sequence), gather it back, and the
  positions of the local rows (for RoPE).

Tensor parallelism with FastAttention's tiling-AllReduce is :class:`omniattn.nn.ParallelAttention`.
NCCL on GPUs, gloo on CPUs; the same code runs on both.
"""

from . import reference
from .api import choose_strategy, context_parallel_attention, shard, shard_positions, unshard
from .hstu import context_parallel_hstu_attention

__all__ = [
    "context_parallel_attention",
    "context_parallel_hstu_attention",
    "shard",
    "unshard",
    "shard_positions",
    "choose_strategy",
    "reference",
]

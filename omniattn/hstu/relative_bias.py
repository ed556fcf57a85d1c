"""HSTU's learnable relative attention bias: relative position plus bucketed time gap.

For query i and key j of one sequence the bias is (DESIGN.md)::

    rab_ij = pos_w[M - 1 + j - i] + ts_w[bucket(t_next(i) - t_j)]

with t_next(i) the timestamp of token i + 1 (the last token uses its own). The module only holds
the weights; the attention kernels read them per tile, so no (N, N) bias is ever built.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..spec import BUCKETIZATIONS


class RelativeBias(nn.Module):
    """Relative position + time-bucket bias for :func:`omniattn.hstu_attention`.

    Args:
        max_seq_len: longest sequence the position weights cover (M); holds 2M - 1 of them.
        num_buckets: time buckets; holds num_buckets + 1 weights (the last bucket is the clamp).
        bucketization: ``"log"``: floor(ln(max(|dt|, 1)) / 0.301); ``"sqrt"``: floor(sqrt(max(|dt|, 1))).
        num_heads: ``None`` shares one bias across heads; an int gives each head its own weights.

    Example::

        rab = RelativeBias(max_seq_len=200, num_buckets=128)
        out = omniattn.hstu_attention(q, k, v, offsets, 200, rab=rab, timestamps=ts)
    """

    def __init__(
        self,
        max_seq_len: int,
        num_buckets: int = 128,
        bucketization: str = "log",
        num_heads: Optional[int] = None,
        *,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len: expected an int >= 1, got {max_seq_len!r}")
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
            raise ValueError(f"num_buckets: expected an int >= 1, got {num_buckets!r}")
        if bucketization not in BUCKETIZATIONS:
            raise ValueError(f"bucketization: expected one of {list(BUCKETIZATIONS)}, got {bucketization!r}")
        if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
            raise ValueError(f"num_heads: expected None (shared) or an int >= 1, got {num_heads!r}")
        self.max_seq_len = max_seq_len
        self.num_buckets = num_buckets
        self.bucketization = bucketization
        self.num_heads = num_heads
        lead = () if num_heads is None else (num_heads,)
        self.pos_w = nn.Parameter(torch.empty(*lead, 2 * max_seq_len - 1, device=device, dtype=dtype))
        self.ts_w = nn.Parameter(torch.empty(*lead, num_buckets + 1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # HSTU's initialisation: small normal weights, so the bias starts near zero.
        nn.init.normal_(self.pos_w, std=0.02)
        nn.init.normal_(self.ts_w, std=0.02)

    def extra_repr(self) -> str:
        heads = "shared" if self.num_heads is None else f"num_heads={self.num_heads}"
        return f"max_seq_len={self.max_seq_len}, num_buckets={self.num_buckets}, bucketization={self.bucketization!r}, {heads}"


def bucketize(dt: torch.Tensor, num_buckets: int, bucketization: str) -> torch.Tensor:
    """Time-gap bucket of ``dt`` (any shape), int64 in [0, num_buckets]; float32 maths as HSTU."""
    return _bucket_of_gap(dt.abs().to(torch.float32), num_buckets, bucketization)


def _bucket_of_gap(x: torch.Tensor, num_buckets: int, bucketization: str) -> torch.Tensor:
    x = x.clamp(min=1.0)
    x = torch.log(x) / 0.301 if bucketization == "log" else torch.sqrt(x)
    return x.floor().clamp(0, num_buckets).long()


def bucket_edges(num_buckets: int, bucketization: str) -> torch.Tensor:
    """(num_buckets + 2,) float32: entry c is the smallest float32 gap whose bucket (bucketize's
    maths, run here) is >= c; -inf at 0 and +inf at num_buckets + 1. The Triton kernels find a
    pair's bucket from a fast estimate and one comparison with these (common.time_bucket).

    Found by bisection over the bit patterns of positive float32 (the bucket never decreases as
    the gap grows), all edges at once."""
    f32 = torch.float32
    lo = torch.full((num_buckets,), 0x3F800000, dtype=torch.int64)  # 1.0: bucket 0
    hi = torch.full((num_buckets,), 0x7F7FFFFF, dtype=torch.int64)  # the largest finite float32
    want = torch.arange(1, num_buckets + 1)
    top = _bucket_of_gap(hi.to(torch.int32).view(f32), num_buckets, bucketization)
    while bool((hi - lo > 1).any()):  # invariant: bucket(lo) < want <= bucket(hi), where reachable
        mid = (lo + hi) // 2
        up = _bucket_of_gap(mid.to(torch.int32).view(f32), num_buckets, bucketization) >= want
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    edges = torch.where(top >= want, hi.to(torch.int32).view(f32), torch.tensor(float("inf")))
    inf = torch.tensor([float("inf")])
    return torch.cat([-inf, edges, inf])

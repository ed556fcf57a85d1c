"""HSTU (Zhai et al. 2024): jagged pointwise SiLU attention with a relative position + time bias."""

from .relative_bias import RelativeBias, bucketize

__all__ = ["RelativeBias", "bucketize"]

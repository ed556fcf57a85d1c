"""Model building blocks on omniattn's kernels."""

from .hstu_layer import HSTULayer

__all__ = ["HSTULayer"]

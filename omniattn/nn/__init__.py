"""Model building blocks on omniattn's kernels."""

from .attention import Attention, MultiheadAttention
from .hstu_layer import HSTULayer
from .parallel import ParallelAttention

__all__ = ["Attention", "HSTULayer", "MultiheadAttention", "ParallelAttention"]

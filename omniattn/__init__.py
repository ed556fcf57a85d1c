"""omniattn: one family of fused, memory-efficient attention kernels.

Softmax, sigmoid (FlashSigmoid) and SiLU (HSTU) attention with causal / sliding-window / varlen /
HSTU target-aware masks, GQA, ALiBi, softcap and HSTU's relative bias, on Triton GPUs and on a
tiled O(N)-memory PyTorch path for any other device. See DESIGN.md for the maths.
"""

from . import hstu, reference
from .api import attention, attention_varlen, hstu_attention, merge_attention_states, scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_varlen",
    "hstu_attention",
    "scaled_dot_product_attention",
    "merge_attention_states",
    "reference",
    "hstu",
    "__version__",
]

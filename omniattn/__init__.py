"""omniattn: one family of fused, memory-efficient attention kernels.

Softmax, sigmoid (FlashSigmoid) and SiLU (HSTU) attention with causal / sliding-window / varlen /
HSTU target-aware masks, GQA, ALiBi, softcap and HSTU's relative bias, exact or quantized
(INT8 / INT4 / FP8), on Triton GPUs and on a tiled O(N)-memory PyTorch path for any other device;
KV caches (decode) and contexts beyond GPU memory (longctx), several GPUs (distributed), and the
entry points people already use (compat, integrations, nn). See DESIGN.md for the maths.
"""

from . import distributed, hstu, longctx, quant, reference
from .api import attention, attention_varlen, hstu_attention, merge_attention_states, scaled_dot_product_attention
from .decode import attention_with_kvcache
from .quant import QuantConfig
from .usage import stats

__version__ = "0.2.0"

__all__ = [
    "attention",
    "attention_varlen",
    "hstu_attention",
    "scaled_dot_product_attention",
    "attention_with_kvcache",
    "merge_attention_states",
    "QuantConfig",
    "stats",
    "reference",
    "hstu",
    "quant",
    "longctx",
    "distributed",
    "__version__",
]

"""omniattn: one family of fused, memory-efficient attention kernels.

Softmax, sigmoid (FlashSigmoid) and SiLU (HSTU) attention with causal / sliding-window / varlen /
HSTU target-aware masks, GQA, ALiBi, softcap and HSTU's relative bias, exact or quantized
(INT8 / INT4 / FP8), on Triton GPUs and on a tiled O(N)-memory PyTorch path for any other device;
KV caches (decode) and contexts beyond GPU memory (longctx), several GPUs (distributed), and the
entry points people already use (compat, integrations, nn). See DESIGN.md for the maths.
"""

import importlib

from . import hstu, longctx, quant, reference
from .api import attention, attention_varlen, hstu_attention, merge_attention_states, scaled_dot_product_attention
from .decode import attention_with_kvcache
from .quant import QuantConfig
from .usage import stats

__version__ = "0.2.0"

# Loaded on first use: its host-side helpers are wrapped in torch.compiler.disable, which imports
# torch._dynamo (~1.4 s) — more than the whole rest of `import omniattn`.
_LAZY_SUBMODULES = ("distributed",)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

"""Quantized attention (SageAttention2's recipe for every score function): INT8 / INT4 / FP8 Q.K
with smoothing, FP8 P.V, per-layer adaptive precision.

``precision=`` on omniattn's attention functions selects it; :class:`QuantConfig` configures it;
:func:`calibrate` builds a per-call-site plan (:class:`Plan`, saved as JSON) that omniattn's
modules and the SDPA drop-in follow inside ``plan.apply(model)``.
"""

from .calibrate import Plan, calibrate, load_plan
from .config import PRECISIONS, QUANTIZED, QuantConfig

__all__ = ["QuantConfig", "calibrate", "load_plan", "Plan", "PRECISIONS", "QUANTIZED"]

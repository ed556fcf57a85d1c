"""Per-layer adaptive precision (SageAttention2, section 4.5): measure each attention call site's
accuracy under every candidate precision on calibration batches, keep the fastest that meets the bar.

A call site is an omniattn attention call, identified by its order within one forward pass of
the model (the same architecture calls its layers in the same order) and checked against the
call's shape signature. Every entry point is covered (omniattn.attention, attention_varlen,
hstu_attention, the SDPA drop-in, omniattn.nn modules): they all reach ``backends.run``, which
hands the call to :func:`dispatch` while a plan is being recorded or applied.

Example::

    plan = omniattn.quant.calibrate(model, batches, min_cos=0.999)
    plan.save("plan.json")
    with omniattn.quant.load_plan("plan.json").apply(model):
        logits = model(x)
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from .config import QUANTIZED

# Fastest first, as measured on the H100 (benchmarks/NOTES.md, quantized rows at 4x4096: INT8 Q.K
# with bf16 P.V ran faster than the FP8 P.V variants in this kernel): the candidates a plan prefers
# when several meet the bar.
SPEED_ORDER = ("int8", "fp8", "int8-fp8", "int4-fp8")

_STATE: dict = {"mode": None}  # "record" | "apply" | None; a plain global, so torch.compile guards on it


def active() -> bool:
    return _STATE["mode"] is not None


def _signature(spec, call) -> list:
    return [spec.score, spec.hstu is not None, call.heads_q, call.k.shape[-2], call.q.shape[-1], call.v.shape[-1]]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = a.norm() * b.norm()
    return 1.0 if denom == 0 else float((a @ b) / denom)


def dispatch(spec, call, backend: str, run: Callable):
    """Run one attention call under the active plan (backends.run calls this while one is active)."""
    site = _STATE["next_site"]
    _STATE["next_site"] = site + 1
    plan: Plan = _STATE["plan"]
    sig = _signature(spec, call)
    if _STATE["mode"] == "record":
        from dataclasses import replace

        out, lse = run(spec, call, backend)  # the caller's precision (exact, normally): the reference
        while len(plan.sites) <= site:
            plan.sites.append(Site(signature=sig))
        rec = plan.sites[site]
        if rec.signature != sig:
            raise ValueError(f"calibrate: call {site} of this forward pass has signature {sig}, an earlier pass had "
                             f"{rec.signature}; calibrate one architecture with the same call order in every batch")
        with torch.no_grad():
            for cand in plan.candidates:
                try:
                    got, _ = run(replace(spec, precision=cand), call, backend)
                    cos = _cosine(got, out)
                except (ValueError, TypeError, NotImplementedError) as e:  # this site cannot run it here
                    rec.unavailable[cand] = str(e)
                    continue
                rec.cos[cand] = min(rec.cos.get(cand, 1.0), cos)
        return out, lse
    rec = plan.sites[site] if site < len(plan.sites) else None
    if rec is None or rec.signature != sig:
        raise ValueError(f"plan: call {site} (signature {sig}) does not match the calibrated model "
                         f"({len(plan.sites)} call sites); recalibrate for this model")
    if rec.precision == "exact" or spec.precision != "exact":  # an explicit precision wins over the plan
        return run(spec, call, backend)
    from dataclasses import replace

    return run(replace(spec, precision=rec.precision), call, backend)


@dataclass
class Site:
    signature: list
    cos: dict = field(default_factory=dict)  # candidate -> worst cosine similarity over the batches
    unavailable: dict = field(default_factory=dict)  # candidate -> why it could not run
    precision: str = "exact"


@dataclass
class Plan:
    """The precision of every call site, with the accuracy that chose it."""

    candidates: tuple = SPEED_ORDER
    min_cos: float = 0.999
    sites: list = field(default_factory=list)

    def choose(self) -> "Plan":
        for rec in self.sites:
            ok = [c for c in SPEED_ORDER if c in self.candidates and rec.cos.get(c, -1.0) >= self.min_cos]
            rec.precision = ok[0] if ok else "exact"
        return self

    @property
    def precisions(self) -> list[str]:
        return [rec.precision for rec in self.sites]

    @contextlib.contextmanager
    def apply(self, model: Optional[torch.nn.Module] = None):
        """Within this block, omniattn calls run at the plan's precision per call site. With a
        ``model``, the site count restarts at each of its forward passes (else at each ``apply``)."""
        with _session("apply", self, model):
            yield self

    def to_json(self) -> dict:
        return {"candidates": list(self.candidates), "min_cos": self.min_cos,
                "sites": [dict(signature=r.signature, cos=r.cos, unavailable=r.unavailable, precision=r.precision)
                          for r in self.sites]}

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        try:
            sites = [Site(signature=list(r["signature"]), cos=dict(r["cos"]), unavailable=dict(r.get("unavailable", {})),
                          precision=r["precision"]) for r in data["sites"]]
            plan = cls(candidates=tuple(data["candidates"]), min_cos=float(data["min_cos"]), sites=sites)
        except (KeyError, TypeError) as e:
            raise ValueError(f"plan: not an omniattn calibration plan ({type(e).__name__}: {e})") from None
        for rec in plan.sites:
            if rec.precision not in ("exact",) + QUANTIZED:
                raise ValueError(f"plan: unknown precision {rec.precision!r}")
        return plan


def load_plan(path) -> Plan:
    with open(path) as f:
        return Plan.from_json(json.load(f))


@contextlib.contextmanager
def _session(mode: str, plan: Plan, model: Optional[torch.nn.Module]):
    if _STATE["mode"] is not None:
        raise RuntimeError("omniattn.quant: a calibration plan is already being recorded or applied")
    hook = None
    if model is not None:
        hook = model.register_forward_pre_hook(lambda *_: _STATE.update(next_site=0))
    _STATE.update(mode=mode, plan=plan, next_site=0)
    try:
        yield
    finally:
        _STATE.update(mode=None, plan=None, next_site=0)
        if hook is not None:
            hook.remove()


def calibrate(model: torch.nn.Module, batches: Iterable, candidates: Iterable[str] = SPEED_ORDER,
              min_cos: float = 0.999, forward: Optional[Callable] = None) -> Plan:
    """Run ``model`` on each batch with exact attention; at every attention call also run each
    candidate precision on the same inputs and record its cosine similarity to the exact output
    (the worst over the batches). Returns the plan choosing, per call site, the fastest candidate
    with cosine >= ``min_cos`` (else exact).

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``, ``model(*batch)`` for
    tuples and lists, ``model(**batch)`` for dicts).
    """
    candidates = tuple(candidates)
    for c in candidates:
        if c not in QUANTIZED:
            raise ValueError(f"candidates: expected precisions among {list(QUANTIZED)}, got {c!r}")
    if not 0.0 < min_cos <= 1.0:
        raise ValueError(f"min_cos: expected a number in (0, 1], got {min_cos!r}")
    forward = forward or _default_forward
    plan = Plan(candidates=candidates, min_cos=float(min_cos))
    seen = 0
    with torch.no_grad(), _session("record", plan, model):
        for batch in batches:
            forward(model, batch)
            seen += 1
    if seen == 0:
        raise ValueError("batches: expected at least one calibration batch, got none")
    if not plan.sites:
        raise ValueError("calibrate: the model made no omniattn attention call (patch the SDPA drop-in in or use "
                         "omniattn.nn modules)")
    return plan.choose()


def _default_forward(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)

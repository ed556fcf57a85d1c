"""Quantized attention: checks, then the Triton kernels (GPU) or the CPU emulation."""

from __future__ import annotations

import torch

from ..spec import Call, Spec
from .config import DEFAULT, PV_FP8, QK_MODE, gpu_precisions, resolve


def _reject(spec: Spec, call: Call, precision: str) -> None:
    """Clear errors for what quantized attention does not do, naming the nearest supported choice."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v)):
        raise ValueError(f"precision={precision!r} is inference only (no backward pass); call it under "
                         "torch.no_grad() or with inputs that do not require grad, or use precision='exact' to train")
    if spec.dropout_p > 0:
        raise ValueError(f"dropout_p: precision={precision!r} is inference only; use dropout_p=0.0")
    if call.rab is not None and call.rab.pos_w.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"rab: precision={precision!r} is inference only; run it under torch.no_grad()")
    d = call.q.shape[-1]
    if QK_MODE[precision] == 2 and (d < 32 or d & (d - 1)):
        raise ValueError(f"q: precision='int4-fp8' packs the head dim in halves and needs a power of two >= 32, "
                         f"got {d}; use precision='int8-fp8'")
    if call.q.dtype == torch.float64:
        raise TypeError("q: quantized precisions take float16, bfloat16 or float32 inputs, got float64")


def run_quantized(spec: Spec, call: Call, backend: str):
    """(out, lse) of a quantized call in the caller's layout."""
    from ..backends import resolve as resolve_backend

    name = resolve_backend(backend, spec, call)
    precision = resolve(spec.precision)
    if precision == "exact":  # "auto" where nothing quantized pays off
        from .. import backends

        return backends.run(_exact(spec), call, backend)
    _reject(spec, call, precision)
    cfg = spec.quant or DEFAULT
    if name == "reference":
        raise ValueError(f"backend='reference' computes the exact maths; precision={precision!r} runs on "
                         "backend='triton' (GPU) or backend='torch' (the CPU emulation)")
    if name == "triton":
        return _triton(spec, call, precision, cfg)
    from .emulate import emulate

    return emulate(spec, call, precision, cfg)


def _exact(spec: Spec) -> Spec:
    from dataclasses import replace

    return replace(spec, precision="exact", quant=None)


def _triton(spec: Spec, call: Call, precision: str, cfg):
    from ..backends.triton import launch, launch_params, supported
    from ..backends.triton.configs import quant_fwd_config
    from .quantize import quantize_triton

    if call.q.is_cuda and precision not in gpu_precisions(call.q.device):
        runs = gpu_precisions(call.q.device)
        nearest = "int8" if "int8" in runs else "exact"
        major, minor = torch.cuda.get_device_capability(call.q.device)
        raise ValueError(f"precision={precision!r} needs FP8 tensor cores (sm89+), this GPU is sm{major}{minor}; "
                         f"use precision={nearest!r}")
    ok, why = supported(call.q.device, explicit=True)
    if not ok:
        raise ValueError(f"backend='triton': {why}; use backend='torch'")
    p, extras = launch_params(spec, call)
    tiles = quant_fwd_config(max(call.q.shape[-1], call.v.shape[-1]), PV_FP8[precision])
    qz = quantize_triton(call.q, call.k, call.v, call.cu_q, call.cu_k, call.lens_q, call.lens_k, call.max_q,
                         call.max_k, precision=precision, cfg=cfg, block_m=tiles.block_m, block_n=tiles.block_n,
                         row_bias=spec.score != "softmax" or spec.return_lse)
    if not call.dense:  # the tile schedule must follow the quantization tiles
        from ..backends.triton import schedule

        extras = extras._replace(tiles_fwd=schedule.tile_list(call.lens_q, call.lens_k, tiles.block_m, p.causal, True,
                                                              call.heads_q, call.q.device))
    with torch.no_grad():
        out, lse = launch.forward(call.q, call.k, call.v, extras, call.max_q, call.max_k, p, quant=qz)
    return out, (lse if spec.score == "softmax" else None)


__all__ = ["run_quantized", "PV_FP8"]

"""Backend choice: every public function validates its inputs into (Spec, Call), then comes here.

Backends return the output and, for softmax, the float32 log-sum-exp in the caller's layout:
dense (B, Nq, Hq, Dv) and (B, Hq, Nq); varlen (Tq, Hq, Dv) and (Hq, Tq).
"""

from __future__ import annotations

import warnings

import torch

from .. import reference
from ..spec import Call, Spec

_warned: set = set()


def triton_supported(device: torch.device, explicit: bool = False) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``, and why not."""
    from .triton import supported

    return supported(device, explicit)


def resolve_for_tensor(t: torch.Tensor) -> str:
    """What backend="auto" runs for inputs like ``t``: Triton where it runs, else the tiled PyTorch path."""
    ok, why = triton_supported(t.device)
    if not ok and t.is_cuda and why not in _warned:  # a GPU the kernels do not support: say so, once
        _warned.add(why)
        warnings.warn(f"omniattn: {why}; using the tiled PyTorch backend", stacklevel=3)
    return "triton" if ok else "torch"


def resolve(backend: str, spec: Spec, call: Call) -> str:
    return resolve_for_tensor(call.q) if backend == "auto" else backend


def run(spec: Spec, call: Call, backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if spec.precision != "exact":
        raise NotImplementedError(
            f"precision={spec.precision!r}: quantized attention is not implemented in this version of omniattn; "
            "use precision='exact'"
        )
    name = resolve(backend, spec, call)
    if name == "triton":
        ok, why = triton_supported(call.q.device, explicit=True)
        if not ok:
            raise NotImplementedError(f"backend='triton': {why}; use backend='torch' or 'auto'")
        from . import triton as triton_backend

        return triton_backend.attention(spec, call)
    if name == "reference":
        cdtype = torch.float64 if call.q.dtype == torch.float64 else torch.float32
        out, lse = reference.run(spec, call, cdtype)
        out = out.to(call.q.dtype)
    else:
        from . import torch_tiled

        out, lse = torch_tiled.attention(spec, call)
    return call.unpack(out), (call.unpack_lse(lse) if lse is not None else None)

"""Backend choice: every public function validates its inputs into (Spec, Call), then comes here.

Backends return the packed output (Tq, Hq, Dv) in the inputs' dtype and, for softmax, the
log-sum-exp (Hq, Tq) in float32.
"""

from __future__ import annotations

import torch

from .. import reference
from ..spec import Call, Spec


def triton_supported(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``, and why not."""
    return False, "the Triton kernels are not part of this build yet"


def resolve_for_tensor(t: torch.Tensor) -> str:
    """What backend="auto" runs for inputs like ``t``: Triton where it runs, else the tiled PyTorch path."""
    return "triton" if triton_supported(t.device)[0] else "torch"


def resolve(backend: str, spec: Spec, call: Call) -> str:
    return resolve_for_tensor(call.q) if backend == "auto" else backend


def run(spec: Spec, call: Call, backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if spec.precision != "exact":
        raise NotImplementedError(
            f"precision={spec.precision!r}: quantized attention is not implemented in this version of omniattn; "
            "use precision='exact'"
        )
    name = resolve(backend, spec, call)
    if name == "reference":
        cdtype = torch.float64 if call.q.dtype == torch.float64 else torch.float32
        out, lse = reference.run(spec, call, cdtype)
        return out.to(call.q.dtype), lse
    if name == "torch":
        from . import torch_tiled

        return torch_tiled.attention(spec, call)
    ok, why = triton_supported(call.q.device)
    raise NotImplementedError(f"backend='triton': {why}; use backend='torch' or 'auto'")

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
    """The backend a call runs on. "auto": Triton where it runs; on CPUs PyTorch's fused kernel
    ("sdpa") for the calls it computes exactly (see torch_sdpa.eligible), else the tiled path."""
    if backend != "auto":
        return backend
    name = resolve_for_tensor(call.q)
    if name == "torch" and call.q.device.type == "cpu":
        from . import torch_sdpa

        if torch_sdpa.eligible(spec, call):
            return "sdpa"
    return name


def run(spec: Spec, call: Call, backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    from ..quant.calibrate import active, dispatch

    if active():  # a calibration plan is being recorded or applied: it decides per call site
        return dispatch(spec, call, backend, _run)
    return _run(spec, call, backend)


def _run(spec: Spec, call: Call, backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if spec.precision != "exact":
        from ..quant.attention import run_quantized

        return run_quantized(spec, call, backend)
    name = resolve(backend, spec, call)
    if name in ("torch", "sdpa") and call.dense and spec.dropout_p == 0 and torch.compiler.is_compiling():
        from .. import _ops_torch  # one opaque op while dynamo traces (the eager code decides on data)

        return _ops_torch.attention(spec, call, name)
    if name == "sdpa":
        from . import torch_sdpa

        fused = torch_sdpa.attention(spec, call)
        if fused is not None:
            return fused
        name = "torch"  # non-finite inputs: the tiled path applies DESIGN.md's exact rule
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


# --------------------------------------------------------------------------------------------
# Block primitives for code that splits one attention over several calls (context parallel
# across ranks, KV chunks streamed from the host, KV caches): the forward without an autograd
# graph, and the backward of ONE key block given the output and lse of the WHOLE attention.
# For softmax that is exact because dS_ij = P_ij (dP_ij - delta_i) only needs the global lse
# (P_ij = exp(s_ij - lse_i)) and delta_i = dO_i . O_i of the merged output; sigmoid and SiLU
# are pointwise, so every block's gradient is independent of the others.


def forward(spec: Spec, call: Call, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output and (softmax) lse in the caller's layout, computed without recording autograd.

    lse is float32: dense (B, Hq, Nq), varlen (Hq, Tq).
    """
    with torch.no_grad():
        name = resolve(backend, spec, call)
        if name == "triton":
            from .triton import launch, launch_params

            p, extras = launch_params(spec, call)
            out, lse = launch.forward(call.q, call.k, call.v, extras, call.max_q, call.max_k, p)
            return out, (lse if spec.score == "softmax" else None)
        return run(spec, call, name)


def backward(spec: Spec, call: Call, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this call's keys, in the caller's layout, for the loss whose gradient on
    the WHOLE attention's output is ``dout``; ``out``/``lse`` are that whole attention's output
    and (softmax) lse in the caller's layout (see the note above). Float32 lse."""
    name = resolve(backend, spec, call)
    if call.rab is not None:
        raise NotImplementedError("backends.backward: the relative bias has weight gradients; use the autograd path")
    if name == "triton":
        from .triton import launch, launch_params

        p, extras = launch_params(spec, call)
        lse_arg = lse if spec.score == "softmax" else call.q.new_empty(0, dtype=torch.float32)
        dq, dk, dv, _, _ = launch.backward(dout, call.q, call.k, call.v, out, lse_arg.contiguous(), None, extras,
                                           call.max_q, call.max_k, p)
        return dq, dk, dv
    if name in ("torch", "sdpa"):
        from . import torch_tiled

        return torch_tiled.block_backward(spec, call, out, lse, dout)
    raise NotImplementedError(f"backends.backward: backend={name!r} has no block backward; use 'torch' or 'triton'")

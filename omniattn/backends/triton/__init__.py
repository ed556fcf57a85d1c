"""Triton backend: one forward and one backward kernel family for every score function and mask.

Runs on CUDA GPUs of compute capability 8.0 or newer. Under ``TRITON_INTERPRET=1`` it also runs
on CPU tensors through Triton's interpreter (slowly; that is how CI tests the kernels), but
``backend="auto"`` never picks the interpreter.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ...spec import Call, Spec, remembered
from .configs import interpreting

MAX_HEAD_DIM = 256


# Hardware and install facts are constants of the process: computed once, and constants to
# torch.compile (assume_constant_result: evaluated at trace time, its body never traced, so a
# compiled model does not break its graph on them). No lru_cache: dynamo would trace through it.
_FACTS: dict = {}


def _fact(key, compute):
    if key not in _FACTS:
        _FACTS[key] = compute()
    return _FACTS[key]


@torch.compiler.assume_constant_result
def _triton_installed() -> bool:
    return _fact("triton", lambda: importlib.util.find_spec("triton") is not None)


@torch.compiler.assume_constant_result
def _capability(index: int) -> tuple[int, int]:
    return _fact(("capability", index), lambda: torch.cuda.get_device_capability(index))


@torch.compiler.assume_constant_result
def _bf16_supported() -> bool:
    return _fact("bf16", torch.cuda.is_bf16_supported)


def supported(device: torch.device, explicit: bool = False) -> tuple[bool, str]:
    """Whether the kernels can run on ``device`` (``explicit``: the caller asked for backend="triton")."""
    if not _triton_installed():
        return False, "triton is not installed"
    if device.type == "cpu" and explicit and interpreting():
        return True, ""
    if device.type != "cuda":
        return False, f"the Triton kernels need a CUDA GPU, the inputs are on {device}"
    major, minor = _capability(device.index if device.index is not None else 0)
    if major < 8:
        return False, f"the Triton kernels need compute capability 8.0+ (sm80), this GPU is sm{major}{minor}"
    return True, ""


def check_inputs(call: Call) -> None:
    """What the kernels cannot take, as clear errors (the tiled backend has none of these limits)."""
    q = call.q
    if call.q.shape[-1] > MAX_HEAD_DIM or call.v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"q/v: the Triton kernels take head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]} and {call.v.shape[-1]}; "
            "use backend='torch'"
        )
    if q.dtype == torch.float64:
        raise TypeError("q: the Triton kernels take float16, bfloat16 or float32, got float64; use backend='torch'")
    if q.dtype == torch.bfloat16 and q.is_cuda and not _bf16_supported():
        raise TypeError("q: this GPU has no bfloat16 support; use float16")


def _params(spec: Spec, call: Call):
    from .launch import SCORE_IDS, Params

    hstu = spec.hstu
    rab = call.rab
    left, right = spec.window if hstu is None else (-1, -1)
    norm = spec.silu_norm if spec.silu_norm is not None else float(max(call.max_k, 1))
    return Params(
        score=SCORE_IDS[spec.score],
        mask_kind=0 if hstu is None else 1,
        window_left=left,
        window_right=right,
        hstu_causal=int(hstu.causal) if hstu else 0,
        contextual=hstu.contextual_seq_len if hstu else 0,
        max_attn_len=hstu.max_attn_len if hstu else 0,
        rab_center=rab.max_seq_len - 1 if rab else 0,
        num_buckets=rab.num_buckets if rab else 0,
        bucket_log=int(rab.bucketization == "log") if rab else 0,
        default_sig_bias=int(spec.sigmoid_bias is None),
        dropout_seed=call.dropout_seed if spec.dropout_p > 0 else 0,
        deterministic=int(spec.deterministic),
        scale=spec.scale,
        softcap=spec.softcap,
        sigmoid_bias=spec.sigmoid_bias or 0.0,
        silu_scale=1.0 / norm,
        dropout_p=spec.dropout_p,
    )


def launch_params(spec: Spec, call: Call):
    """The launcher's scalars (launch.Params) and optional tensors (launch.Extras), including the
    varlen tile schedules of the forward, dQ and dK/dV kernels."""
    from . import schedule
    from .configs import bwd_dkdv_config, bwd_dq_config
    from .launch import Extras, forward_config, whole_heads_only, window_heads_per_launch

    check_inputs(call)
    p = _params(spec, call)
    rab = call.rab
    tiles = (None, None, None)
    q_windows = None
    # query windows (context-parallel HSTU reads a rank's rows of the whole batch): skipped where
    # the rows outside them could still matter (the relative bias' weight gradient sums over every
    # row; contextual rows are visited outside the query range)
    windows = call.query_windows if rab is None and p.contextual == 0 and not call.dense else None
    if not call.dense:
        dims = max(call.q.shape[-1], call.v.shape[-1])
        size = call.q.element_size()
        dev, lq, lk = call.q.device, call.lens_q, call.lens_k
        fwd = forward_config(call.q, call.k, call.v, p, call.max_q, spec.precision != "exact")[0].block_m
        dq = bwd_dq_config(dims, size, rab is not None).block_m
        dkdv = bwd_dkdv_config(dims, size, p.causal)
        hq, hkv = call.q.shape[-2], call.k.shape[-2]
        # with query windows the dK/dV kernel runs on chunks of heads (launch.window_heads_per_launch)
        dkdv_heads = hkv if windows is None else window_heads_per_launch(
            hkv, call.k, call.v, whole_heads_only(call.alibi, call.attn_mask, rab, spec.dropout_p, call.dense))
        tiles = (schedule.tile_list(lq, lk, fwd, p.causal, True, hq, dev, windows),
                 schedule.tile_list(lq, lk, dq, p.causal, True, hq, dev, windows),
                 schedule.tile_list(lk, lq, dkdv.block_n, p.causal, False, dkdv_heads, dev))
        if windows is not None:
            q_windows = schedule.query_windows(windows, dkdv.block_m, dev)
    extras = Extras(
        cu_q=None if call.dense else call.cu_q, cu_k=None if call.dense else call.cu_k, alibi=call.alibi,
        num_targets=call.num_targets, pos_w=rab.pos_w if rab else None, ts_w=rab.ts_w if rab else None,
        timestamps=_kernel_timestamps(rab.timestamps) if rab else None, attn_mask=call.attn_mask,
        tiles_fwd=tiles[0], tiles_dq=tiles[1], tiles_dkdv=tiles[2],
        lens_host=torch.tensor([call.lens_q, call.lens_k], dtype=torch.int64) if rab is not None else None,
        q_windows=q_windows,
    )
    return p, extras


def _kernel_timestamps(ts: torch.Tensor) -> torch.Tensor:
    """The timestamps as the kernels read them: int64 ones whose span is under 2^31 become int32
    offsets from their minimum, so that every pair's gap t_next(i) - t_j is an exact 32-bit
    difference (the bucket reads its float32 value, the same for equal integers): the per-pair
    gaps and their registers are half as wide, the biased HSTU forward 6-13% faster on an H100
    (benchmarks/NOTES.md, session 18). The span is read once per tensor (a device-to-host copy,
    remembered as the offsets' checks are); the offsets are made per call (only the minimum is
    kept, not a copy of the tensor). Other dtypes and wider spans: as given."""
    if ts.dtype != torch.int64 or ts.numel() == 0:
        return ts
    lo = remembered(ts, "int32 offsets", _offset_base)
    return ts if lo is None else (ts - lo).to(torch.int32)


def _offset_base(ts: torch.Tensor) -> Optional[int]:
    """The minimum of ``ts`` where every difference of two of its values fits int32, else None."""
    lo, hi = (int(x) for x in torch.aminmax(ts))
    return lo if hi - lo < 2**31 else None


def attention(spec: Spec, call: Call):
    """Output and lse in the caller's layout: dense (B, Nq, Hq, Dv) and (B, Hq, Nq), varlen (Tq, Hq, Dv) and (Hq, Tq)."""
    from ... import _ops  # registers the custom ops on first use

    p, extras = launch_params(spec, call)
    out, lse = _ops.attention(*_ops.forward_args(call.q, call.k, call.v, extras, call.max_q, call.max_k, p))
    return out, (lse if spec.score == "softmax" else None)

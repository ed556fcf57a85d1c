"""Host side of the Triton kernels: allocate outputs, pick tiles, build grids, launch.

Dense inputs keep their (B, N, H, D) strides (no copies); varlen inputs are (T, H, D) with
cu_seqlens. Only the last dimension must be contiguous.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from .bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from .configs import PREPROCESS_BLOCK_M, bwd_dkdv_config, bwd_dq_config, fwd_config, interpreting
from .fwd import attn_fwd_kernel

SCORE_IDS = {"softmax": 0, "sigmoid": 1, "silu": 2}


class Params(NamedTuple):
    """The scalars of a call, as the custom ops carry them (two flat lists)."""

    score: int
    mask_kind: int  # 0 causal/window, 1 HSTU
    window_left: int
    window_right: int
    hstu_causal: int
    contextual: int
    max_attn_len: int
    rab_center: int
    num_buckets: int
    bucket_log: int
    default_sig_bias: int
    scale: float
    softcap: float
    sigmoid_bias: float
    silu_scale: float

    def ints(self) -> list[int]:
        return [int(x) for x in self[:11]]

    def floats(self) -> list[float]:
        return [float(x) for x in self[11:]]

    @classmethod
    def from_lists(cls, ints, floats) -> "Params":
        return cls(*ints, *floats)


_DUMMIES: dict = {}


def _dummy(device, dtype) -> torch.Tensor:
    key = (str(device), dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMIES[key]


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides; batch stride 0 for packed (T, H, D) tensors."""
    if t.dim() == 3:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_shape_strides(q: torch.Tensor, batch: int):
    if q.dim() == 3:  # (Hq, Tq)
        return (q.shape[1], q.shape[0]), (0, q.shape[0])
    return (batch, q.shape[2], q.shape[1]), (q.shape[2] * q.shape[1], q.shape[1])


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


class _Launch:
    """Arguments shared by all kernels of one call."""

    def __init__(self, q, k, v, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, ts, max_q, max_k, p: Params):
        dev = q.device
        self.varlen = q.dim() == 3
        self.batch = cu_q.numel() - 1 if self.varlen else q.shape[0]
        self.hq, self.hkv = q.shape[-2], k.shape[-2]
        self.d, self.dv = q.shape[-1], v.shape[-1]
        self.max_q, self.max_k = max_q, max_k
        self.p = p
        i32, i64, f32 = torch.int32, torch.int64, torch.float32
        self.cu_q = cu_q if self.varlen else _dummy(dev, i32)
        self.cu_k = cu_k if self.varlen else _dummy(dev, i32)
        self.alibi = _dummy(dev, f32) if alibi is None else _last_contiguous(alibi)
        self.stride_ab = 0 if alibi is None else self.alibi.stride(0)
        self.num_targets = _dummy(dev, i32) if num_targets is None else num_targets.contiguous()
        self.has_rab = pos_w is not None
        self.pos_w = _last_contiguous(pos_w) if self.has_rab else _dummy(dev, f32)
        self.ts_w = _last_contiguous(ts_w) if self.has_rab else _dummy(dev, f32)
        self.ts = ts.contiguous() if ts is not None else _dummy(dev, i64)
        self.stride_pos_h = self.pos_w.stride(0) if self.has_rab and self.pos_w.shape[0] > 1 else 0
        self.stride_ts_h = self.ts_w.stride(0) if self.has_rab and self.ts_w.shape[0] > 1 else 0
        self.lse_shape, (self.stride_lb, self.stride_lh) = _lse_shape_strides(q, self.batch)
        self.softmax = p.score == 0
        self.meta = dict(
            SCORE=p.score,
            IS_VARLEN=self.varlen,
            MASK_KIND=p.mask_kind,
            HAS_LEFT=p.mask_kind == 0 and p.window_left >= 0,
            HAS_RIGHT=p.mask_kind == 0 and p.window_right >= 0,
            HSTU_CAUSAL=bool(p.hstu_causal),
            HAS_TARGETS=num_targets is not None,
            HAS_CONTEXT=p.mask_kind == 1 and p.contextual > 0,
            HAS_MAX_ATTN=p.mask_kind == 1 and p.max_attn_len > 0,
            HAS_SOFTCAP=p.softcap > 0,
            HAS_ALIBI=alibi is not None,
            HAS_RAB=self.has_rab,
            BUCKET_LOG=bool(p.bucket_log),
            HAS_MODS=p.softcap > 0 or alibi is not None or self.has_rab,  # scores need more than scale*q.k
            DEFAULT_SIG_BIAS=bool(p.default_sig_bias),
            # float32 inputs get IEEE float32 products (no TF32), like PyTorch's default matmul, and
            # exact transcendentals; 16-bit inputs get the one-instruction tanh (common.sigmoid)
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            FAST_MATH=q.dtype != torch.float32 and q.is_cuda and not interpreting(),
            BLOCK_D=_block(self.d),
            BLOCK_DV=_block(self.dv),
        )
        self.scalars = (
            p.scale, p.softcap, p.sigmoid_bias, p.silu_scale, p.window_left, p.window_right,
            p.contextual, p.max_attn_len, p.rab_center, p.num_buckets,
        )
        self.seqlens = (q.shape[1] if not self.varlen else max_q, k.shape[1] if not self.varlen else max_k)
        self.tune_len = triton.next_power_of_2(max(max_q, 64))

    def extras(self):
        return (self.cu_q, self.cu_k, self.alibi, self.num_targets, self.pos_w, self.ts_w, self.ts)


def forward(q, k, v, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, ts, max_q, max_k, p: Params):
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    L = _Launch(q, k, v, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, ts, max_q, max_k, p)
    out = torch.empty(q.shape[:-1] + (L.dv,), dtype=q.dtype, device=q.device)
    lse = torch.empty(L.lse_shape, dtype=torch.float32, device=q.device) if L.softmax else q.new_empty(0, dtype=torch.float32)
    causal = p.window_right == 0 or bool(p.hstu_causal)
    cfg = fwd_config(max(L.d, L.dv), q.element_size(), p.score, causal)
    grid = (triton.cdiv(max_q, cfg.block_m), L.batch * L.hq)
    if grid[0] * grid[1] == 0:
        return out, lse
    attn_fwd_kernel[grid](
        q, k, v, out, lse if L.softmax else _dummy(q.device, torch.float32), *L.extras(),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), L.stride_lb, L.stride_lh,
        L.stride_ab, L.stride_pos_h, L.stride_ts_h,
        *L.seqlens, L.hq, L.hq // L.hkv, L.d, L.dv, *L.scalars, L.tune_len,
        STORE_LSE=L.softmax, **L.meta, **cfg.launch_kwargs(),
    )
    return out, lse


def backward(dout, q, k, v, out, lse, dlse: Optional[torch.Tensor], cu_q, cu_k, alibi, num_targets, pos_w, ts_w, ts,
             max_q, max_k, p: Params):
    q, k, v, out, dout = (_last_contiguous(t) for t in (q, k, v, out, dout))
    L = _Launch(q, k, v, cu_q, cu_k, alibi, num_targets, pos_w, ts_w, ts, max_q, max_k, p)
    dev = q.device
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpos = torch.zeros(L.pos_w.shape, dtype=torch.float64, device=dev) if L.has_rab else _dummy(dev, torch.float64)
    dts = torch.zeros(L.ts_w.shape, dtype=torch.float64, device=dev) if L.has_rab else _dummy(dev, torch.float64)
    delta = lse
    if L.softmax:
        delta = torch.empty_like(lse)
        grid = (triton.cdiv(max_q, PREPROCESS_BLOCK_M), L.batch * L.hq)
        if grid[0] * grid[1]:
            attn_bwd_preprocess_kernel[grid](
                out, dout, dlse.contiguous() if dlse is not None else _dummy(dev, torch.float32), delta, L.cu_q,
                *_strides(out), *_strides(dout), L.stride_lb, L.stride_lh, L.seqlens[0], L.hq, L.dv,
                IS_VARLEN=L.varlen, HAS_DLSE=dlse is not None, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=L.meta["BLOCK_DV"],
            )
    else:
        lse = delta = _dummy(dev, torch.float32)
    cfg = bwd_dkdv_config(max(L.d, L.dv), q.element_size(), p.window_right == 0 or bool(p.hstu_causal))
    grid = (triton.cdiv(max_k, cfg.block_n), L.batch * L.hkv)
    if grid[0] * grid[1]:
        attn_bwd_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, dk, dv, *L.extras(),
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
            L.stride_lb, L.stride_lh, L.stride_ab, L.stride_pos_h, L.stride_ts_h,
            *L.seqlens, L.hkv, L.hq // L.hkv, L.d, L.dv, *L.scalars, L.tune_len,
            **L.meta, **cfg.launch_kwargs(),
        )
    cfg = bwd_dq_config(max(L.d, L.dv), q.element_size())
    grid = (triton.cdiv(max_q, cfg.block_m), L.batch * L.hq)
    if grid[0] * grid[1]:
        attn_bwd_dq_kernel[grid](
            q, k, v, dout, lse, delta, dq, *L.extras(), dpos, dts,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
            L.stride_lb, L.stride_lh, L.stride_ab, L.stride_pos_h, L.stride_ts_h,
            *L.seqlens, L.hq, L.hq // L.hkv, L.d, L.dv, *L.scalars, L.tune_len,
            **L.meta, **cfg.launch_kwargs(),
        )
    if not L.has_rab:
        return dq, dk, dv, None, None
    return dq, dk, dv, dpos.to(pos_w.dtype).view(pos_w.shape), dts.to(ts_w.dtype).view(ts_w.shape)

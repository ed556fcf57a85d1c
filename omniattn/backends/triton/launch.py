"""Host side of the Triton kernels: allocate outputs, pick tiles, build grids, launch.

Dense inputs keep their (B, N, H, D) strides (no copies); varlen inputs are (T, H, D) with
cu_seqlens. Only the last dimension must be contiguous.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple, Optional

import torch
import triton

from . import bwd, fwd, quant, rab_cache
from .common import QK_FP8, QK_INT8
from .configs import (PREPROCESS_BLOCK_M, block_dim, bwd_dkdv_config, bwd_dq_config, cdiv, fwd_config, interpreting,
                      next_pow2, quant_fwd_config)
from .launcher import FastLaunch

attn_fwd_kernel = FastLaunch(fwd.attn_fwd_kernel)
attn_bwd_preprocess_kernel = FastLaunch(bwd.attn_bwd_preprocess_kernel)
attn_bwd_dkdv_kernel = FastLaunch(bwd.attn_bwd_dkdv_kernel)
attn_bwd_dq_kernel = FastLaunch(bwd.attn_bwd_dq_kernel)
rab_grad_reduce_kernel = FastLaunch(bwd.rab_grad_reduce_kernel)
rab_cache_kernel = FastLaunch(rab_cache.rab_cache_kernel)
kv_stats_kernel = FastLaunch(quant.kv_stats_kernel)
kv_stats_finish_kernel = FastLaunch(quant.kv_stats_finish_kernel)
quant_kv_kernel = FastLaunch(quant.quant_kv_kernel)
quant_q_kernel = FastLaunch(quant.quant_q_kernel)

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
    dropout_seed: int
    deterministic: int  # the backward's sums in a fixed order (no Gluon backward)
    scale: float
    softcap: float
    sigmoid_bias: float
    silu_scale: float
    dropout_p: float

    def ints(self) -> list[int]:
        return [int(x) for x in self[:13]]

    def floats(self) -> list[float]:
        return [float(x) for x in self[13:]]

    @classmethod
    def from_lists(cls, ints, floats) -> "Params":
        return cls(*ints, *floats)

    @property
    def causal(self) -> bool:
        """Later query rows see more keys (causal-like): schedule them first."""
        return self.window_right == 0 or bool(self.hstu_causal)


class Extras(NamedTuple):
    """The optional tensors of a call (None when absent)."""

    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    alibi: Optional[torch.Tensor] = None
    num_targets: Optional[torch.Tensor] = None
    pos_w: Optional[torch.Tensor] = None
    ts_w: Optional[torch.Tensor] = None
    timestamps: Optional[torch.Tensor] = None
    attn_mask: Optional[torch.Tensor] = None
    tiles_fwd: Optional[torch.Tensor] = None  # varlen schedules: (tiles, 2) int32 (sequence, tile)
    tiles_dq: Optional[torch.Tensor] = None
    tiles_dkdv: Optional[torch.Tensor] = None
    lens_host: Optional[torch.Tensor] = None  # (2, B) int64 on the CPU: query and key lengths (relative bias)
    q_windows: Optional[torch.Tensor] = None  # (windows, B, 2) int32: the query rows read (schedule.query_windows)


class Quantized(NamedTuple):
    """Quantized inputs of the forward kernel (see omniattn.quant): Q and K in INT8 / packed INT4 /
    FP8 with one float32 scale per (token, head); V in FP8 transposed (sequence, kv head, channel,
    token) with per-channel scales, or the caller's V; the row term q . mean(K) and the smooth-Q means."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_scale: torch.Tensor  # like q's (tokens, heads) layout
    k_scale: torch.Tensor
    v_scale: Optional[torch.Tensor]  # (sequences, Hkv, Dv)
    row_bias: Optional[torch.Tensor]  # like q_scale
    q_mean: Optional[torch.Tensor]  # (sequences, Hq, query tiles, 2 * BLOCK_D)
    qk_mode: int  # common.QK_*
    pv_fp8: bool
    pv_two_level: bool
    block_m: int
    block_n: int


_DUMMIES: dict = {}


def _dummy(device, dtype) -> torch.Tensor:
    key = (device, dtype)
    hit = _DUMMIES.get(key)
    if hit is None:
        hit = _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return hit


_EDGES: dict = {}


def _bucket_edges(num_buckets: int, log: bool, device) -> torch.Tensor:
    """The time-bucket edges the kernels compare with (hstu.relative_bias.bucket_edges), on ``device``."""
    key = (num_buckets, log, str(device))
    if key not in _EDGES:
        from ...hstu.relative_bias import bucket_edges

        _EDGES[key] = bucket_edges(num_buckets, "log" if log else "sqrt").to(device)
    return _EDGES[key]


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


def _mask_strides(m: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    """(b, h, i, j) strides of a mask broadcastable to (B, H, Nq, Nk): 0 on broadcast axes."""
    if m is None:
        return 0, 0, 0, 0
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() < 4 else m
    return tuple(0 if m.shape[i] == 1 else m.stride(i) for i in range(4))


def _needs_int64(max_len: int, *tensors) -> bool:
    """Whether token offsets inside one sequence times the token stride can reach 2^31 elements
    (the kernels then compute addresses in 64 bits; else in 32, which spills less)."""
    stride = max(t.stride(-3) for t in tensors)
    return (max_len + 512) * stride + max(t.stride(-2) * t.shape[-2] for t in tensors) >= 2**31


class _Launch:
    """What the kernels of one call signature share: shapes, strides, flags and scalars (no tensor
    of the call: ``pointers`` and ``rab_table`` give those per call)."""

    def __init__(self, q, k, v, x: Extras, max_q, max_k, p: Params):
        dev = self.dev = q.device
        self.varlen = q.dim() == 3
        self.batch = x.cu_q.numel() - 1 if self.varlen else q.shape[0]
        self.hq, self.hkv = q.shape[-2], k.shape[-2]
        self.d, self.dv = q.shape[-1], v.shape[-1]
        self.max_q, self.max_k = max_q, max_k
        self.p = p
        self.has_rab = x.pos_w is not None
        self.has_alibi, self.has_targets = x.alibi is not None, x.num_targets is not None
        self.has_ts, self.has_mask = x.timestamps is not None, x.attn_mask is not None
        self.stride_ab = 0 if x.alibi is None else _last_contiguous(x.alibi).stride(0)
        self.ts_edges = _bucket_edges(p.num_buckets, bool(p.bucket_log), dev) if self.has_rab else _dummy(dev, torch.float32)
        if self.has_rab:
            pos_w, ts_w = _last_contiguous(x.pos_w), _last_contiguous(x.ts_w)
            self.weight_shapes = (pos_w.shape, ts_w.shape)
            self.stride_pos_h = pos_w.stride(0) if pos_w.shape[0] > 1 else 0
            self.stride_ts_h = ts_w.stride(0) if ts_w.shape[0] > 1 else 0
        else:
            self.weight_shapes, self.stride_pos_h, self.stride_ts_h = None, 0, 0
        self.rab_rows = None  # (rows, row stride) of a bias table (plan_rab_table)
        self.mask_strides = _mask_strides(x.attn_mask)
        self.lse_shape, (self.stride_lb, self.stride_lh) = _lse_shape_strides(q, self.batch)
        self.softmax = p.score == 0
        has_mask = x.attn_mask is not None
        self.meta = dict(
            SCORE=p.score,
            IS_VARLEN=self.varlen,
            MASK_KIND=p.mask_kind,
            HAS_LEFT=p.mask_kind == 0 and p.window_left >= 0,
            HAS_RIGHT=p.mask_kind == 0 and p.window_right >= 0,
            HSTU_CAUSAL=bool(p.hstu_causal),
            HAS_TARGETS=x.num_targets is not None,
            HAS_CONTEXT=p.mask_kind == 1 and p.contextual > 0,
            HAS_MAX_ATTN=p.mask_kind == 1 and p.max_attn_len > 0,
            HAS_SOFTCAP=p.softcap > 0,
            HAS_ALIBI=x.alibi is not None,
            HAS_RAB=self.has_rab,
            RAB_CACHED=False,
            BUCKET_LOG=bool(p.bucket_log),
            GPU_GATHER=q.is_cuda and not interpreting(),
            HAS_ATTN_MASK=has_mask,
            MASK_IS_BOOL=has_mask and x.attn_mask.dtype == torch.bool,
            HAS_DROPOUT=p.dropout_p > 0,
            # scores need more than scale*q.k
            HAS_MODS=p.softcap > 0 or x.alibi is not None or self.has_rab or has_mask,
            DEFAULT_SIG_BIAS=bool(p.default_sig_bias),
            # float32 inputs get IEEE float32 products (no TF32), like PyTorch's default matmul, and
            # exact transcendentals; 16-bit inputs get the one-instruction tanh (common.sigmoid)
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            FAST_MATH=q.dtype != torch.float32 and q.is_cuda and not interpreting(),
            BLOCK_D=block_dim(self.d),
            BLOCK_DV=block_dim(self.dv),
            INT64_OFFSETS=_needs_int64(max(max_q, max_k), q, k, v),
        )
        # dropout: keep a pair iff its hash >= threshold (DESIGN.md), kept values scaled by 1/(1-p)
        threshold = min(int(p.dropout_p * 2**32), 2**32 - 1)
        self.scalars = (
            p.scale, p.softcap, p.sigmoid_bias, p.silu_scale, p.window_left, p.window_right,
            p.contextual, p.max_attn_len, p.rab_center, p.num_buckets, p.dropout_seed & 0xFFFFFFFF, threshold,
            1.0 / (1.0 - p.dropout_p),
        )
        self.seqlens = (q.shape[1] if not self.varlen else max_q, k.shape[1] if not self.varlen else max_k)
        self.tune_len = next_pow2(max(max_q, 64))

    def pointers(self, x: Extras) -> tuple:
        """The optional tensors every kernel takes (dummies where absent), from this call's ``x``."""
        dev, i32, f32 = self.dev, torch.int32, torch.float32
        cu_q = x.cu_q if self.varlen else _dummy(dev, i32)
        cu_k = x.cu_k if self.varlen else _dummy(dev, i32)
        alibi = _last_contiguous(x.alibi) if self.has_alibi else _dummy(dev, f32)
        num_targets = x.num_targets.contiguous() if self.has_targets else _dummy(dev, i32)
        pos_w = _last_contiguous(x.pos_w) if self.has_rab else _dummy(dev, f32)
        ts_w = _last_contiguous(x.ts_w) if self.has_rab else _dummy(dev, f32)
        ts = x.timestamps.contiguous() if self.has_ts else _dummy(dev, torch.int64)
        return cu_q, cu_k, alibi, num_targets, pos_w, ts_w, ts, self.ts_edges

    def mask(self, x: Extras) -> torch.Tensor:
        return x.attn_mask if self.has_mask else _dummy(self.dev, torch.bool)

    def plan_rab_table(self, q, x: Extras) -> None:
        """With a relative bias shared by the heads and the opt-in budget for it, plan to compute
        every visible pair's bias once for all heads (rab_cache; ``rab_table`` builds it per call),
        so that the kernels read it instead of recomputing it."""
        if not self.has_rab:
            return
        budget = rab_cache.budget_bytes()  # first: a malformed budget is an error on every call with the bias
        shared = self.weight_shapes[0][0] == 1 and self.weight_shapes[1][0] == 1
        if not (budget and shared and self.hq >= 2 and self.batch and self.max_q > 0):
            return  # the default: nothing more on this path
        rows = q.shape[0] if self.varlen else q.shape[0] * q.shape[1]
        width = int(x.lens_host[1].max())  # the longest key sequence (host copy)
        if width > 0 and rab_cache.fits(rows, width, budget):
            self.rab_rows = (rows, rab_cache.table_stride(width))
            self.meta["RAB_CACHED"] = True

    def rab_table(self, x: Extras) -> tuple:
        """rab_cache's (table, row stride) for this call, as plan_rab_table decided (else a dummy)."""
        if self.rab_rows is None:
            return _dummy(self.dev, torch.float32), 0
        rows, stride = self.rab_rows
        table = rab_cache.new_table(rows, stride, self.dev)
        m, p = self.meta, self.p
        cu_q, cu_k, _, num_targets, pos_w, ts_w, ts, edges = self.pointers(x)
        block_m, block_n = (16, 16) if interpreting() else (rab_cache.CACHE_BLOCK_M, rab_cache.CACHE_BLOCK_N)
        kwargs = {} if interpreting() else dict(num_warps=rab_cache.CACHE_WARPS, num_stages=1)
        rab_cache_kernel[(self.batch, cdiv(self.max_q, block_m))](
            cu_q, cu_k, num_targets, pos_w, ts_w, ts, edges, table, stride,
            *self.seqlens, p.window_left, p.window_right, p.contextual, p.max_attn_len, p.rab_center,
            p.num_buckets,
            IS_VARLEN=self.varlen, MASK_KIND=m["MASK_KIND"], HAS_LEFT=m["HAS_LEFT"], HAS_RIGHT=m["HAS_RIGHT"],
            HSTU_CAUSAL=m["HSTU_CAUSAL"], HAS_TARGETS=m["HAS_TARGETS"], HAS_CONTEXT=m["HAS_CONTEXT"],
            HAS_MAX_ATTN=m["HAS_MAX_ATTN"], BUCKET_LOG=m["BUCKET_LOG"], GPU_GATHER=m["GPU_GATHER"],
            BLOCK_M=block_m, BLOCK_N=block_n, **kwargs,
        )
        return table, stride

    def query_grid(self, tiles: Optional[torch.Tensor], block: int):
        """(grid, TILE_LIST) of a kernel over query tiles (forward, dQ); ``tiles``: the call's
        schedule (Extras.tiles_fwd / tiles_dq) or None."""
        if tiles is not None:
            return (tiles.shape[0],), True
        return (cdiv(self.max_q, block), self.batch * self.hq), False

    def tiles(self, tiles: Optional[torch.Tensor]) -> torch.Tensor:
        return tiles if tiles is not None else _dummy(self.dev, torch.int32)


def forward_config(q, k, v, p: Params, max_q: int, quantized: bool = False, bias_table: bool = False):
    """The forward kernel's tiles for this call (configs.fwd_config) and whether it loads K/V by
    TMA: non-causal calls of head dims above 64 where the GPU and the layout allow it (measured
    faster there; benchmarks/NOTES.md). The varlen tile schedule is built from the same tiles
    (only their block_m, which ``bias_table`` does not change)."""
    head_dim = max(q.shape[-1], v.shape[-1])
    tma = (not quantized and p.mask_kind == 0 and not p.causal and head_dim > 64
           and q.dtype in (torch.float16, torch.bfloat16) and _tma_ok(k, v))
    cfg = fwd_config(head_dim, q.element_size(), p.score, p.causal, hstu_long=p.mask_kind == 1 and max_q >= 2048,
                     tma=tma, bias_table=bias_table)
    return cfg, tma


def _tma_ok(*tensors) -> bool:
    """Whether the forward can load these tensors' tiles by TMA (tensor descriptors made in the
    kernel): Hopper, and every (sequence, head) base and row stride a multiple of 16 bytes (the
    descriptor rule). OMNIATTN_TMA=0 turns it off."""
    t0 = tensors[0]
    if interpreting() or not t0.is_cuda or os.environ.get("OMNIATTN_TMA", "1") == "0":
        return False
    from . import _capability

    if _capability(t0.device.index if t0.device.index is not None else 0)[0] != 9:
        return False
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return False
    _ensure_allocator()
    return True


def _quant_tma_ok(quant: "Quantized", p: Params, head_dim: int) -> bool:
    """TMA for the quantized forward: the exact path's rule (non-causal, head dim above 64). A packed
    FP8 V^T starts each sequence on a 16-byte column, as a descriptor needs (H100, int8-fp8
    varlen 8 x <= 4096: 1.27 ms by TMA, 1.39 by pointer loads; 16 x <= 1024: equal)."""
    if p.mask_kind != 0 or p.causal or head_dim <= 64:
        return False
    return _tma_ok(quant.k, quant.v)


def _ensure_allocator() -> None:
    """Device-made tensor descriptors need scratch memory from Triton's allocator: ours (PyTorch's
    caching allocator, so CUDA graphs capture it) unless the caller has set one. Triton keeps it
    per thread (a ContextVar): plans call this on every call that launches such a kernel."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


_NO_QUANT = dict(QK_MODE=0, PV_FP8=False, PV_TWO_LEVEL=False, SMOOTH_Q=False, HAS_ROW_BIAS=False,
                 EXACT_FP8_ROUNDING=False)


def sm90_forward_ok(q, k, v, x: Extras, p: Params, max_q: int, quant: Optional[Quantized] = None) -> bool:
    """Whether a forward takes the Hopper kernel (fwd_sm90, Gluon): 16-bit inputs with head dims
    72-256 (at 64 it measured within 2% of the template; past 128 not quantized), softmax / sigmoid /
    SiLU with any window (causal included) or HSTU mask (targets, contextual prefix, max_attn_len),
    softcap and ALiBi, GQA, dense or packed; not with the relative bias, attention masks or dropout, and only
    for a positive scale (its softmax keeps the running max of the unscaled scores), tensors a
    descriptor can address (the output's heads too: a head dim that is a multiple of 8) and at most
    SM90_MAX_ITEMS query tiles. Quantized calls (``quant``) too, with INT8 or FP8 Q.K (not INT4),
    16-bit P.V or FP8 P.V in one accumulator (pv_accum="fp32": the two-level sum measured no faster
    than the template's, H100, benchmarks/NOTES.md), without smoothed Q, softcap or ALiBi, and
    quantized tensors a descriptor can address (a dense FP8 V^T: key counts a multiple of 16).
    OMNIATTN_SM90=0 (or OMNIATTN_TMA=0) turns it off."""
    if not q.is_cuda or interpreting() or os.environ.get("OMNIATTN_SM90", "1") == "0":
        return False
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or v.shape[-1] != d or d % 8:
        return False
    if not SM90_FWD_MIN_HEAD_DIM <= d <= SM90_FWD_MAX_HEAD_DIM:
        return False
    if quant is not None and d > 128:
        return False
    if p.dropout_p > 0 or p.scale <= 0:
        return False
    if any(t is not None for t in (x.pos_w, x.attn_mask, x.q_windows)) or k.numel() == 0:
        return False
    if quant is not None and (quant.qk_mode not in (QK_INT8.value, QK_FP8.value) or quant.q_mean is not None
                              or (quant.pv_fp8 and quant.pv_two_level) or p.softcap > 0
                              or x.alibi is not None or not _tma_ok(quant.q, quant.k, quant.v)):
        return False
    entry = _sm90_kernel()
    if entry is None:
        return False
    # the kernel counts its work items (query tiles of every (sequence, head)) in 32 bits; a
    # program's last fetch from the counter runs past the count by up to the number of programs
    sequences = x.cu_q.numel() - 1 if q.dim() == 3 else q.shape[0]
    if cdiv(max_q, entry[0].BLOCK_M) * sequences * q.shape[-2] > SM90_MAX_ITEMS:
        return False
    return _tma_ok(q, k, v)


SM90_MAX_ITEMS = 2**31 - 2**16
SM90_FWD_MIN_HEAD_DIM, SM90_FWD_MAX_HEAD_DIM = 72, 256  # fwd_sm90.TILES (the backward's kernel: up to 128)


_GLUON: dict = {}
# the template's compile-time flags the Hopper kernels take as they are
_SM90_FLAGS = ("MASK_KIND", "HAS_LEFT", "HAS_RIGHT", "HSTU_CAUSAL", "HAS_TARGETS", "HAS_CONTEXT", "HAS_MAX_ATTN",
               "HAS_SOFTCAP", "HAS_ALIBI", "IS_VARLEN")


def _gluon_kernel(module_name: str, kernel_name: str):
    """(module, launcher) of a Hopper Gluon kernel, or None where this Triton has no Gluon for Hopper."""
    if module_name not in _GLUON:
        try:
            module = importlib.import_module(f".{module_name}", __package__)
            _GLUON[module_name] = (module, FastLaunch(getattr(module, kernel_name)))
        except (ImportError, AttributeError):
            _GLUON[module_name] = None
    return _GLUON[module_name]


def _sm90_kernel():
    return _gluon_kernel("fwd_sm90", "attn_fwd_sm90_kernel")


def _sm90_bwd_kernel():
    return _gluon_kernel("bwd_sm90", "attn_bwd_sm90_kernel")


def sm90_programs(device, items: int) -> int:
    """Programs of the persistent Hopper forward: one per SM (one fits: 224 KB of shared memory,
    384 threads at 168 registers), fewer for fewer work items. (H100, bf16, H=16, D=128, against
    one program per item: +3-17% for softmax at 16k tokens, most at 16x1024; HSTU +6-18%.)"""
    return min(items, _sm_count(device.index if device.index is not None else torch.cuda.current_device()))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm90_forward_plan(q, k, v, L: "_Launch", p: Params, quant: Optional[Quantized] = None):
    """The forward by fwd_sm90 (sm90_forward_ok), as a plan (see _planned): same outputs as the
    template's. ``quant``: the quantized tensors stand in for q, k, v (the output keeps q's dtype)."""
    module, kernel = _sm90_kernel()
    dev, dtype, f32 = q.device, q.dtype, torch.float32
    out_shape, lse_shape, softmax = q.shape[:-1] + (L.dv,), L.lse_shape, L.softmax
    items = cdiv(L.max_q, module.BLOCK_M) * L.batch * L.hq  # query tiles of every (sequence, head)
    if quant is None:
        scale_strides, quant_meta = (0,) * 8, dict(QK_MODE=0, PV_FP8=False, HAS_ROW_BIAS=False)
        cfg = module.config(dtype, head_dim=L.d)
        v_strides = _strides(v)
    else:
        scale_strides = _quant_scales(quant, _dummy(dev, f32))[1]
        quant_meta = dict(QK_MODE=quant.qk_mode, PV_FP8=quant.pv_fp8, HAS_ROW_BIAS=quant.row_bias is not None)
        cfg = module.config(dtype, quant.q.dtype, quant.v.dtype, quant.pv_fp8)
        q, k, v_strides = quant.q, quant.k, _v_strides(quant)
    m = L.meta
    launch = kernel.bind((sm90_programs(dev, items),), dict(
        SCORE=p.score, STORE_LSE=softmax, DEFAULT_SIG_BIAS=bool(p.default_sig_bias),
        **{name: m[name] for name in _SM90_FLAGS}, **quant_meta, **cfg)) if items else None
    tail = (L.stride_ab, *_strides(q), *_strides(k), *v_strides, *_strides(torch.empty(out_shape, device="meta")),
            L.stride_lb, L.stride_lh, *scale_strides, *L.seqlens, L.batch, L.hq, L.hq // L.hkv, L.d, p.scale,
            p.softcap, p.sigmoid_bias, p.silu_scale, p.window_left, p.window_right, p.contextual, p.max_attn_len)

    def run(q, k, v, x: Extras, quant: Optional[Quantized]):
        out, lse = _forward_outputs(torch.empty, out_shape, dtype, lse_shape, softmax, dev)
        if launch is None:
            return out, lse
        none = _dummy(dev, f32)
        scales = (none,) * 4
        if quant is not None:
            scales = _quant_scales(quant, none)[0]
            q, k, v = quant.q, quant.k, quant.v
        cu_q, cu_k, alibi, num_targets = L.pointers(x)[:4]
        counter = torch.zeros(1, dtype=torch.int32, device=dev)  # the kernel's next work item
        _ensure_allocator()  # (per call: Triton's allocator is a per-thread setting)
        launch(_last_contiguous(q), _last_contiguous(k), _last_contiguous(v), out, lse if softmax else none, cu_q,
               cu_k, alibi, num_targets, counter, *scales, *tail)
        return out, lse

    return run


def _forward_outputs(new, out_shape, dtype, lse_shape, softmax: bool, dev):
    """A forward's output (``new``: torch.empty, or torch.zeros where rows may stay unwritten) and
    its float32 lse (softmax; else an empty tensor)."""
    out = new(out_shape, dtype=dtype, device=dev)
    lse = torch.empty(lse_shape if softmax else (0,), dtype=torch.float32, device=dev)
    return out, lse


def _quant_scales(quant: Quantized, f32: torch.Tensor):
    """(QS, KS, VS, RB) and their strides as both forward kernels take them: Q's and K's scales
    (and the row term) by (batch, token, head), V's by (sequence, kv head)."""
    qs, ks = quant.q_scale, quant.k_scale
    qs_strides = (qs.stride(0), qs.stride(1), qs.stride(2)) if qs.dim() == 3 else (0, qs.stride(0), qs.stride(1))
    ks_strides = (ks.stride(0), ks.stride(1), ks.stride(2)) if ks.dim() == 3 else (0, ks.stride(0), ks.stride(1))
    vs_strides = (quant.v_scale.stride(0), quant.v_scale.stride(1)) if quant.v_scale is not None else (0, 0)
    scales = (qs, ks, quant.v_scale if quant.v_scale is not None else f32,
              quant.row_bias if quant.row_bias is not None else f32)
    return scales, qs_strides + ks_strides + vs_strides


def _v_strides(quant: Quantized):
    """V's (batch, "token", head) strides as the kernels take them: an FP8 V^T's are (batch, channel, head)."""
    v = quant.v
    if quant.pv_fp8:
        return (v.stride(0), v.stride(2), v.stride(1)) if v.dim() == 4 else (0, v.stride(1), v.stride(0))
    return _strides(v)


# H100, bf16, D=128, causal forward+backward, the Gluon backward's time against the template's
# (benchmarks/NOTES.md, session 21): 1.08x faster at 16 x 1024, 1.12x packed GQA 16 x <= 1024,
# 1.04x HSTU 64 x 1024; 1.02x at 768 keys, HSTU 0.96x; 0.95x / 0.94x at 512, 0.85x / 0.86x at
# 256: a program there walks too few query tiles to fill its pipeline
SM90_BWD_CAUSAL_MIN_KEYS = 960


def sm90_backward_ok(q, k, v, dout, x: Extras, p: Params, max_q: int, max_k: int) -> bool:
    """Whether a backward takes the Hopper kernel (bwd_sm90, Gluon): the forward's rule
    (sm90_forward_ok) up to head dim 128, without softcap and ALiBi, with dO addressable by TMA too.
    Not for ``deterministic`` calls nor under torch.use_deterministic_algorithms(True): its dQ is
    summed by float32 TMA reductions, in no fixed order. Not for causal calls of fewer than
    SM90_BWD_CAUSAL_MIN_KEYS keys, where the template measured faster. OMNIATTN_SM90=0 or
    OMNIATTN_SM90_BWD=0 turns it off."""
    if p.deterministic or p.softcap > 0 or x.alibi is not None or torch.are_deterministic_algorithms_enabled():
        return False
    if os.environ.get("OMNIATTN_SM90_BWD", "1") == "0" or (p.causal and max_k < SM90_BWD_CAUSAL_MIN_KEYS):
        return False
    if q.shape[-1] > 128 or not sm90_forward_ok(q, k, v, x, p, max_q) or _sm90_bwd_kernel() is None:
        return False
    return _tma_ok(dout)


# Launch plans. A call's host work (checks, tiles, flags, strides, Triton's argument handling) is
# a function of its signature: its tensors' shapes, strides, dtypes and 16-byte alignment, its
# scalars and the settings read from the environment. A plan does that work once per signature and
# is kept (the PLANS_KEPT latest); a call then allocates its outputs and launches: 16 x 1024 H100
# forward + backward calls were host-bound without (0.34 ms of host time per forward). Calls whose
# host work reads their tensors' values (the relative bias' lengths, query windows) or draw a seed
# (dropout) get a plan of their own each time; a quantized call's forward plan is keyed by its
# quantized tensors' layouts too, and its quantization has a plan of its own (quant.quantize).
_PLANS: dict = {}
PLANS_KEPT = 256
_SETTINGS = ("TRITON_INTERPRET", "OMNIATTN_SM90", "OMNIATTN_SM90_BWD", "OMNIATTN_TMA", "OMNIATTN_FAST_LAUNCH",
             "OMNIATTN_FWD_CONFIG", "OMNIATTN_DKDV_CONFIG", "OMNIATTN_DQ_CONFIG")


try:  # the settings as os.environ keeps them (a dict lookup each, not os.environ.get's ~0.7 us)
    _ENV_DATA, _ENV_KEYS = os.environ._data, tuple(map(os.environ.encodekey, _SETTINGS))
except AttributeError:  # (not CPython's os.environ)
    _ENV_DATA = None


def _settings() -> tuple:
    if _ENV_DATA is not None:
        return tuple(map(_ENV_DATA.get, _ENV_KEYS))
    return tuple(map(os.environ.get, _SETTINGS))


def _signature(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)


def _plan_key(kind: str, tensors: tuple, x: Extras, max_q: int, max_k: int, p: Params):
    """What a plan depends on, or None for calls that get a plan of their own."""
    if x.pos_w is not None or x.q_windows is not None or p.dropout_p > 0:
        return None
    return (kind, tensors[0].device, *map(_signature, tensors), *map(_signature, x), max_q, max_k, p,
            _settings(), torch.are_deterministic_algorithms_enabled())


def _planned(key, build):
    """The kept plan of ``key``, else build() (kept unless key is None)."""
    if key is None:
        return build()
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= PLANS_KEPT:
            try:  # the oldest goes (another thread may be doing the same)
                _PLANS.pop(next(iter(_PLANS)), None)
            except (StopIteration, RuntimeError):
                pass
        plan = _PLANS[key] = build()
    return plan


def forward(q, k, v, x: Extras, max_q, max_k, p: Params, quant: Optional[Quantized] = None):
    """Output (q's layout, Dv, q's dtype) and float32 lse (softmax; else an empty tensor)."""
    key = _plan_key("forward", (q, k, v), x, max_q, max_k, p)
    if key is not None and quant is not None:  # the quantized tensors' layouts and modes decide the plan too
        key += (*quant[8:], *map(_signature, quant[:8]))
    return _planned(key, lambda: _forward_plan(q, k, v, x, max_q, max_k, p, quant))(q, k, v, x, quant)


def _forward_plan(q, k, v, x: Extras, max_q, max_k, p: Params, quant: Optional[Quantized]):
    """The forward of this call's signature: run(q, k, v, x, quant) -> (out, lse)."""
    given = (q, k, v)
    q, k, v = (_last_contiguous(t) for t in given)
    L = _Launch(q, k, v, x, max_q, max_k, p)
    if sm90_forward_ok(*given, x, p, max_q, quant=quant):
        return _sm90_forward_plan(q, k, v, L, p, quant)
    L.plan_rab_table(q, x)
    # the caller's tensors decide TMA, as they did for the varlen schedule (launch_params)
    cfg, tma = forward_config(*given, p, max_q, quantized=quant is not None, bias_table=L.meta["RAB_CACHED"])
    dev, dtype, f32 = q.device, q.dtype, torch.float32
    out_shape, lse_shape, softmax = q.shape[:-1] + (L.dv,), L.lse_shape, L.softmax
    new_out = torch.empty if x.q_windows is None else torch.zeros  # with query windows skipped rows stay zero
    meta, scale_strides, v_strides, d = dict(L.meta), (0,) * 8, _strides(v), L.d
    if quant is not None:  # the tiles the quantization groups were aligned to
        cfg = quant_fwd_config(max(L.d, L.dv), quant.pv_fp8)
        tma = _quant_tma_ok(quant, p, max(L.d, L.dv))
        scale_strides = _quant_scales(quant, _dummy(dev, f32))[1]
        meta.update(QK_MODE=quant.qk_mode, PV_FP8=quant.pv_fp8, PV_TWO_LEVEL=quant.pv_two_level,
                    SMOOTH_Q=quant.q_mean is not None, HAS_ROW_BIAS=quant.row_bias is not None,
                    EXACT_FP8_ROUNDING=interpreting(), BLOCK_D=block_dim(quant.q.shape[-1]))
        q, k, v_strides, d = quant.q, quant.k, _v_strides(quant), quant.q.shape[-1]
    else:
        meta.update(_NO_QUANT)
    meta.update(USE_TMA=tma)
    grid, tile_list = L.query_grid(x.tiles_fwd, cfg.block_m)
    launch = attn_fwd_kernel.bind(grid, dict(TILE_LIST=tile_list, STORE_LSE=softmax, **meta, **cfg.launch_kwargs())) \
        if grid[0] * (grid[1] if len(grid) > 1 else 1) else None
    tail = (*_strides(q), *_strides(k), *v_strides, *_strides(torch.empty(out_shape, device="meta")), L.stride_lb,
            L.stride_lh, L.stride_ab, L.stride_pos_h, L.stride_ts_h, *L.mask_strides, *scale_strides, *L.seqlens,
            L.hq, L.hq // L.hkv, d, L.dv, *L.scalars, L.tune_len)

    def run(q, k, v, x: Extras, quant: Optional[Quantized]):
        out, lse = _forward_outputs(new_out, out_shape, dtype, lse_shape, softmax, dev)
        if launch is None:
            return out, lse
        none = _dummy(dev, f32)
        scales = (none,) * 5
        if quant is not None:
            scales = _quant_scales(quant, none)[0] + (quant.q_mean if quant.q_mean is not None else none,)
            q, k, v = quant.q, quant.k, quant.v
        if tma:
            _ensure_allocator()  # (per call: Triton's allocator is a per-thread setting)
        launch(_last_contiguous(q), _last_contiguous(k), _last_contiguous(v), out, lse if softmax else none,
               *L.pointers(x), *L.rab_table(x), L.tiles(x.tiles_fwd), L.mask(x), *scales, *tail)
        return out, lse

    return run


def backward(dout, q, k, v, out, lse, dlse: Optional[torch.Tensor], x: Extras, max_q, max_k, p: Params):
    """(dq, dk, dv, d pos_w, d ts_w); the last two None without a relative bias."""
    tensors = (dout, q, k, v, out, lse, dlse)
    key = _plan_key("backward", tensors, x, max_q, max_k, p)
    return _planned(key, lambda: _backward_plan(*tensors, x, max_q, max_k, p))(*tensors, x)


def _backward_plan(dout, q, k, v, out, lse, dlse, x: Extras, max_q, max_k, p: Params):
    """The backward of this call's signature: run(dout, q, k, v, out, lse, dlse, x) -> backward's result."""
    q, k, v, out, dout = (_last_contiguous(t) for t in (q, k, v, out, dout))
    L = _Launch(q, k, v, x, max_q, max_k, p)
    L.plan_rab_table(q, x)
    dev, f32 = q.device, torch.float32
    grid = (cdiv(L.seqlens[0], PREPROCESS_BLOCK_M) * L.batch * L.hq,)
    preprocess = attn_bwd_preprocess_kernel.bind(grid, dict(
        IS_VARLEN=L.varlen, HAS_DLSE=dlse is not None, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=L.meta["BLOCK_DV"],
    )) if L.softmax and grid[0] else None
    if preprocess is not None:  # (sigmoid and SiLU keep no output for the backward: ``out`` is empty)
        pre_tail = (*_strides(out), *_strides(dout), L.stride_lb, L.stride_lh, L.seqlens[0], L.hq, L.dv)

    def row_terms(out, dout, lse, dlse, cu_q):
        """(lse, delta) as the kernels read them: softmax's delta = rowsum(out * dout) - dlse."""
        if not L.softmax:
            return _dummy(dev, f32), _dummy(dev, f32)
        delta = torch.empty_like(lse)
        if preprocess is not None:
            dlse = dlse.contiguous() if dlse is not None else _dummy(dev, f32)
            preprocess(out, dout, dlse, delta, cu_q, *pre_tail)
        return lse, delta

    if sm90_backward_ok(q, k, v, dout, x, p, max_q, max_k):
        return _sm90_backward_plan(q, k, v, dout, L, p, row_terms)
    return _template_backward_plan(q, k, v, dout, x, L, p, row_terms)


def _sm90_backward_plan(q, k, v, dout, L: "_Launch", p: Params, row_terms):
    """dQ, dK, dV by bwd_sm90 (sm90_backward_ok); dQ summed in float32, then scaled and cast."""
    module, kernel = _sm90_bwd_kernel()
    dev, f32 = q.device, torch.float32
    programs = cdiv(L.max_k, module.BLOCK_N) * L.batch * L.hkv
    m = L.meta
    launch = kernel.bind((programs,), dict(
        SCORE=p.score, DEFAULT_SIG_BIAS=bool(p.default_sig_bias),
        **{name: m[name] for name in _SM90_FLAGS if name not in ("HAS_SOFTCAP", "HAS_ALIBI")}, **module.config(q.dtype),
    )) if programs else None
    like = (torch.empty(q.shape, dtype=f32, device="meta"), torch.empty_like(k, device="meta"),
            torch.empty_like(v, device="meta"))  # dq_acc, dk, dv
    tail = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), *(s for t in like for s in _strides(t)),
            L.stride_lb, L.stride_lh, *L.seqlens, L.batch, L.hkv, L.hq // L.hkv, L.d, p.scale, p.sigmoid_bias,
            p.silu_scale, p.window_left, p.window_right, p.contextual, p.max_attn_len)

    def run(dout, q, k, v, out, lse, dlse, x: Extras):
        q, k, v, out, dout = (_last_contiguous(t) for t in (q, k, v, out, dout))
        cu_q, cu_k, _, num_targets = L.pointers(x)[:4]
        lse, delta = row_terms(out, dout, lse, dlse, cu_q)
        dq_acc = torch.zeros(q.shape, dtype=f32, device=dev)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        if launch is not None:
            _ensure_allocator()  # (per call: Triton's allocator is a per-thread setting)
            launch(q, k, v, dout, lse, delta, dq_acc, dk, dv, cu_q, cu_k, num_targets, *tail)
        dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
        torch.mul(dq_acc, p.scale, out=dq)  # scaled and cast in one pass over the float32 sums
        return dq, dk, dv, None, None

    return run


def _template_backward_plan(q, k, v, dout, x: Extras, L: "_Launch", p: Params, row_terms):
    """dK/dV by one kernel over key tiles, dQ by one over query tiles (and the relative bias' weight
    gradients from per-program sums, _RabStrips)."""
    dev, f32 = q.device, torch.float32
    windows = x.q_windows is not None
    cfg = bwd_dkdv_config(max(L.d, L.dv), q.element_size(), p.causal)
    if x.tiles_dkdv is not None:
        kv_grid, kv_list = (x.tiles_dkdv.shape[0],), True
    else:
        kv_grid, kv_list = (cdiv(L.max_k, cfg.block_n), L.batch * L.hkv), False
    kv_launches = kv_grid[0] * (kv_grid[1] if len(kv_grid) > 1 else 1) > 0
    dkdv = attn_bwd_dkdv_kernel.bind(kv_grid, _dkdv_kwargs(L, cfg, kv_list, False, False)) \
        if kv_launches and not windows else None
    kv_tail = _dkdv_tail(L, q, k, v, dout, torch.empty_like(k, device="meta"), torch.empty_like(v, device="meta"))
    dq_cfg = bwd_dq_config(max(L.d, L.dv), q.element_size(), L.has_rab)
    grid, tile_list = L.query_grid(x.tiles_dq, dq_cfg.block_m)
    n_programs = grid[0] * (grid[1] if len(grid) > 1 else 1)
    ts_pad = next_pow2(p.num_buckets + 1) if L.has_rab else 16
    strips = _RabStrips(L, x, dq_cfg, tile_list, dq_cfg.block_m + dq_cfg.block_n - 1) if L.has_rab else None
    meta = dict(L.meta)
    del meta["RAB_CACHED"]  # the dQ kernel computes the bias per pair (reading the table measured slower)
    dq_launch = attn_bwd_dq_kernel.bind(grid, dict(TILE_LIST=tile_list, TS_PAD=ts_pad, **meta,
                                                   **dq_cfg.launch_kwargs())) if n_programs else None
    dq_tail = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(torch.empty_like(q, device="meta")),
               L.stride_lb, L.stride_lh, L.stride_ab, L.stride_pos_h, L.stride_ts_h, *L.mask_strides, *L.seqlens,
               L.hq, L.hq // L.hkv, L.d, L.dv, *L.scalars, L.tune_len)

    def run(dout, q, k, v, out, lse, dlse, x: Extras):
        q, k, v, out, dout = (_last_contiguous(t) for t in (q, k, v, out, dout))
        pointers, mask = L.pointers(x), L.mask(x)
        lse, delta = row_terms(out, dout, lse, dlse, pointers[0])
        # with query windows the skipped rows' dQ stays zero, and dK/dV sum one launch per window in float32
        dq = (torch.zeros_like if windows else torch.empty_like)(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        table = L.rab_table(x)
        if dkdv is not None:
            dkdv(q, k, v, dout, lse, delta, dk, dv, *pointers, *table, L.tiles(x.tiles_dkdv), mask,
                 _dummy(dev, torch.int32), *kv_tail)
        elif windows and kv_launches:
            _dkdv_by_windows(L, cfg, kv_grid, kv_list, x, pointers, table, mask, q, k, v, dout, lse, delta, dk, dv)
        if L.has_rab:
            part_pos = torch.zeros(strips.total, dtype=f32, device=dev)
            part_ts = torch.zeros(n_programs, ts_pad, dtype=f32, device=dev)
            strip_start = strips.start_of_program
        else:
            part_pos = part_ts = _dummy(dev, f32)
            strip_start = _dummy(dev, torch.int64)
        if dq_launch is not None:
            dq_launch(q, k, v, dout, lse, delta, dq, *pointers, L.tiles(x.tiles_dq), mask, part_pos, part_ts,
                      strip_start, *dq_tail)
        if not L.has_rab:
            return dq, dk, dv, None, None
        dpos, dts = strips.reduce(part_pos, part_ts, dq_cfg.block_m)
        return dq, dk, dv, dpos.to(x.pos_w.dtype).view(x.pos_w.shape), dts.to(x.ts_w.dtype).view(x.ts_w.shape)

    return run


def _dkdv_kwargs(L: _Launch, cfg, tile_list: bool, window: bool, accumulate: bool) -> dict:
    return dict(TILE_LIST=tile_list, HAS_Q_WIN=window, ACCUMULATE=accumulate, **L.meta, **cfg.launch_kwargs())


def _dkdv_tail(L: _Launch, q, k, v, dout, dk, dv, heads: Optional[int] = None) -> tuple:
    """The dK/dV kernel's arguments after its tensors, over ``heads`` key/value heads (default all)."""
    return (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
            L.stride_lb, L.stride_lh, L.stride_ab, L.stride_pos_h, L.stride_ts_h, *L.mask_strides,
            *L.seqlens, heads or L.hkv, L.hq // L.hkv, L.d, L.dv, *L.scalars, L.tune_len)


def _dkdv_by_windows(L: _Launch, cfg, grid, tile_list: bool, x: Extras, pointers, table, mask, q, k, v, dout, lse,
                     delta, dk, dv) -> None:
    """dK/dV of a call with query windows: one launch per window adding into float32 dK/dV, a chunk
    of heads at a time (window_heads_per_launch; the tile list was built for that many heads)."""
    heads = window_heads_per_launch(
        L.hkv, k, v, whole_heads_only(x.alibi, x.attn_mask, x.pos_w, L.p.dropout_p, dense=x.tiles_dkdv is None))
    group = L.hq // L.hkv
    tiles = L.tiles(x.tiles_dkdv)
    for h0 in range(0, L.hkv, heads):
        dk32, dv32 = (torch.empty_like(t.narrow(-2, h0, heads), dtype=torch.float32) for t in (k, v))
        q_c, dout_c = (t.narrow(-2, h0 * group, heads * group) for t in (q, dout))
        lse_c, delta_c = (t.narrow(-2, h0 * group, heads * group) if t.dim() > 1 else t for t in (lse, delta))
        k_c, v_c = k.narrow(-2, h0, heads), v.narrow(-2, h0, heads)
        tail = _dkdv_tail(L, q_c, k_c, v_c, dout_c, dk32, dv32, heads)
        for w in range(x.q_windows.shape[0]):
            attn_bwd_dkdv_kernel[grid](q_c, k_c, v_c, dout_c, lse_c, delta_c, dk32, dv32, *pointers, *table, tiles,
                                       mask, x.q_windows[w], *tail, **_dkdv_kwargs(L, cfg, tile_list, True, w > 0))
        dk.narrow(-2, h0, heads).copy_(dk32)
        dv.narrow(-2, h0, heads).copy_(dv32)


WINDOW_GRAD_BYTES = 2**31  # at most this much float32 dK + dV per launch where query windows sum


def whole_heads_only(alibi, attn_mask, bias_weights, dropout_p: float, dense: bool) -> bool:
    """Whether the dK/dV kernel must run over all heads at once: a launch over a chunk of heads
    would read something by absolute head (ALiBi slopes, a mask or relative-bias weights with a
    head axis, dropout's hash) or has no tile list to run a chunk's heads on (dense calls). None
    of these comes with query windows today."""
    return alibi is not None or attn_mask is not None or bias_weights is not None or dropout_p > 0 or dense


def window_heads_per_launch(hkv: int, k: torch.Tensor, v: torch.Tensor, per_head_tables: bool = False) -> int:
    """Key/value heads per dK/dV launch of a call with query windows (context-parallel HSTU), whose
    launches add into float32 dK/dV: all heads, unless those buffers would pass WINDOW_GRAD_BYTES
    (1M tokens x 32 heads x D=128: 34 GB, which with the rest did not fit an 80 GB card); then the
    largest divisor of hkv that stays under it. ``per_head_tables`` (whole_heads_only): all heads.
    Shared with launch_params, whose dK/dV tile list is built for this many heads."""
    if per_head_tables:
        return hkv
    tokens = k.numel() // max(k.shape[-1] * hkv, 1)
    per_head = tokens * (k.shape[-1] + v.shape[-1]) * 4
    heads = max(1, min(hkv, WINDOW_GRAD_BYTES // max(per_head, 1)))
    while hkv % heads:
        heads -= 1
    return heads


REDUCE_TARGET_PROGRAMS = 2048  # rab_grad_reduce_kernel's grid: about this many (weight block, head, chunk) programs
REDUCE_CHUNK_MIN = 16  # strips per program at least


class _RabStrips:
    """Where each dQ program keeps its relative-bias partial sums, and their reduction.

    Program p (query tile m0 of sequence b, head h) owns a strip of floats in one flat buffer; its
    index s holds the gradient of pos_w[C + s - (m0 + BM - 1)], for s below the end of the last key
    tile it visits plus BM + BN - 1 (bwd._rab_grads). Nothing else writes it, so the sums are
    deterministic; rab_grad_reduce_kernel adds the strips of each head in program order. The
    layout depends only on the lengths and tiles: computed on the host once per layout and kept
    on the device (no host-device sync per call)."""

    _CACHE: dict = {}

    def __init__(self, L: _Launch, x: Extras, cfg, tile_list: bool, diagonals: int):
        self.L = L
        self.hr = L.weight_shapes[0][0]
        lens_q, lens_k = x.lens_host[0], x.lens_host[1]  # host copies: no device sync here
        key = (tuple(lens_q.tolist()), tuple(lens_k.tolist()), L.hq, self.hr, cfg.block_m, cfg.block_n, diagonals,
               tile_list, L.p.causal, bool(L.p.hstu_causal) and L.p.contextual == 0, L.max_q, str(L.dev))
        if key not in self._CACHE:
            if len(self._CACHE) >= 32:
                self._CACHE.pop(next(iter(self._CACHE)))
            self._CACHE[key] = self._layout(L, cfg, tile_list, diagonals, lens_q, lens_k)
        self.total, self.start_of_program, self.meta, self.n_live, self.by_head = self._CACHE[key]

    def _layout(self, L: _Launch, cfg, tile_list: bool, diagonals: int, lens_q, lens_k):
        hq, bm, bn, hr = L.hq, cfg.block_m, cfg.block_n, self.hr
        if tile_list:  # 1-D grid over (sequence, head, tile) triples: the same schedule, built on the host
            from .schedule import tile_list as schedule

            t = schedule(tuple(lens_q.tolist()), tuple(lens_k.tolist()), bm, L.p.causal, True, hq,
                         torch.device("cpu")).long()
            b, head, mt = t[:, 0], t[:, 1], t[:, 2]
        else:  # 2-D grid (query tiles, batch x heads); causal launches the last tile first
            n_m = cdiv(L.max_q, bm)
            pid_m = torch.arange(n_m).repeat(L.batch * hq)
            bh = torch.arange(L.batch * hq).repeat_interleave(n_m)
            mt = (n_m - 1 - pid_m) if L.p.causal else pid_m
            b, head = bh // hq, bh % hq
        m0 = mt * bm
        lq, lk = lens_q[b], lens_k[b]
        causal = bool(L.p.hstu_causal) and L.p.contextual == 0
        reach = torch.minimum(m0 + bm, lk) if causal else lk  # keys the program may visit
        length = torch.where((m0 < lq) & (reach > 0), ((reach - 1) // bn) * bn + diagonals, 0)
        start = torch.cumsum(length, 0) - length
        head_r = head if hr > 1 else torch.zeros_like(head)
        live = torch.nonzero(length > 0).flatten()
        order = live[torch.argsort(head_r[live], stable=True)]  # by head, then program order
        counts = torch.bincount(head_r[order], minlength=hr)
        ends = torch.cumsum(counts, 0)
        ranges = torch.stack([ends - counts, ends], 1).flatten()
        table = torch.stack([start[order], length[order], m0[order], head_r[order]], 1).flatten()
        dev = L.dev
        by_head = torch.argsort(head_r, stable=True)
        return (max(int(length.sum()), 1), start.to(dev), torch.cat([table, ranges]).to(torch.int64).to(dev),
                order.numel(), by_head.to(dev))

    def reduce(self, part_pos, part_ts, block_m: int):
        L, hr = self.L, self.hr
        length = L.weight_shapes[0][-1]
        block = 256
        # programs split into chunks so that the grid fills the GPU (one program per block of
        # weights and head walked every strip: 2.9 ms of a 21 ms step at B=32, N=4096 on an H100)
        chunk = max(REDUCE_CHUNK_MIN, cdiv(self.n_live * cdiv(length, block) * hr, REDUCE_TARGET_PROGRAMS))
        n_chunks = max(1, cdiv(self.n_live, chunk))
        parts = torch.empty(n_chunks, hr, length, dtype=torch.float32, device=part_pos.device)
        rab_grad_reduce_kernel[(cdiv(length, block), hr, n_chunks)](
            part_pos, self.meta, parts, self.n_live, length, L.p.rab_center, chunk, BLOCK_M=block_m, BLOCK=block)
        dpos = parts[0] if n_chunks == 1 else parts.sum(0)
        nb1 = L.weight_shapes[1][-1]
        dts = part_ts[self.by_head, :nb1].view(hr, -1, nb1).sum(1)
        return dpos, dts

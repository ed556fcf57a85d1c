"""Quantization of Q, K, V for the quantized precisions (the maths of DESIGN.md, "Quantized precisions").

For each sequence and head:

- smooth_k: ``km = mean_t K[t]`` (float32); K is quantized as ``K - km``; the row term
  ``r_i = q_i . km`` (float32, from the unquantized q) restores what smoothing removed wherever the
  maths needs it (sigmoid, SiLU, softmax's lse).
- smooth_q: each query tile's mean ``qm`` (BLOCK_M rows from the sequence start) is subtracted.
- scales: per group of tokens (QuantConfig.groups), ``amax`` over the group's rows and channels,
  ``inv = L / amax`` and ``scale = amax / L`` (L = 127 INT8, 7 INT4, 448 FP8; an all-zero group gets
  ``inv = scale = 1``); ``x_q = round_half_even(x * inv)`` (INT) or ``e4m3(x * inv)`` (FP8).
- INT4 is stored two per byte: channel d in the low nibble, channel d + D/2 in the high one.
- V (FP8 P.V): per-channel ``sv = amax_t |V[t, c]| / 448`` over the sequence, ``V8 = e4m3(V * (448 / amax))``,
  stored transposed (kv head, channel, token) so the FP8 tensor cores read it K-major; packed
  sequences start on 16-token column boundaries (:func:`vt_columns`), so the kernels load whole
  16-byte vectors of it.

:func:`quantize_torch` is that maths in PyTorch (any device; the reference the Triton quantization
kernels are tested against, and what the CPU emulation dequantizes); :func:`quantize` picks the
Triton kernels on GPUs (and under the interpreter when asked).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends.triton.common import VT_ALIGN as _VT_ALIGN
from ..backends.triton.launch import Quantized
from .config import FP8_MAX, PV_FP8, QK_LIMIT, QK_MODE, QuantConfig

VT_ALIGN = _VT_ALIGN.value


def vt_columns(cu_k: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The FP8 V^T column of each packed token (sequence ``seq``, position ``pos``): sequence s
    starts at (cu_k[s] // VT_ALIGN + s) * VT_ALIGN, as the kernels' ``vt_column``."""
    return (cu_k.long()[seq] // VT_ALIGN + seq) * VT_ALIGN + pos


def vt_width(tokens: int, nseq: int) -> int:
    """Columns of a packed FP8 V^T: every sequence's start moves up by less than VT_ALIGN per sequence."""
    return -(-(tokens + VT_ALIGN * nseq) // VT_ALIGN) * VT_ALIGN


def _layout(x: torch.Tensor, cu: Optional[torch.Tensor], lens: tuple[int, ...]):
    """Packed (T, H, D) view, the sequence of each token and its position in the sequence."""
    dev = x.device
    if x.dim() == 4:
        b, n = x.shape[0], x.shape[1]
        seq = torch.arange(b, device=dev).repeat_interleave(n)
        pos = torch.arange(n, device=dev).repeat(b)
        return x.reshape(b * n, x.shape[2], x.shape[3]), seq, pos
    counts = torch.tensor(lens, device=dev, dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(len(lens), device=dev), counts, output_size=x.shape[0])
    pos = torch.arange(x.shape[0], device=dev) - cu.long()[seq]
    return x, seq, pos


def _segment_mean(x: torch.Tensor, seq: torch.Tensor, nseq: int) -> torch.Tensor:
    """(nseq, H, D) float32 mean of the tokens of each sequence (0 for empty ones)."""
    sums = torch.zeros((nseq,) + x.shape[1:], dtype=torch.float32, device=x.device)
    sums.index_add_(0, seq, x.float())
    counts = torch.bincount(seq, minlength=nseq).clamp(min=1).to(torch.float32)
    return sums / counts.view(-1, 1, 1)


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch rounds half to even, as the kernels' float32 magic-number trick


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at +-448 (as the kernels)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _group_scales(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, group: int, limit: float):
    """(inv, scale) per token and head: amax over each group of ``group`` consecutive tokens of a
    sequence (aligned to its start) and over channels."""
    amax_tok = x.abs().amax(-1)  # (T, H)
    if group == 1:
        amax = amax_tok
    else:
        gid = seq * (int(pos.max().item()) // group + 1 if pos.numel() else 1) + pos // group
        uniq, inverse = torch.unique(gid, return_inverse=True)
        gmax = torch.zeros((uniq.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
        gmax.scatter_reduce_(0, inverse.view(-1, 1).expand_as(amax_tok), amax_tok, "amax", include_self=True)
        amax = gmax[inverse]
    zero = amax == 0
    inv = torch.where(zero, 1.0, limit / torch.where(zero, 1.0, amax))
    scale = torch.where(zero, 1.0, amax / limit)
    return inv, scale


def _quantize_values(x: torch.Tensor, inv: torch.Tensor, mode: int) -> torch.Tensor:
    y = x * inv.unsqueeze(-1)
    if mode == 3:
        return to_e4m3(y)
    limit = QK_LIMIT[mode]
    y = round_half_even(y).clamp(-limit, limit).to(torch.int8)
    if mode == 2:  # two per byte: low nibble channel d, high nibble channel d + D/2
        half = y.shape[-1] // 2
        y = (y[..., :half] & 0xF) | (y[..., half:] << 4)
    return y


def quantize_rows(x: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scales): one float32 scale per row of the last dim (any leading shape), the
    scheme above at per-token granularity; ``precision`` "int8" or "fp8"."""
    mode = QK_MODE[precision]
    x = x.float()
    inv, scale = _group_scales(x, None, None, 1, QK_LIMIT[mode])
    return _quantize_values(x, inv, mode), scale


def unpack_int4(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the INT4 packing: (..., D/2) int8 -> (..., D) int8."""
    lo = (x << 4) >> 4
    hi = x >> 4
    return torch.cat([lo, hi], -1)


def quantize_torch(q, k, v, cu_q, cu_k, lens_q, lens_k, *, precision: str, cfg: QuantConfig, block_m: int,
                   block_n: int, row_bias: bool, block_d: int) -> Quantized:
    """The quantization maths above, in PyTorch. ``block_d``: the kernel's padded head dim of the
    quantized Q/K (the smooth-Q means are laid out in blocks of 2 * block_d)."""
    mode = QK_MODE[precision]
    dense = q.dim() == 4
    nseq = len(lens_q)
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    group = hq // hkv
    qp, qseq, qpos = _layout(q, cu_q, lens_q)
    kp, kseq, kpos = _layout(k, cu_k, lens_k)
    vp, _, _ = _layout(v, cu_k, lens_k)
    g_q, g_k = cfg.groups(block_m, block_n)
    limit = QK_LIMIT[mode]

    kf = kp.float()
    km = _segment_mean(kp, kseq, nseq) if cfg.smooth_k else torch.zeros(nseq, hkv, d, device=k.device)
    kf = kf - km[kseq]
    inv_k, k_scale = _group_scales(kf, kseq, kpos, g_k, limit)
    k_q = _quantize_values(kf, inv_k, mode)

    qf = qp.float()
    bias = None
    if row_bias and cfg.smooth_k:
        km_q = km.repeat_interleave(group, 1)[qseq]  # (Tq, Hq, D)
        bias = (qp.float() * km_q).sum(-1)
    q_mean = None
    if cfg.smooth_q:
        tiles = -(-max(max(lens_q, default=0), 1) // block_m)
        tid = qseq * tiles + qpos // block_m
        sums = torch.zeros((nseq * tiles, hq, d), dtype=torch.float32, device=q.device)
        sums.index_add_(0, tid, qf)
        counts = torch.bincount(tid, minlength=nseq * tiles).clamp(min=1).to(torch.float32)
        means = sums / counts.view(-1, 1, 1)  # (nseq * tiles, Hq, D)
        qf = qf - means[tid]
        q_mean = _pack_means(means.view(nseq, tiles, hq, d).transpose(1, 2), mode, block_d)
    inv_q, q_scale = _group_scales(qf, qseq, qpos, g_q, limit)
    q_q = _quantize_values(qf, inv_q, mode)

    v_out, v_scale = v, None
    if PV_FP8[precision]:
        vmax = torch.zeros((nseq,) + vp.shape[1:], dtype=torch.float32, device=v.device)
        vmax.scatter_reduce_(0, kseq.view(-1, 1, 1).expand_as(vp), vp.float().abs(), "amax", include_self=True)
        zero = vmax == 0
        inv_v = torch.where(zero, 1.0, FP8_MAX / torch.where(zero, 1.0, vmax))
        v_scale = torch.where(zero, 1.0, vmax / FP8_MAX)  # (nseq, Hkv, Dv)
        v8 = to_e4m3(vp.float() * inv_v[kseq])  # (Tk, Hkv, Dv)
        v_out = _transpose_v(v8, v.shape, None if dense else vt_columns(cu_k, kseq, kpos), nseq)

    def back(t, like):  # (T, H[, X]) -> the caller's (B, N, H[, X]) for dense inputs
        return t.reshape(like.shape[:2] + t.shape[1:]) if dense else t

    return Quantized(
        q=back(q_q, q).contiguous(), k=back(k_q, k).contiguous(), v=v_out,
        q_scale=back(q_scale, q).contiguous(), k_scale=back(k_scale, k).contiguous(), v_scale=v_scale,
        row_bias=None if bias is None else back(bias, q).contiguous(), q_mean=q_mean, qk_mode=mode,
        pv_fp8=PV_FP8[precision], pv_two_level=cfg.pv_accum == "fp32+fp32", block_m=block_m, block_n=block_n,
    )


def _pack_means(means: torch.Tensor, mode: int, block_d: int) -> torch.Tensor:
    """(nseq, Hq, tiles, D) -> (nseq * Hq * tiles, 2 * block_d) in the kernel's layout: INT4 keeps the
    low channel half at [0, block_d) and the high half at [block_d, 2 * block_d)."""
    d = means.shape[-1]
    flat = means.reshape(-1, d)
    out = torch.zeros(flat.shape[0], 2 * block_d, dtype=torch.float32, device=means.device)
    if mode == 2:
        out[:, : d // 2] = flat[:, : d // 2]
        out[:, block_d : block_d + d // 2] = flat[:, d // 2 :]
    else:
        out[:, :d] = flat
    return out


def _transpose_v(v8: torch.Tensor, shape, columns: Optional[torch.Tensor], nseq: int) -> torch.Tensor:
    """(T, Hkv, Dv) FP8 -> (B, Hkv, Dv, N) for dense inputs (``columns`` None), else
    (Hkv, Dv, vt_width) with token t at column ``columns[t]`` (the padding columns zero)."""
    if columns is None:
        b, n = shape[0], shape[1]
        return v8.view(b, n, v8.shape[1], v8.shape[2]).permute(0, 2, 3, 1).contiguous()
    out = torch.zeros(v8.shape[1], v8.shape[2], vt_width(v8.shape[0], nseq), dtype=torch.uint8, device=v8.device)
    out[:, :, columns] = v8.view(torch.uint8).permute(1, 2, 0)
    return out.view(torch.float8_e4m3fn)


def packed_vt_tokens(v_t: torch.Tensor, cu_k: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A packed FP8 V^T (Hkv, Dv, vt_width) back to its tokens (``_layout``'s seq, pos): (T, Hkv, Dv) float32."""
    return v_t.float()[:, :, vt_columns(cu_k, seq, pos)].permute(2, 0, 1)


STATS_CHUNK = 256  # tokens per program of the K-mean / V-max pass


def quantize_triton(q, k, v, cu_q, cu_k, lens_q, lens_k, max_q, max_k, *, precision: str, cfg: QuantConfig,
                    block_m: int, block_n: int, row_bias: bool) -> Quantized:
    """The same maths with the Triton quantization kernels (GPU, or the interpreter on CPU). The host
    work (grids, strides, the launches' argument handling) is a plan per call signature, kept as the
    attention's are (launch._planned): a call allocates the quantized tensors and launches."""
    from ..backends.triton.launch import _planned, _settings, _signature

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernels read rows whole
    key = ("quantize", q.device, *map(_signature, (q, k, v, cu_q, cu_k)), len(lens_q), max_q, max_k, precision, cfg,
           block_m, block_n, row_bias, _settings())
    plan = _planned(key, lambda: _quantize_plan(q, k, v, len(lens_q), max_q, max_k, precision, cfg, block_m, block_n,
                                                row_bias))
    return plan(q, k, v, cu_q, cu_k)


def _quantize_plan(q, k, v, nseq: int, max_q: int, max_k: int, precision: str, cfg: QuantConfig, block_m: int,
                   block_n: int, row_bias: bool):
    """run(q, k, v, cu_q, cu_k) -> Quantized for calls of this signature: three passes (K's mean and
    V's channel maxima, K and V, Q), each a bound launch."""
    from ..backends.triton import launch
    from ..backends.triton.configs import block_dim, cdiv, interpreting
    from ..backends.triton.launch import _dummy, _strides

    mode = QK_MODE[precision]
    pv_fp8 = PV_FP8[precision]
    dense = q.dim() == 4
    hq, hkv, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    dev, f32, i32 = q.device, torch.float32, torch.int32
    bd, bdv = block_dim(d), block_dim(dv)
    none_f32, none_i32 = _dummy(dev, f32), _dummy(dev, i32)
    seqlen_q = max_q if not dense else q.shape[1]
    seqlen_k = max_k if not dense else k.shape[1]
    exact_fp8 = interpreting()
    limit = QK_LIMIT[mode]
    g_q, g_k = cfg.groups(block_m, block_n)

    # pass 1: K's mean and V's per-channel max, in parallel chunks of tokens
    # (the token counts come from cu_k on the device: a host copy would wait for the GPU every call)
    n_chunks = max(cdiv(seqlen_k, STATS_CHUNK), 1)
    stats = bool((cfg.smooth_k or pv_fp8) and nseq * hkv and seqlen_k)
    stats_kw = dict(IS_VARLEN=not dense, HAS_V=pv_fp8, BLOCK_D=bd, BLOCK_DV=bdv)
    stats_launch = launch.kv_stats_kernel.bind((n_chunks, nseq * hkv), dict(CHUNK=STATS_CHUNK, **stats_kw))
    finish_launch = launch.kv_stats_finish_kernel.bind((nseq * hkv,), dict(BLOCK_C=16, **stats_kw))
    stats_tail = (*_strides(k), *_strides(v), seqlen_k, hkv, n_chunks, d, dv)

    # pass 2: K and V
    packed = d // 2 if mode == 2 else d
    qk_dtype = torch.float8_e4m3fn if mode == 3 else torch.int8
    k_q_shape, q_q_shape = k.shape[:-1] + (packed,), q.shape[:-1] + (packed,)

    ks_dims = (k.shape[0], hkv, k.shape[1]) if dense else (hkv, k.shape[0])  # (no tensor kept by the plan)

    def new_k_scale(device):
        # head-major (each (sequence, head)'s token scales contiguous: a key tile's scales are read as
        # vectors), in the (tokens, heads) shape every reader indexes by strides
        scales = torch.empty(ks_dims, dtype=f32, device=device)
        return scales.transpose(1, 2) if dense else scales.t()

    # packed FP8 V^T: sequences on 16-token column boundaries, each padded with zeros to its next one
    # (the forward reads those whole); the columns between sequences are never written nor read
    vt_shape = (k.shape[0], hkv, dv, k.shape[1]) if dense else (hkv, dv, vt_width(k.shape[0], nseq))
    meta = torch.device("meta")
    k_q, ks, v_t = (torch.empty(k_q_shape, dtype=qk_dtype, device=meta), new_k_scale(meta),
                    torch.empty(vt_shape, dtype=torch.float8_e4m3fn, device=meta))
    vt_strides = ((v_t.stride(0), v_t.stride(1), v_t.stride(2)) if dense else (0, v_t.stride(0), v_t.stride(1))) \
        if pv_fp8 else (0, 0, 0)
    ks_strides = (ks.stride(0), ks.stride(1), ks.stride(2)) if dense else (0, ks.stride(0), ks.stride(1))
    rows_k = block_n if g_k > 1 else 16
    kv_launch = launch.quant_kv_kernel.bind((cdiv(seqlen_k, rows_k), nseq * hkv), dict(
        IS_VARLEN=not dense, QK_MODE=mode, LIMIT=limit, GROUP=min(g_k, rows_k), SMOOTH_K=cfg.smooth_k, PV_FP8=pv_fp8,
        EXACT_FP8_ROUNDING=exact_fp8, ROWS=rows_k, BLOCK_D=bd, BLOCK_DV=bdv)) if nseq * hkv and seqlen_k else None
    kv_tail = (*_strides(k), *_strides(v), *_strides(k_q), *ks_strides, *vt_strides, seqlen_k, hkv, d, dv)

    # pass 3: Q
    n_tiles = max(cdiv(seqlen_q, block_m), 1)
    packed_bd = bd // 2 if mode == 2 else bd
    q_q, qs = torch.empty(q_q_shape, dtype=qk_dtype, device=meta), torch.empty(q.shape[:-1], dtype=f32, device=meta)
    qs_strides = (qs.stride(0), qs.stride(1), qs.stride(2)) if dense else (0, qs.stride(0), qs.stride(1))
    has_bias = row_bias and cfg.smooth_k
    q_launch = launch.quant_q_kernel.bind((n_tiles, nseq * hq), dict(
        IS_VARLEN=not dense, QK_MODE=mode, LIMIT=limit, GROUP=g_q, SMOOTH_Q=cfg.smooth_q, ROW_BIAS=has_bias,
        EXACT_FP8_ROUNDING=exact_fp8, BLOCK_M=block_m, BLOCK_D=bd, PACKED_D=packed_bd)) if nseq * hq and seqlen_q \
        else None
    q_tail = (*_strides(q), *_strides(q_q), *qs_strides, seqlen_q, hq, hq // hkv, d, n_tiles)

    def run(q, k, v, cu_q, cu_k) -> Quantized:
        cu_q_arg = cu_q if not dense else none_i32
        cu_k_arg = cu_k if not dense else none_i32
        vm = v_scale = none_f32
        if stats:
            ksum = torch.empty(nseq * hkv * n_chunks, bd, dtype=f32, device=dev)  # every row written
            vmax = torch.empty(nseq * hkv * n_chunks, bdv, dtype=f32, device=dev) if pv_fp8 else none_f32
            stats_launch(k, v, ksum, vmax, cu_k_arg, *stats_tail)
            km = torch.empty(nseq, hkv, bd, dtype=f32, device=dev)
            if pv_fp8:
                vm = torch.empty(nseq, hkv, bdv, dtype=f32, device=dev)
                v_scale = torch.empty(nseq, hkv, dv, dtype=f32, device=dev)
            finish_launch(ksum, vmax, km, vm, v_scale, cu_k_arg, seqlen_k, hkv, n_chunks, dv)
        else:  # no smoothing, no FP8 V (or nothing to reduce): K's mean is 0, V's scales 1
            km = torch.zeros(nseq, hkv, bd, dtype=f32, device=dev)
            if pv_fp8:
                vm = torch.zeros(nseq, hkv, bdv, dtype=f32, device=dev)
                v_scale = torch.ones(nseq, hkv, dv, dtype=f32, device=dev)
        k_q = torch.empty(k_q_shape, dtype=qk_dtype, device=dev)
        k_scale = new_k_scale(dev)
        v_t = torch.empty(vt_shape, dtype=torch.float8_e4m3fn, device=dev) if pv_fp8 else \
            _dummy(dev, torch.float8_e4m3fn)
        if kv_launch is not None:
            kv_launch(k, v, km, vm, k_q, k_scale, v_t, cu_k_arg, *kv_tail)
        q_q = torch.empty(q_q_shape, dtype=qk_dtype, device=dev)
        q_scale = torch.empty(q.shape[:-1], dtype=f32, device=dev)
        bias = torch.empty_like(q_scale) if has_bias else None
        q_mean = torch.zeros(nseq * hq * n_tiles, 2 * packed_bd, dtype=f32, device=dev) if cfg.smooth_q else None
        if q_launch is not None:
            q_launch(q, km, q_q, q_scale, bias if bias is not None else none_f32,
                     q_mean if q_mean is not None else none_f32, cu_q_arg, *q_tail)
        return Quantized(q=q_q, k=k_q, v=v_t if pv_fp8 else v, q_scale=q_scale, k_scale=k_scale,
                         v_scale=v_scale if pv_fp8 else None, row_bias=bias, q_mean=q_mean, qk_mode=mode,
                         pv_fp8=pv_fp8, pv_two_level=cfg.pv_accum == "fp32+fp32", block_m=block_m, block_n=block_n)

    return run

"""Quantized attention emulated on the tiled PyTorch backend: the kernels' scales and roundings,
float32 arithmetic, any device. For CPUs (to study accuracy without a GPU) and as the tight
reference of the Triton quantized kernels in the tests.

Q and K are quantized and dequantized exactly as the kernels quantize them (quantize_torch), V
goes through FP8 with its per-channel scales, and P is rounded to FP8 inside the tiled loop (the
``p_round`` hook) exactly where the kernel converts it. What the kernel adds back in float32 (the
smooth-Q tile means; the row term q . mean(K)) is added back here too: the row term as one extra
channel (q gets r_i, k gets 1), so the tiled backend needs no new argument.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..backends import torch_tiled
from ..spec import Call, Spec
from .config import FP8_MAX, PV_FP8, QuantConfig
from .quantize import _layout, packed_vt_tokens, quantize_torch, to_e4m3, unpack_int4


def emulate(spec: Spec, call: Call, precision: str, cfg: QuantConfig, block_m: int = None, block_n: int = None):
    """(out, lse) in the caller's layout, as the quantized kernel computes them (up to float32 rounding)."""
    from ..backends.triton.configs import quant_fwd_config
    from ..backends.triton.configs import block_dim

    d = call.q.shape[-1]
    if block_m is None or block_n is None:
        tiles = quant_fwd_config(max(d, call.v.shape[-1]), PV_FP8[precision])
        block_m, block_n = tiles.block_m, tiles.block_n
    need_row = spec.score != "softmax" or spec.return_lse
    mode_int4 = precision == "int4-fp8"
    qz = quantize_torch(call.q, call.k, call.v, call.cu_q, call.cu_k, call.lens_q, call.lens_k, precision=precision,
                        cfg=cfg, block_m=block_m, block_n=block_n, row_bias=need_row,
                        block_d=block_dim(d // 2 if mode_int4 else d))
    q, k = _dequantized_qk(qz, call, cfg, block_m, mode_int4)
    v = _dequantized_v(qz, call) if qz.pv_fp8 else call.v.float()
    if qz.row_bias is not None:  # s = scale * (q.k + r_i): one more channel, q gets r_i and k gets 1
        q = torch.cat([q, qz.row_bias.unsqueeze(-1)], -1)
        k = torch.cat([k, torch.ones_like(k[..., :1])], -1)
    emu_call = replace(call, q=q, k=k, v=v)
    p_round = _p_rounding(spec, call) if qz.pv_fp8 else None
    out, lse = torch_tiled.attention(replace(spec, precision="exact", quant=None), emu_call, p_round=p_round,
                                     key_tiles=block_n)
    out = out.to(call.q.dtype)
    return call.unpack(out), (call.unpack_lse(lse) if lse is not None else None)


def _dequantized_qk(qz, call: Call, cfg: QuantConfig, block_m: int, int4: bool):
    """Float32 Q (plus the smooth-Q tile means it was shifted by) and smoothed K, as the kernel
    multiplies them: (q_int . k_int) * sq * sk + qm . (k_int * sk)."""
    def values(x, scale):
        x = unpack_int4(x) if int4 else x
        return x.float() * scale.unsqueeze(-1)

    q = values(qz.q, qz.q_scale)
    k = values(qz.k, qz.k_scale)
    if qz.q_mean is not None:
        qp, seq, pos = _layout(q, call.cu_q, call.lens_q)
        hq, d = qp.shape[1], qp.shape[2]
        tiles = qz.q_mean.shape[0] // (call.batch * hq)
        means = qz.q_mean.view(call.batch, hq, tiles, -1)
        if int4:  # kernel layout: low half at [0, D/2), high half at [block_d, block_d + D/2)
            bd = qz.q_mean.shape[-1] // 2
            means = torch.cat([means[..., : d // 2], means[..., bd: bd + d // 2]], -1)
        else:
            means = means[..., :d]
        qp = qp + means[seq, :, pos // block_m]  # (T, Hq, D)
        q = qp.view(q.shape)
    return q, k


def _dequantized_v(qz, call: Call) -> torch.Tensor:
    """V as the FP8 product sees it: e4m3(V * 448 / amax) * amax / 448, per sequence and channel."""
    if call.dense:  # (B, Hkv, Dv, N) -> (B, N, Hkv, Dv)
        return qz.v.float().permute(0, 3, 1, 2) * qz.v_scale.unsqueeze(1)
    _, seq, pos = _layout(call.k, call.cu_k, call.lens_k)
    return packed_vt_tokens(qz.v, call.cu_k, seq, pos) * qz.v_scale[seq]  # (Hkv, Dv, columns) -> (T, Hkv, Dv)


def _p_rounding(spec: Spec, call: Call):
    """P as the kernel feeds it to the FP8 product: softmax and sigmoid P (<= 1) scaled by 448;
    SiLU's P as it is (the tiled backend, like the kernel, applies SiLU's 1/n to the sum)."""
    if spec.score == "silu":
        return lambda p: to_e4m3(p).to(p.dtype)
    return lambda p: to_e4m3(p * FP8_MAX).to(p.dtype) / FP8_MAX

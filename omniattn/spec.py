"""One validated description of an attention call, shared by every backend.

The public functions in :mod:`omniattn.api` turn their arguments into a :class:`Spec` (the scalars:
score function, scale, masks, precision) and a :class:`Call` (the tensors, in the packed layout
``(tokens, heads, dim)`` plus where each sequence starts). All input checking lives here, so every
backend sees inputs that are already known to be consistent, and every bad input gets the same
ValueError/TypeError whichever backend was asked for.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

SCORES = ("softmax", "sigmoid", "silu")
PRECISIONS = ("exact", "int8", "int8-fp8", "fp8", "int4-fp8", "auto")
BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BUCKETIZATIONS = ("log", "sqrt")


@dataclass(frozen=True)
class HstuMask:
    """HSTU's id-based mask (see DESIGN.md): targets see the history and themselves, never each other."""

    causal: bool = True
    contextual_seq_len: int = 0
    max_attn_len: int = 0


@dataclass(frozen=True)
class Spec:
    """Everything about a call except its tensors.

    ``window`` is the effective (left, right) window with ``causal`` already folded in (right <= 0),
    -1 meaning unbounded; ``hstu`` replaces the causal/window mask by HSTU's id-based mask.
    """

    score: str
    scale: float
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sigmoid_bias: Optional[float] = None
    silu_norm: Optional[float] = None
    return_lse: bool = False
    precision: str = "exact"
    hstu: Optional[HstuMask] = None
    dropout_p: float = 0.0  # probability of zeroing each P element (training); kept ones scaled by 1/(1-p)
    quant: Optional[object] = None  # omniattn.QuantConfig of a quantized precision (None: the defaults)
    deterministic: bool = False  # the backward's sums in a fixed order (bit-identical gradients run to run)


@dataclass(frozen=True)
class Rab:
    """HSTU's relative position + time bias, as the weights the kernels read per tile.

    ``pos_w`` (Hr, 2M-1) and ``ts_w`` (Hr, num_buckets+1) with Hr = 1 (shared) or H (per head);
    the position weight of a pair is ``pos_w[M - 1 + j - i]``.
    """

    pos_w: torch.Tensor
    ts_w: torch.Tensor
    timestamps: torch.Tensor
    max_seq_len: int
    num_buckets: int
    bucketization: str


@dataclass
class Call:
    """The tensors of one call.

    ``q``/``k``/``v`` are kept as the caller gave them: 4-D ``(B, N, H, D)`` for dense calls, 3-D
    ``(T, H, D)`` for varlen calls, with ``cu_q``/``cu_k`` (int32, on the inputs' device).
    ``lens_q``/``lens_k`` (host) describe the sequences in both cases.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: Optional[torch.Tensor]  # None for dense calls (see offsets())
    cu_k: Optional[torch.Tensor]
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    max_q: int
    max_k: int
    alibi: Optional[torch.Tensor] = None  # (B, Hq) float32
    num_targets: Optional[torch.Tensor] = None  # (B,) int32 on device
    targets_host: Optional[tuple[int, ...]] = None
    rab: Optional[Rab] = None
    # An explicit mask, read tile by tile (dense calls only): bool (True = allowed) or float
    # (added to the score), broadcastable to (B, Hq, Nq, Nk). Never expanded or copied.
    attn_mask: Optional[torch.Tensor] = None
    dropout_seed: int = 0  # seed of the counter-based dropout hash (DESIGN.md), with spec.dropout_p > 0
    # Varlen calls whose caller reads only some query rows (context-parallel HSTU: a rank's rows of
    # the whole batch): per sequence, the (start, stop) position ranges it reads. The other rows
    # must hold zero queries and get zero output gradients; the Triton kernels may then skip them
    # (their outputs and dQ rows are left zero), the other backends compute them.
    query_windows: Optional[tuple[tuple[tuple[int, int], ...], ...]] = None

    @property
    def dense(self) -> bool:
        return self.q.dim() == 4

    @property
    def batch(self) -> int:
        return len(self.lens_q)

    @property
    def heads_q(self) -> int:
        return self.q.shape[-2]

    def offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cu_seqlens of queries and keys (built for dense calls, which have none)."""
        if not self.dense:
            return self.cu_q, self.cu_k
        b, nq, nk, dev = self.q.shape[0], self.q.shape[1], self.k.shape[1], self.q.device
        steps = torch.arange(b + 1, dtype=torch.int32, device=dev)
        return steps * nq, steps * nk

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (tokens, heads, dim); a view when the dense layout allows it."""
        if not self.dense:
            return self.q, self.k, self.v
        return tuple(t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3]) for t in (self.q, self.k, self.v))

    def unpack(self, out: torch.Tensor) -> torch.Tensor:
        """Packed (Tq, H, Dv) output back to the caller's layout."""
        if not self.dense:
            return out
        return out.view(self.q.shape[0], self.q.shape[1], out.shape[-2], out.shape[-1])

    def unpack_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """Packed (H, Tq) lse to (B, H, Nq) for dense calls."""
        if not self.dense:
            return lse
        b, n = self.q.shape[0], self.q.shape[1]
        return lse.view(lse.shape[0], b, n).transpose(0, 1)


# --------------------------------------------------------------------------------------------
# small checks, each naming the argument and what was expected


def autocast_qkv(q, k, v):
    """q, k, v as autocast gives PyTorch's own attention (an op it runs in lower precision): inside
    an autocast region for their device, floating tensors other than float64 in the region's dtype
    (a float32 query from a float32 rotary embedding meets a bfloat16 value there). Masks, ALiBi
    slopes and the relative bias' weights keep their dtypes: the kernels read them in float32."""
    device_type = q.device.type if isinstance(q, torch.Tensor) else None
    if device_type in (None, "meta") or not torch.is_autocast_enabled(device_type):  # (meta: no autocast there)
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (q, k, v))


def _require_tensor(name: str, t, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor of shape {layout}, got shape {tuple(t.shape)}")
    return t


def _require_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def _require_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _require_float(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a float > 0, got {value!r}")
    return float(value)


def _check_qkv_dtypes_devices(q, k, v) -> None:
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got {t.device}")


def _check_heads_and_dims(q, k, v, token_axes: int) -> None:
    """Shapes after the token axes are (heads, dim); GQA needs Hq % Hkv == 0."""
    hq, d = q.shape[token_axes], q.shape[token_axes + 1]
    hk, dk = k.shape[token_axes], k.shape[token_axes + 1]
    hv = v.shape[token_axes]
    if d == 0 or v.shape[token_axes + 1] == 0:
        raise ValueError(f"q/v: head dimension must be > 0, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if dk != d:
        raise ValueError(f"k: expected head dim {d} (the head dim of q), got {dk} (k shape {tuple(k.shape)})")
    if hv != hk:
        raise ValueError(f"v: expected {hk} heads (the heads of k), got {hv} (v shape {tuple(v.shape)})")
    if hk == 0 or hq % hk != 0:
        raise ValueError(
            f"k: the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hk})"
        )
    if k.shape[:token_axes] != v.shape[:token_axes]:
        raise ValueError(f"v: expected the token shape of k {tuple(k.shape[:token_axes])}, got {tuple(v.shape[:token_axes])}")


# cu_seqlens on a GPU must be copied to the host to be checked, which waits for the GPU; a model
# calls many layers with the same offsets tensor, so remember the last few checked ones. The key is
# the tensor object itself (a weak reference, so a new tensor at a reused address is not mistaken
# for it) and its _version (bumped by any in-place change).
_checked_offsets: dict = {}


def _cacheable(t: torch.Tensor) -> bool:
    """CPU tensors are read without a sync, and cheaply: never remembered."""
    return t.device.type != "cpu"


def remembered(t: torch.Tensor, tag, compute):
    """compute(t), remembered per (tensor object, _version, tag) for tensors on accelerators: what
    needs a device-to-host copy (a sync) or a conversion is done once per tensor, not per call."""
    if not _cacheable(t):
        return compute(t)
    key = (id(t), tag)
    hit = _checked_offsets.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    value = compute(t)
    if len(_checked_offsets) > 256:
        _checked_offsets.clear()
    _checked_offsets[key] = (weakref.ref(t), t._version, value)
    return value


def _host_lengths(name: str, cu: torch.Tensor, total: int, device: torch.device) -> tuple[int, ...]:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected a 1-D int32/int64 torch.Tensor of sequence offsets, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D tensor of B+1 offsets, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of q), got {cu.device}")
    # validated once per offsets tensor (and total): a model's layers share one (B=64: ~30 us a call)
    return remembered(cu, ("lengths", name, total), lambda t: _checked_lengths(name, t.tolist(), total))


def _checked_lengths(name: str, offsets: list, total: int) -> tuple[int, ...]:
    if offsets[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {offsets[0]}")
    lens = tuple(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    if min(lens, default=0) < 0:
        i = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name}: must be non-decreasing, but {name}[{i + 1}]={offsets[i + 1]} < {name}[{i}]={offsets[i]}")
    if offsets[-1] != total:
        raise ValueError(f"{name}: must end at the number of tokens ({total}), got {offsets[-1]}")
    return lens


def _check_scale(scale, head_dim: int, name: str = "scale") -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return _require_float(name, scale)


def _check_window(window, causal: bool) -> tuple[int, int]:
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window)
    ):
        raise ValueError(f"window: expected a pair of ints (left, right), each >= 0 or -1 for unbounded, got {window!r}")
    left, right = int(window[0]), int(window[1])
    if causal:
        # Causal already limits keys to j <= i + Nk - Nq: any right is clipped to 0, as flash-attn
        # does (transformers passes window=(w-1, w-1) with causal for sliding-window models).
        right = 0
    return left, right


def _check_alibi(alibi, batch: int, heads: int, device) -> Optional[torch.Tensor]:
    if alibi is None:
        return None
    if not isinstance(alibi, torch.Tensor):
        raise TypeError(f"alibi_slopes: expected a float tensor of shape ({heads},) or ({batch}, {heads}), got {type(alibi).__name__}")
    if not alibi.is_floating_point():
        raise TypeError(f"alibi_slopes: expected a floating-point tensor, got {alibi.dtype}")
    if alibi.device != device:
        raise ValueError(f"alibi_slopes: expected a tensor on {device}, got {alibi.device}")
    if tuple(alibi.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes: expected shape ({heads},) or ({batch}, {heads}), got {tuple(alibi.shape)}")
    if alibi.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes: ALiBi slopes are constants here (no gradient is computed); pass alibi_slopes.detach()")
    return alibi.detach().to(torch.float32).expand(batch, heads)


def _check_common(
    score,
    scale,
    head_dim,
    causal,
    window,
    sigmoid_bias,
    silu_norm,
    softcap,
    precision,
    backend,
    return_lse,
    quant_config=None,
    deterministic=False,
) -> Spec:
    score = _require_choice("score", score, SCORES)
    _require_choice("precision", precision, PRECISIONS)
    quant_config = check_quant_config(quant_config, precision)
    _require_choice("backend", backend, BACKENDS)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    _require_bool("deterministic", deterministic)
    if return_lse and score != "softmax":
        raise ValueError(f"return_lse: only softmax attention has a log-sum-exp; got score={score!r}")
    if sigmoid_bias is not None:
        if score != "sigmoid":
            raise ValueError(f"sigmoid_bias: only used with score='sigmoid'; got score={score!r}")
        sigmoid_bias = _require_float("sigmoid_bias", sigmoid_bias)
    if silu_norm is not None:
        if score != "silu":
            raise ValueError(f"silu_norm: only used with score='silu'; got score={score!r}")
        silu_norm = _require_float("silu_norm", silu_norm, positive=True)
    softcap = _require_float("softcap", softcap)
    if softcap < 0:
        raise ValueError(f"softcap: expected 0 (off) or a cap > 0, got {softcap}")
    return Spec(
        score=score,
        scale=_check_scale(scale, head_dim),
        causal=causal,
        window=_check_window(window, causal),
        softcap=softcap,
        sigmoid_bias=sigmoid_bias,
        silu_norm=silu_norm,
        return_lse=return_lse,
        precision=precision,
        quant=quant_config,
        deterministic=deterministic,
    )


def _require_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_quant_config(quant_config, precision: str):
    """An omniattn.QuantConfig (or None), only meaningful with a quantized precision."""
    if quant_config is None:
        return None
    from .quant.config import QuantConfig

    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"quant_config: expected an omniattn.QuantConfig or None, got {type(quant_config).__name__}")
    if precision == "exact":
        raise ValueError("quant_config: only used with a quantized precision (precision='int8', 'int8-fp8', 'fp8', "
                         "'int4-fp8' or 'auto'); got precision='exact'")
    return quant_config


# --------------------------------------------------------------------------------------------
# one entry point per public layout


def check_attn_mask(attn_mask, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, device) -> Optional[torch.Tensor]:
    """An explicit mask: bool (True = allowed) or float (added to the score), broadcastable to
    (B, Hq, Nq, Nk), on the inputs' device. Returned as given (never expanded or copied)."""
    if attn_mask is None:
        return None
    want = f"({batch}, {heads_q}, {seqlen_q}, {seqlen_k})"
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a bool or float tensor broadcastable to {want}, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask: expected dtype bool (True = allowed) or a float dtype (added to the score), got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask: expected a tensor on {device} (the device of q), got {attn_mask.device}")
    full = (batch, heads_q, seqlen_q, seqlen_k)
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(m not in (1, n) for m, n in zip(shape[::-1], full[::-1])):
        raise ValueError(f"attn_mask: shape {shape} does not broadcast to {want} (batch, heads, seqlen_q, seqlen_k)")
    if attn_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("attn_mask: no gradient is computed for the mask; pass attn_mask.detach()")
    return attn_mask


def check_dropout(dropout_p) -> float:
    """dropout_p in [0, 1): the probability of zeroing each attention weight (training)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def draw_dropout_seed() -> int:
    """A uint32 seed for the counter-based dropout hash, drawn from torch's default generator
    (so ``torch.manual_seed`` reproduces a run)."""
    return int(torch.randint(0, 2**32, (1,), dtype=torch.int64).item())


def dense_call(q, k, v, *, alibi_slopes=None, attn_mask=None, dropout_p=0.0, dropout_seed=None, **scalars) -> tuple[Spec, Call]:
    """Validate ``attention(q, k, v, ...)``: q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, Dv).

    ``attn_mask`` (see :func:`check_attn_mask`) and ``dropout_p`` fill ``Call.attn_mask`` and
    ``Spec.dropout_p``; with dropout a seed is drawn unless ``dropout_seed`` is given."""
    _require_tensor("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
    _require_tensor("k", k, 4, "(batch, seqlen_k, heads_kv, head_dim)")
    _require_tensor("v", v, 4, "(batch, seqlen_k, heads_kv, head_dim_v)")
    _check_qkv_dtypes_devices(q, k, v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} (the batch of q), got {k.shape[0]}")
    _check_heads_and_dims(q, k, v, token_axes=2)
    spec = _check_common(head_dim=q.shape[-1], **scalars)
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    call = Call(q, k, v, None, None, (nq,) * b, (nk,) * b, nq, nk, alibi=_check_alibi(alibi_slopes, b, q.shape[2], q.device))
    call.attn_mask = check_attn_mask(attn_mask, b, q.shape[2], nq, nk, q.device)
    spec, call.dropout_seed = with_dropout(spec, dropout_p, dropout_seed)
    return spec, call


def with_dropout(spec: Spec, dropout_p, dropout_seed=None) -> tuple[Spec, int]:
    """``spec`` with ``dropout_p`` set, and the call's seed (drawn when dropout is on and none is given)."""
    dropout_p = check_dropout(dropout_p)
    if dropout_p == 0.0:
        return spec, 0
    if dropout_seed is None:
        dropout_seed = draw_dropout_seed()
    elif isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int) or not 0 <= dropout_seed < 2**32:
        raise ValueError(f"dropout_seed: expected an int in [0, 2**32), got {dropout_seed!r}")
    return dataclasses.replace(spec, dropout_p=dropout_p), int(dropout_seed)


def varlen_call(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, alibi_slopes=None, dropout_p=0.0,
    dropout_seed=None, **scalars
) -> tuple[Spec, Call]:
    """Validate ``attention_varlen``: q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv), cu_seqlens (B+1,)."""
    _require_tensor("q", q, 3, "(total_q, heads_q, head_dim)")
    _require_tensor("k", k, 3, "(total_k, heads_kv, head_dim)")
    _require_tensor("v", v, 3, "(total_k, heads_kv, head_dim_v)")
    _check_qkv_dtypes_devices(q, k, v)
    _check_heads_and_dims(q, k, v, token_axes=1)
    spec = _check_common(head_dim=q.shape[-1], **scalars)
    lens_q = _host_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    lens_k = _host_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(lens_q) != len(lens_k):
        raise ValueError(
            f"cu_seqlens_k: expected {len(lens_q) + 1} offsets (as many sequences as cu_seqlens_q), got {len(lens_k) + 1}"
        )
    max_q = _require_int("max_seqlen_q", max_seqlen_q, 0)
    max_k = _require_int("max_seqlen_k", max_seqlen_k, 0)
    if lens_q and max(lens_q) > max_q:
        raise ValueError(f"max_seqlen_q: {max_q} is smaller than the longest query sequence ({max(lens_q)})")
    if lens_k and max(lens_k) > max_k:
        raise ValueError(f"max_seqlen_k: {max_k} is smaller than the longest key sequence ({max(lens_k)})")
    call = Call(
        q,
        k,
        v,
        _device_offsets(cu_seqlens_q),
        _device_offsets(cu_seqlens_k),
        lens_q,
        lens_k,
        max_q,
        max_k,
        alibi=_check_alibi(alibi_slopes, len(lens_q), q.shape[1], q.device),
    )
    spec, call.dropout_seed = with_dropout(spec, dropout_p, dropout_seed)
    return spec, call


def _device_offsets(cu: torch.Tensor) -> torch.Tensor:
    """Offsets as the kernels read them: int32 and contiguous. The Triton kernels index the
    tensor's storage directly, so a strided view (e.g. ``t[::2]``) would be read as its base."""
    return remembered(cu, "int32", lambda t: t.to(torch.int32).contiguous())


def hstu_call(
    q,
    k,
    v,
    seq_offsets,
    max_seq_len,
    *,
    alpha,
    causal,
    num_targets,
    contextual_seq_len,
    max_attn_len,
    rab,
    timestamps,
    silu_norm,
    precision,
    backend,
    quant_config=None,
    deterministic=False,
) -> tuple[Spec, Call]:
    """Validate ``hstu_attention``: q, k (T, H, Dqk), v (T, H, Dv), seq_offsets (B+1,)."""
    _require_tensor("q", q, 3, "(total, heads, dim_qk)")
    _require_tensor("k", k, 3, "(total, heads, dim_qk)")
    _require_tensor("v", v, 3, "(total, heads, dim_v)")
    _check_qkv_dtypes_devices(q, k, v)
    _check_heads_and_dims(q, k, v, token_axes=1)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: HSTU is self-attention; expected {q.shape[0]} tokens (as q), got {k.shape[0]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    max_seq_len = _require_int("max_seq_len", max_seq_len, 0)
    lens = _host_lengths("seq_offsets", seq_offsets, q.shape[0], q.device)
    if lens and max(lens) > max_seq_len:
        raise ValueError(f"max_seq_len: {max_seq_len} is smaller than the longest sequence ({max(lens)})")
    contextual_seq_len = _require_int("contextual_seq_len", contextual_seq_len, 0)
    max_attn_len = _require_int("max_attn_len", max_attn_len, 0)
    _require_choice("precision", precision, PRECISIONS)
    _require_choice("backend", backend, BACKENDS)
    _require_bool("deterministic", deterministic)
    spec = Spec(
        score="silu",
        scale=_check_scale(alpha, q.shape[-1], name="alpha"),
        silu_norm=float(max(max_seq_len, 1)) if silu_norm is None else _require_float("silu_norm", silu_norm, positive=True),
        precision=precision,
        hstu=HstuMask(causal, contextual_seq_len, max_attn_len),
        quant=check_quant_config(quant_config, precision),
        deterministic=deterministic,
    )
    targets, targets_host = _check_num_targets(num_targets, lens, contextual_seq_len, q.device)
    cu = _device_offsets(seq_offsets)
    call = Call(q, k, v, cu, cu, lens, lens, max_seq_len, max_seq_len, num_targets=targets, targets_host=targets_host)
    call.rab = _check_rab(rab, timestamps, q.shape[0], q.shape[1], lens, q.device)
    return spec, call


def _check_num_targets(num_targets, lens, contextual: int, device):
    if num_targets is None:
        return None, None
    if not isinstance(num_targets, torch.Tensor):
        raise TypeError(f"num_targets: expected an int tensor of shape ({len(lens)},), got {type(num_targets).__name__}")
    if num_targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"num_targets: expected dtype int32 or int64, got {num_targets.dtype}")
    if tuple(num_targets.shape) != (len(lens),):
        raise ValueError(f"num_targets: expected shape ({len(lens)},) (one count per sequence), got {tuple(num_targets.shape)}")
    if num_targets.device != device:
        raise ValueError(f"num_targets: expected a tensor on {device}, got {num_targets.device}")
    host = remembered(num_targets, ("targets", lens, contextual), lambda t: _checked_targets(t.tolist(), lens, contextual))
    return remembered(num_targets, "int32", lambda t: t.to(torch.int32).contiguous()), host


def _checked_targets(host: list, lens, contextual: int) -> tuple[int, ...]:
    for i, (t, n) in enumerate(zip(host, lens)):
        if t < 0 or t > n:
            raise ValueError(f"num_targets: sequence {i} has {n} tokens but num_targets[{i}]={t} (expected 0..{n})")
        if contextual and t > 0 and n - t < contextual:
            raise ValueError(
                f"num_targets: sequence {i} has {n} tokens, {t} targets and contextual_seq_len={contextual}; "
                "the contextual prefix must come before the targets"
            )
    return tuple(host)


def _check_rab(rab, timestamps, total: int, heads: int, lens, device) -> Optional[Rab]:
    from .hstu.relative_bias import RelativeBias  # local: hstu imports this module

    if rab is None:
        if timestamps is not None:
            raise ValueError("timestamps: only used with rab (a RelativeBias); pass rab=... or drop timestamps")
        return None
    if not isinstance(rab, RelativeBias):
        raise TypeError(f"rab: expected an omniattn.hstu.RelativeBias module, got {type(rab).__name__}")
    if timestamps is None:
        raise ValueError(f"timestamps: rab needs the timestamp of every token, a tensor of shape ({total},)")
    if not isinstance(timestamps, torch.Tensor):
        raise TypeError(f"timestamps: expected a tensor of shape ({total},), got {type(timestamps).__name__}")
    if tuple(timestamps.shape) != (total,):
        raise ValueError(f"timestamps: expected shape ({total},) (one per token), got {tuple(timestamps.shape)}")
    if timestamps.device != device:
        raise ValueError(f"timestamps: expected a tensor on {device}, got {timestamps.device}")
    if timestamps.is_complex() or timestamps.dtype == torch.bool:
        raise TypeError(f"timestamps: expected an integer or float tensor, got {timestamps.dtype}")
    if rab.num_heads not in (None, heads):
        raise ValueError(f"rab: has weights for {rab.num_heads} heads but the inputs have {heads} heads")
    if lens and max(lens) > rab.max_seq_len:
        raise ValueError(f"rab: built for max_seq_len={rab.max_seq_len} but a sequence has {max(lens)} tokens")
    if rab.pos_w.device != device:
        raise ValueError(f"rab: weights are on {rab.pos_w.device}, inputs on {device}; move the module with .to()")
    return Rab(
        pos_w=rab.pos_w.view(-1, rab.pos_w.shape[-1]),
        ts_w=rab.ts_w.view(-1, rab.ts_w.shape[-1]),
        timestamps=timestamps,
        max_seq_len=rab.max_seq_len,
        num_buckets=rab.num_buckets,
        bucketization=rab.bucketization,
    )

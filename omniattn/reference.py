"""The maths of DESIGN.md, materialised: the specification every backend is tested against.

Each sequence's full (Lq, Lk) score matrix is built explicitly, in float64 by default, and
gradients come from autograd. Obviously correct beats fast here; never use this for long inputs.

The functions take the same arguments as the public API (plus ``dtype``, the compute dtype) and
return results in that compute dtype, so tests can measure a backend's error against it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import spec as _spec
from .spec import Call, Spec

__all__ = [
    "attention",
    "attention_varlen",
    "hstu_attention",
    "allowed_mask",
    "hstu_allowed_mask",
    "hstu_ids",
    "relative_bias",
    "run",
    "dropout_keep",
    "fmix32",
    "all_finite",
]


def allowed_mask(lq: int, lk: int, window: tuple[int, int], device=None) -> torch.Tensor:
    """(lq, lk) bool: key j is visible from query i. ``window`` is (left, right), -1 unbounded;
    causal is window right = 0. Bottom-right aligned: query i sits at key position i + lk - lq."""
    i = torch.arange(lq, device=device).view(-1, 1) + (lk - lq)
    j = torch.arange(lk, device=device).view(1, -1)
    left, right = window
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def hstu_ids(length: int, num_targets: int, contextual_seq_len: int, device=None) -> tuple[torch.Tensor, int]:
    """HSTU's position ids of one sequence and its max_id (DESIGN.md)."""
    p = torch.arange(length, device=device)
    if contextual_seq_len > 0:
        ids = (p - contextual_seq_len + 1).clamp(min=0)
        max_id = length - contextual_seq_len + 1
    else:
        ids, max_id = p, length
    max_id -= num_targets
    return ids.clamp(max=max_id), max_id


def hstu_allowed_mask(
    length: int,
    causal: bool = True,
    num_targets: int = 0,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    device=None,
) -> torch.Tensor:
    """(L, L) bool mask of HSTU attention for one sequence (targets never see each other)."""
    ids, max_id = hstu_ids(length, num_targets, contextual_seq_len, device)
    d = ids.view(-1, 1) - ids.view(1, -1)
    if not causal:
        d = d.abs()
    eye = torch.eye(length, dtype=torch.bool, device=device)
    ok = eye | (d > 0)
    if max_attn_len > 0:
        ok &= d <= max_attn_len
    if contextual_seq_len > 0:
        ok |= (ids.view(-1, 1) == 0) & (ids.view(1, -1) < max_id)
    return ok


def relative_bias(
    pos_w: torch.Tensor, ts_w: torch.Tensor, timestamps: torch.Tensor, max_seq_len: int, num_buckets: int,
    bucketization: str, num_targets: int = 0,
) -> torch.Tensor:
    """(Hr, L, L) materialised rab of one sequence: pos_w[M-1+p(j)-p(i)] + ts_w[bucket(t_next(i) - t_j)],
    p(i) = min(i, L - num_targets): the targets share one position, as they share one id."""
    rel, bucket = _relative_bias_indices(timestamps, max_seq_len, num_buckets, bucketization, num_targets)
    return pos_w[:, rel] + ts_w[:, bucket]


def _relative_bias_indices(timestamps, max_seq_len: int, num_buckets: int, bucketization: str, num_targets: int):
    """(L, L) indices into pos_w and ts_w of every pair of one sequence."""
    length = timestamps.shape[0]
    p = torch.arange(length, device=timestamps.device).clamp(max=length - num_targets)
    rel = (max_seq_len - 1) + p.view(1, -1) - p.view(-1, 1)
    t_next = torch.cat([timestamps[1:], timestamps[-1:]])
    dt = t_next.view(-1, 1) - timestamps.view(1, -1)
    x = dt.abs().to(torch.float32).clamp(min=1.0)
    x = torch.log(x) / 0.301 if bucketization == "log" else torch.sqrt(x)
    return rel, x.floor().clamp(0, num_buckets).long()


def mask_of_sequence(attn_mask: torch.Tensor, b: int) -> torch.Tensor:
    """The part of an attention mask broadcastable to (B, Hq, Nq, Nk) that batch entry b reads:
    a view of shape (Hq or 1, Nq or 1, Nk or 1)."""
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m[b if m.shape[0] > 1 else 0]


def _allowed_and_bias(spec: Spec, call: Call, b: int, lq: int, lk: int, device):
    """Which pairs of sequence b are allowed ((lq, lk) or (Hq, lq, lk) bool) and the float mask
    added to its scores ((Hq or 1, lq or 1, lk or 1), or None)."""
    if spec.hstu is not None:
        h = spec.hstu
        t = call.targets_host[b] if call.targets_host is not None else 0
        ok = hstu_allowed_mask(lq, h.causal, t, h.contextual_seq_len, h.max_attn_len, device)
    else:
        ok = allowed_mask(lq, lk, spec.window, device)
    if call.attn_mask is None:
        return ok, None
    if not call.dense:
        raise ValueError("attn_mask: only dense (batch, seqlen, heads, dim) calls take an explicit mask")
    m = mask_of_sequence(call.attn_mask, b)
    if m.dtype == torch.bool:
        return ok & m, None
    return ok & (m != -math.inf), m  # a -inf entry is a disallowed pair


# ------------------------------------------------------------------------------------ dropout
# DESIGN.md, "Explicit masks and dropout": whether pair (i, j) of sequence b and query head h is
# kept is a counter-based hash of the call's seed. uint32 arithmetic is done in int64 and masked
# to 32 bits; products of two 32-bit numbers are split so that no int64 product overflows.

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for 0 <= x < 2^32 (int64 tensor or int) and a 32-bit constant c."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def fmix32(x):
    """MurmurHash3's 32-bit finaliser on values in [0, 2^32) (int64 tensors or ints)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """Hashes below this are dropped: min(floor(p * 2^32), 2^32 - 1)."""
    return min(math.floor(p * 2**32), 2**32 - 1)


def dropout_row_hash(seed: int, b, h, i, heads_q: int):
    """The per-(sequence, head, query row) part of the hash: fmix32(base ^ i * 0x85EBCA77)."""
    base = fmix32((seed + 0x9E3779B9 * (b * heads_q + h + 1)) & _M32)
    return fmix32(base ^ ((i * 0x85EBCA77) & _M32))


def dropout_keep_from_rows(row, j, p: float):
    """Kept pairs given :func:`dropout_row_hash` of their rows and key positions j (broadcast)."""
    return fmix32((row + j * 0xC2B2AE3D) & _M32) >= dropout_threshold(p)


def dropout_keep(seed: int, b, h, i, j, p: float, heads_q: int):
    """Whether pair (i, j) of sequence b and query head h is kept by dropout with probability p.

    b, h, i, j: int64 tensors (or ints) that broadcast together, i and j positions within the
    sequence (0-based, unshifted); returns a bool tensor of the broadcast shape (a bool for ints).
    """
    return dropout_keep_from_rows(dropout_row_hash(seed, b, h, i, heads_q), j, p)


def _sequence(q, k, v, spec: Spec, call: Call, b: int, q0: int, k0: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (Lq, Hq, Dv) and lse (Hq, Lq) of sequence b."""
    lq, lk = call.lens_q[b], call.lens_k[b]
    hq, g = q.shape[1], q.shape[1] // k.shape[1]
    qh = q[q0 : q0 + lq].to(dtype).transpose(0, 1)  # (Hq, Lq, D)
    kh = k[k0 : k0 + lk].to(dtype).transpose(0, 1).repeat_interleave(g, 0)  # (Hq, Lk, D)
    vh = v[k0 : k0 + lk].to(dtype).transpose(0, 1).repeat_interleave(g, 0)  # (Hq, Lk, Dv)
    s = spec.scale * qh @ kh.transpose(1, 2)  # (Hq, Lq, Lk)
    if spec.softcap > 0:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if call.alibi is not None:
        i = torch.arange(lq, device=q.device).view(-1, 1) + (lk - lq)
        j = torch.arange(lk, device=q.device).view(1, -1)
        s = s - call.alibi[b].to(dtype).view(-1, 1, 1) * (i - j).abs().to(dtype)
    if call.rab is not None:
        r = call.rab
        ts = r.timestamps[q0 : q0 + lq]
        t = call.targets_host[b] if call.targets_host is not None else 0
        s = s + relative_bias(r.pos_w.to(dtype), r.ts_w.to(dtype), ts, r.max_seq_len, r.num_buckets, r.bucketization, t)
    ok, mask_bias = _allowed_and_bias(spec, call, b, lq, lk, q.device)
    if mask_bias is not None:
        s = s + mask_bias.to(dtype)
    if spec.score == "softmax":
        s = s.masked_fill(~ok, -math.inf)
        lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no allowed key
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    else:
        # where, not a product with the mask: a -inf mask entry would give silu(-inf) * 0 = NaN;
        # and the scores of disallowed pairs are zeroed first so no NaN gradient reaches them
        s = torch.where(ok, s, 0.0)
        if spec.score == "sigmoid":
            bias = spec.sigmoid_bias if spec.sigmoid_bias is not None else -math.log(max(lk, 1))
            p = torch.where(ok, torch.sigmoid(s + bias), 0.0)
        else:
            norm = spec.silu_norm if spec.silu_norm is not None else float(max(call.max_k, 1))
            p = torch.where(ok, F.silu(s) / norm, 0.0)
        lse = torch.full((hq, lq), math.nan, dtype=dtype, device=q.device)
    if spec.dropout_p > 0:
        keep = dropout_keep(
            call.dropout_seed, b, torch.arange(hq, device=q.device).view(-1, 1, 1),
            torch.arange(lq, device=q.device).view(1, -1, 1), torch.arange(lk, device=q.device).view(1, 1, -1),
            spec.dropout_p, hq,
        )
        p = p * keep.to(dtype) / (1 - spec.dropout_p)
    return (p @ vh).transpose(0, 1), lse


def _empty_result(q, k, v, shape, dtype) -> torch.Tensor:
    """An empty result of a batch of no sequences, still part of the autograd graph of q, k and v
    (each sum is over no elements: exactly 0), so ``.backward()`` gives zero-size gradients as
    every other backend does instead of failing for want of a grad_fn."""
    connect = (q.sum() + k.sum() + v.sum()).to(dtype) * 0
    return torch.zeros(shape, dtype=dtype, device=q.device) + connect


def run(spec: Spec, call: Call, dtype=torch.float64) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Packed output (Tq, Hq, Dv) in ``dtype`` and, for softmax, lse (Hq, Tq) (float32 unless dtype is float64)."""
    if call.attn_mask is not None and not call.dense:
        raise ValueError("attn_mask: only dense (batch, seqlen, heads, dim) calls take an explicit mask")
    finite = all_finite(call)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in _leaves(call))
    if finite and not needs_grad:
        return _run(spec, call, dtype)
    # the rule below also covers a non-finite upstream gradient, known only in the backward pass
    return _NonFinite.apply(spec, call, dtype, finite, *_leaves(call))


def _run(spec: Spec, call: Call, dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    q, k, v = call.packed()
    outs, lses = [], []
    q0 = k0 = 0
    for b in range(call.batch):
        o, lse = _sequence(q, k, v, spec, call, b, q0, k0, dtype)
        outs.append(o)
        lses.append(lse)
        q0 += call.lens_q[b]
        k0 += call.lens_k[b]
    hq, dv = q.shape[1], v.shape[2]
    out = torch.cat(outs, 0) if outs else _empty_result(q, k, v, (0, hq, dv), dtype)
    if spec.score != "softmax":
        return out, None
    lse = torch.cat(lses, 1) if lses else _empty_result(q, k, v, (hq, 0), dtype)
    return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)


# ------------------------------------------------------------------------ non-finite inputs
# DESIGN.md: a NaN/Inf in q, k or v makes NaN exactly the outputs and gradients whose maths
# touches it, and nothing else. Materialised autograd cannot say that (a disallowed pair still
# multiplies 0 by v_j, and 0 * NaN is NaN), so the rule is stated here on the structure: the
# result is computed from the inputs with every non-finite value replaced by 0 (so nothing can
# leak), then NaN is written where the rule says. With A the allowed pairs (dropout aside):
#   bad score   S_ij    = A_ij and (q_i or k_j non-finite, or a NaN/+inf float mask entry)
#   output      o_id    : some S_ij in row i (softmax: its lse too), or A_ij with v_jd non-finite
#   P_ij bad            : softmax A_ij and row i has a bad score; sigmoid/SiLU S_ij
#   delta_i bad         : softmax only: row i has an allowed key and o_i, dO_i or dlse_i is non-finite
#   dS_ij bad           : A_ij and (P_ij bad, delta_i bad, dO_i or v_j non-finite)
#   dq_i / dk_j         : some bad dS_ij in row i / column j
#   dv_jd               : some A_ij with P_ij bad or dO_id non-finite
#   relative-bias grads : some bad dS_ij at that weight's position or time bucket


def _leaves(call: Call) -> list:
    rab = call.rab
    return [call.q, call.k, call.v, rab.pos_w if rab is not None else None, rab.ts_w if rab is not None else None]


def _float_mask_is_finite(mask: Optional[torch.Tensor]) -> bool:
    """A float mask may hold -inf (disallowed pairs); NaN or +inf count as non-finite inputs."""
    if mask is None or mask.dtype == torch.bool or mask.numel() == 0:
        return True
    top = mask.amax()  # NaN propagates through the max
    return bool(top < math.inf)


def all_finite(call: Call) -> bool:
    """Whether q, k, v (and a float attn_mask, -inf aside) hold only finite values."""
    for t in (call.q, call.k, call.v):
        if t.numel() and not bool(torch.isfinite(t).all()):
            return False
    return _float_mask_is_finite(call.attn_mask)


def _zero_nonfinite(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _bad(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else ~torch.isfinite(t)


def _sequence_structure(spec: Spec, call: Call, b: int, q0: int, k0: int, bq, bk, bv):
    """(A, S, rows) of sequence b: allowed pairs and bad scores (Hq, Lq, Lk), bad rows (Hq, Lq)."""
    lq, lk = call.lens_q[b], call.lens_k[b]
    hq, g = bq.shape[1], bq.shape[1] // bk.shape[1]
    ok, mask_bias = _allowed_and_bias(spec, call, b, lq, lk, bq.device)
    allowed = ok.expand(hq, lq, lk)
    bad_scores = bq[q0 : q0 + lq].t().unsqueeze(-1) | bk[k0 : k0 + lk].t().repeat_interleave(g, 0).unsqueeze(1)
    if mask_bias is not None:
        bad_scores = bad_scores | mask_bias.isnan() | (mask_bias == math.inf)
    bad_scores = allowed & bad_scores
    return allowed, bad_scores, bad_scores.any(-1)


class _NonFinite(torch.autograd.Function):
    """The reference under the rule above: computed on sanitised inputs (an autograd graph of its
    own, kept for the backward pass and for second derivatives), NaN written by the rule, in the
    forward pass for the inputs and in the backward pass for the upstream gradients."""

    @staticmethod
    def forward(ctx, spec, call, dtype, finite, q, k, v, pos_w, ts_w):
        import dataclasses

        inputs = (q, k, v, pos_w, ts_w)
        with torch.enable_grad():
            # one view per role: attention(x, x, x) must give each role its own gradient
            q, k, v = (t.view_as(t) if t.requires_grad else t for t in (q, k, v))
            clean_call = dataclasses.replace(call, q=q, k=k, v=v)
            if not finite:
                # sanitised copies are the leaves of the inner graph: the gradient at a non-finite
                # element's own position (e.g. dv_j = sum_i p_ij dO_i at a NaN of v_j) does not
                # depend on its value. (Second derivatives then stop here; finite inputs keep them.)
                q, k, v = (_zero_nonfinite(t.detach()).requires_grad_(t.requires_grad) for t in (q, k, v))
                mask = call.attn_mask
                if mask is not None and mask.dtype != torch.bool:  # NaN / +inf entries: bad scores, below
                    mask = torch.where(mask.isnan() | (mask == math.inf), torch.zeros((), dtype=mask.dtype), mask)
                clean_call = dataclasses.replace(call, q=q, k=k, v=v, attn_mask=mask)
            out, lse = _run(spec, clean_call, dtype)
        leaves = [(i, c) for i, (t, c) in enumerate(zip(inputs, (q, k, v, pos_w, ts_w))) if t is not None and t.requires_grad]
        qp, kp, vp = call.packed()
        touched = None
        if not finite:
            touched, rows = _forward_rule(spec, call, qp, kp, vp, out.shape)
        ctx.spec, ctx.call, ctx.graph, ctx.leaves, ctx.touched = spec, call, (out, lse), leaves, touched
        out = out.detach()
        lse = lse.detach() if lse is not None else None
        if touched is not None:
            out = torch.where(touched, torch.full((), math.nan, dtype=out.dtype, device=out.device), out)
            if lse is not None:
                lse = torch.where(rows, torch.full((), math.nan, dtype=lse.dtype, device=lse.device), lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        spec, call = ctx.spec, ctx.call
        out, lse = ctx.graph
        softmax = lse is not None
        targets, grads_in = [out], [_zero_nonfinite(dout)]
        if softmax and dlse is not None:
            targets.append(lse)
            grads_in.append(_zero_nonfinite(dlse))
        found = torch.autograd.grad(targets, [c for _, c in ctx.leaves], grads_in, allow_unused=True,
                                    retain_graph=True, create_graph=torch.is_grad_enabled())
        grads = [None] * 5  # by role: q, k, v, pos_w, ts_w (one tensor may play several roles)
        for (i, _), grad in zip(ctx.leaves, found):
            grads[i] = grad
        dq, dk, dv, dpos, dts = grads
        bad_dlse = _bad(dlse) if softmax and dlse is not None else None
        if ctx.touched is None and bool(torch.isfinite(dout).all()) and (bad_dlse is None or not bad_dlse.any()):
            return None, None, None, None, dq, dk, dv, dpos, dts
        qp, kp, vp = call.packed()
        bad = _backward_rule(spec, call, qp, kp, vp, ctx.touched, _bad(dout), bad_dlse)

        def overlay(grad, bad, shape):  # bad: per (token, head) or per element of grad
            if grad is None:
                return None
            grad = grad.reshape(bad.shape[:2] + grad.shape[-1:]) if grad.dim() >= 3 else grad  # packed
            bad = bad.unsqueeze(-1) if bad.dim() < grad.dim() else bad
            return torch.where(bad, torch.full((), math.nan, dtype=grad.dtype, device=grad.device), grad).reshape(shape)

        dq = overlay(dq, bad["dq"], call.q.shape)
        dk = overlay(dk, bad["dk"], call.k.shape)
        dv = overlay(dv, bad["dv"], call.v.shape)
        dpos = overlay(dpos, bad["dpos"] > 0, dpos.shape) if dpos is not None else None
        dts = overlay(dts, bad["dts"] > 0, dts.shape) if dts is not None else None
        return None, None, None, None, dq, dk, dv, dpos, dts


def _forward_rule(spec: Spec, call: Call, qp, kp, vp, out_shape):
    """Packed (Tq, Hq, Dv) outputs and (Hq, Tq) lse rows that the rule makes NaN."""
    bq, bk, bv = _bad(qp).any(-1), _bad(kp).any(-1), _bad(vp)  # (Tq, Hq), (Tk, Hkv), (Tk, Hkv, Dv)
    touched = torch.zeros(out_shape, dtype=torch.bool, device=qp.device)
    rows = torch.zeros(qp.shape[1], qp.shape[0], dtype=torch.bool, device=qp.device)
    g = qp.shape[1] // kp.shape[1]
    q0 = k0 = 0
    for b in range(call.batch):
        lq, lk = call.lens_q[b], call.lens_k[b]
        allowed, _, bad_rows = _sequence_structure(spec, call, b, q0, k0, bq, bk, bv)
        bv_h = bv[k0 : k0 + lk].transpose(0, 1).repeat_interleave(g, 0).double()  # (Hq, Lk, Dv)
        touched[q0 : q0 + lq] = (bad_rows.unsqueeze(-1) | ((allowed.double() @ bv_h) > 0)).transpose(0, 1)
        rows[:, q0 : q0 + lq] = bad_rows
        q0, k0 = q0 + lq, k0 + lk
    return touched, rows


def _backward_rule(spec: Spec, call: Call, qp, kp, vp, touched, bdo, bad_dlse) -> dict:
    """Which gradients the rule makes NaN: dq (Tq, Hq), dk (Tk, Hkv), dv (Tk, Hkv, Dv), and
    counts of bad pairs per relative-bias weight."""
    softmax = spec.score == "softmax"
    bq, bk, bv = _bad(qp).any(-1), _bad(kp).any(-1), _bad(vp)
    hq, g = qp.shape[1], qp.shape[1] // kp.shape[1]
    dev = qp.device
    bad_dq = torch.zeros(qp.shape[0], hq, dtype=torch.bool, device=dev)
    bad_dk = torch.zeros(kp.shape[0], hq, dtype=torch.bool, device=dev)
    bad_dv = torch.zeros(kp.shape[0], hq, vp.shape[2], dtype=torch.bool, device=dev)
    rab = call.rab
    bad_pos = None if rab is None else torch.zeros(rab.pos_w.shape, dtype=torch.float64, device=dev)
    bad_ts = None if rab is None else torch.zeros(rab.ts_w.shape, dtype=torch.float64, device=dev)
    if softmax:  # delta_i = dO_i . o_i - dlse_i
        bad_delta = bdo.any(-1).t()  # (Hq, Tq)
        if touched is not None:
            bad_delta = bad_delta | touched.any(-1).t()
        if bad_dlse is not None:
            bad_delta = bad_delta | bad_dlse
    q0 = k0 = 0
    for b in range(call.batch):
        lq, lk = call.lens_q[b], call.lens_k[b]
        allowed, bad_scores, bad_rows = _sequence_structure(spec, call, b, q0, k0, bq, bk, bv)
        bdo_h = bdo[q0 : q0 + lq].transpose(0, 1)  # (Hq, Lq, Dv)
        if softmax:
            bad_p = allowed & bad_rows.unsqueeze(-1)
            row_bad = bad_delta[:, q0 : q0 + lq] | bdo_h.any(-1)
        else:
            bad_p = bad_scores
            row_bad = bdo_h.any(-1)
        bv_any = bv[k0 : k0 + lk].any(-1).t().repeat_interleave(g, 0)  # (Hq, Lk)
        bad_ds = allowed & (bad_p | row_bad.unsqueeze(-1) | bv_any.unsqueeze(1))
        bad_dq[q0 : q0 + lq] = bad_ds.any(-1).t()
        bad_dk[k0 : k0 + lk] = bad_ds.any(-2).t()
        dv_bad = bad_p.any(-2).unsqueeze(-1) | ((allowed.transpose(1, 2).double() @ bdo_h.double()) > 0)
        bad_dv[k0 : k0 + lk] = dv_bad.transpose(0, 1)
        if rab is not None:
            _rab_bad(call, b, q0, bad_ds, bad_pos, bad_ts)
        q0, k0 = q0 + lq, k0 + lk
    return dict(dq=bad_dq, dk=bad_dk.view(kp.shape[0], kp.shape[1], g).any(-1),
                dv=bad_dv.view(kp.shape[0], kp.shape[1], g, -1).any(2), dpos=bad_pos, dts=bad_ts)


def _rab_bad(call: Call, b: int, q0: int, bad_ds: torch.Tensor, bad_pos: torch.Tensor, bad_ts: torch.Tensor) -> None:
    """Count the bad dS of sequence b at the relative-bias weights they reach."""
    r = call.rab
    length = call.lens_q[b]
    t = call.targets_host[b] if call.targets_host is not None else 0
    rel, bucket = _relative_bias_indices(r.timestamps[q0 : q0 + length], r.max_seq_len, r.num_buckets,
                                         r.bucketization, t)
    counts = bad_ds.double()  # (Hq, L, L)
    if bad_pos.shape[0] == 1:
        counts = counts.sum(0, keepdim=True)
    bad_pos.index_add_(1, rel.flatten().to(bad_pos.device), counts.flatten(1))
    bad_ts.index_add_(1, bucket.flatten().to(bad_ts.device), counts.flatten(1))


# Public mirrors of the API, computing in `dtype` (float64 by default) and returning that dtype.


def attention(q, k, v, *, score="softmax", causal=False, window=(-1, -1), scale=None, sigmoid_bias=None,
              silu_norm=None, softcap=0.0, alibi_slopes=None, return_lse=False, attn_mask=None, dropout_p=0.0,
              dropout_seed=None, dtype=torch.float64):
    """Reference of :func:`omniattn.attention` (dense (B, N, H, D) layout); ``dropout_seed`` pins
    the dropout hash's seed (drawn from torch's default generator when None)."""
    spec, call = _spec.dense_call(
        q, k, v, score=score, causal=causal, window=window, scale=scale, sigmoid_bias=sigmoid_bias,
        silu_norm=silu_norm, softcap=softcap, alibi_slopes=alibi_slopes, precision="exact",
        backend="reference", return_lse=return_lse, attn_mask=attn_mask, dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )
    out, lse = run(spec, call, dtype)
    out = call.unpack(out)
    return (out, call.unpack_lse(lse)) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, score="softmax",
                     causal=False, window=(-1, -1), scale=None, sigmoid_bias=None, silu_norm=None, softcap=0.0,
                     alibi_slopes=None, return_lse=False, dropout_p=0.0, dropout_seed=None, dtype=torch.float64):
    """Reference of :func:`omniattn.attention_varlen` (packed (T, H, D) layout)."""
    spec, call = _spec.varlen_call(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, score=score, causal=causal,
        window=window, scale=scale, sigmoid_bias=sigmoid_bias, silu_norm=silu_norm, softcap=softcap,
        alibi_slopes=alibi_slopes, precision="exact", backend="reference", return_lse=return_lse,
        dropout_p=dropout_p, dropout_seed=dropout_seed,
    )
    out, lse = run(spec, call, dtype)
    return (out, lse) if return_lse else out


def hstu_attention(q, k, v, seq_offsets, max_seq_len, *, alpha=None, causal=True, num_targets=None,
                   contextual_seq_len=0, max_attn_len=0, rab=None, timestamps=None, silu_norm=None,
                   dtype=torch.float64):
    """Reference of :func:`omniattn.hstu_attention` (jagged (T, H, D) layout)."""
    spec, call = _spec.hstu_call(
        q, k, v, seq_offsets, max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
        contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, rab=rab, timestamps=timestamps,
        silu_norm=silu_norm, precision="exact", backend="reference",
    )
    return run(spec, call, dtype)[0]

"""Split-KV decoding in plain PyTorch: a few queries against a (dense or paged) KV cache, any device.

The tiled backend (torch_tiled.py) is built for many query rows: its key chunks are sized for
128-row query blocks, so with one query row each chunk is a handful of tiny ops. Here, as in the
Triton decode kernel, the rows of one tile are the (query head of a GQA group) x Nq pairs of one kv
head, and each entry's visible keys are cut into P equal pieces walked side by side: every op
works on P x Hkv independent batches of ``keys_per_step`` keys (multi-threaded matmuls, Python
overhead paid once per step rather than once per piece), each piece keeps its own online
softmax state, and the pieces are merged exactly at the end (by lse for softmax, by summation for
the pointwise scores). Keys are converted to float32 (float64 for float64 inputs) one step at a
time, never for the whole cache; only a paged cache's keys are gathered, one step at a time.

The visible keys of an entry split into an unmasked middle (every query row sees it) and at most
two masked edges (causal / window edges, a few keys each for decoding): only the edges build masks.

On CPUs, a softmax middle (no softcap, no ALiBi, dense cache, Dv == D) goes to PyTorch's fused CPU
flash-attention kernel instead, which reads bf16/fp16 keys in place: converting them to float32
first (the path above) moves ~5x the cache's bytes through memory and read a 1M-token cache at
5.5-7.5 GB/s on a 16-core host (benchmarks/NOTES.md); the fused kernel reads it once. The keys are
cut into pieces handed to torch_threads' workers (one intra-op thread each: a decode step has only
batch x kv heads of parallel work otherwise) and the pieces merge by lse like any split.

Non-finite inputs follow DESIGN.md's rule (NaN exactly where the maths touches a NaN/Inf), which
the plain computation does not: an Inf key whose score is -inf, or an Inf value behind a masked
key, would vanish or spread. Checking every key for finiteness would double a memory-bound step's
reads, so each entry is computed as usual while noticing, almost for free, whether anything
non-finite took part: the query rows are checked (a few values), the float32 path sums its score
tiles and accumulators, and the fused kernel gets one all-zero query row per kv head, whose
scores are 0 for finite keys and NaN for any key holding a NaN/Inf, and whose output, the mean of
the values, is non-finite if any value is. A noticed entry is computed again on the float32 path
with non-finite inputs zeroed and NaN written where the rule says (a finite overflow noticed by
mistake only costs that second pass).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import torch_sdpa, torch_threads

STEP_ELEMS = 1 << 21  # keys x kv heads x head dim converted per step (8 MiB in float32)
SCORE_ELEMS = 1 << 22  # score-tile elements per step (many query rows)
MAX_PIECES = 16
MIN_PIECE = 1024  # keys per piece before a segment is cut into several pieces
FUSED_MIN_KEYS = 1024  # a shorter unmasked middle runs the float32 path: too little to split
FUSED_PIECES_PER_WORKER = 4  # pieces per worker thread: uneven piece times even out


class _Entry:
    """One batch entry's query tile and per-row constants."""

    def __init__(self, spec, call, b: int, cdtype, exact: bool = False):
        q = call.q[b]  # (Nq, Hq, D)
        nq, hq, d = q.shape
        self.hkv = call.k.shape[2]
        self.g = hq // self.hkv
        self.nq = nq
        self.rows = self.g * nq  # row r = g * Nq + i
        self.qt = (q.view(nq, self.hkv, self.g, d).permute(1, 2, 0, 3).reshape(self.hkv, self.rows, d)
                   .to(cdtype) * spec.scale)
        # exact: DESIGN.md's non-finite rule, with non-finite query rows zeroed and remembered
        self.exact = exact
        self.q_bad = None
        if exact:
            finite = torch.isfinite(self.qt)
            self.q_bad = ~finite.all(-1).view(1, self.hkv, self.rows, 1)
            self.qt = self.qt.masked_fill(~finite, 0.0)
        self.length = call.lens[b]
        shift = self.length - nq
        dev = q.device
        self.q_pos = (torch.arange(self.rows, device=dev) % nq + shift).view(1, 1, -1, 1)  # (1, 1, R, 1)
        self.slope = None
        if call.alibi is not None:  # (Hq,) -> (1, Hkv, R, 1) in row order
            self.slope = call.alibi[b].to(cdtype).view(self.hkv, self.g, 1).expand(self.hkv, self.g, nq)
            self.slope = self.slope.reshape(1, self.hkv, self.rows, 1)
        self.sig_bias = spec.sigmoid_bias if spec.sigmoid_bias is not None else -math.log(max(self.length, 1))
        self.silu_scale = 1.0 / spec.silu_norm if spec.silu_norm else 1.0


def _segments(spec, length: int, nq: int) -> list[tuple[int, int, bool]]:
    """[(start, end, masked)]: the keys some row sees, cut into masked edges and the unmasked middle."""
    left, right = spec.window
    shift = length - nq
    lo = max(shift - left, 0) if left >= 0 else 0
    hi = min(nq - 1 + shift + right + 1, length) if right >= 0 else length
    if hi <= lo:
        return []
    full_lo = max(nq - 1 + shift - left, lo) if left >= 0 else lo
    full_hi = min(shift + right + 1, hi) if right >= 0 else hi
    if full_hi <= full_lo:
        return [(lo, hi, True)]
    segs = [(lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)]
    return [s for s in segs if s[1] > s[0]]


def _keys(call, b: int, start: int, pieces: int, piece_len: int, j0: int, j1: int, cdtype):
    """K and V of keys start + p * piece_len + [j0, j1) for each piece p, as (P, Hkv, n, D) in cdtype."""
    dense = call.contiguous_keys(b, start, start + pieces * piece_len)
    if dense is not None:
        k, v = (t.view(pieces, piece_len, *t.shape[1:])[:, j0:j1] for t in dense)
    else:
        pos = (start + torch.arange(pieces, device=call.q.device).view(-1, 1) * piece_len
               + torch.arange(j0, j1, device=call.q.device).view(1, -1))
        k, v = call.keys(b, pos)
    kt = torch.empty(pieces, k.shape[2], j1 - j0, k.shape[3], dtype=cdtype, device=k.device)
    vt = torch.empty(pieces, v.shape[2], j1 - j0, v.shape[3], dtype=cdtype, device=v.device)
    kt.copy_(k.transpose(1, 2))  # one pass: convert and lay each kv head's keys out contiguously
    vt.copy_(v.transpose(1, 2))
    return kt, vt


class _Probe:
    """A running sum of what an entry's computation produced: non-finite if anything non-finite
    took part (or, harmlessly, if a sum overflowed)."""

    def __init__(self):
        self.total = 0.0

    def add(self, t: torch.Tensor) -> None:
        self.total = self.total + t.sum()


def _noticed(probes: list, device) -> list[int]:
    """Indices of the probes that saw something non-finite."""
    if not probes:
        return []
    totals = torch.stack([torch.as_tensor(p.total, dtype=torch.float64, device=device) for p in probes])
    return torch.nonzero(~torch.isfinite(totals)).flatten().tolist()


def _segment(spec, call, e: _Entry, b: int, start: int, length: int, masked: bool, cdtype, probe: _Probe):
    """Partial states of keys [start, start + length): (acc (P, Hkv, R, Dv), row max, row sum).
    With ``e.exact``, NaN where DESIGN.md's non-finite rule says; else the probe sees the scores
    and the accumulators."""
    softmax = spec.score == "softmax"
    d, dv = call.k.shape[3], call.v.shape[3]
    keys_per_step = max(16, min(STEP_ELEMS // (e.hkv * d), SCORE_ELEMS // (e.hkv * e.rows)))
    pieces = max(1, min(MAX_PIECES, length // MIN_PIECE, keys_per_step // 16))
    piece_len = length // pieces
    step = max(1, keys_per_step // pieces)
    dev = e.qt.device
    acc = torch.zeros(pieces, e.hkv, e.rows, dv, dtype=cdtype, device=dev)
    mx = torch.full((pieces, e.hkv, e.rows, 1), -math.inf, dtype=cdtype, device=dev) if softmax else None
    lsum = torch.zeros(pieces, e.hkv, e.rows, 1, dtype=cdtype, device=dev) if softmax else None
    left, right = spec.window
    piece_start = start + torch.arange(pieces, device=dev).view(-1, 1, 1, 1) * piece_len
    row_bad = chan_bad = None
    if e.exact:
        row_bad = torch.zeros(pieces, e.hkv, e.rows, 1, dtype=torch.bool, device=dev)
        chan_bad = torch.zeros(pieces, e.hkv, e.rows, dv, dtype=torch.bool, device=dev)
    for j0 in range(0, piece_len, step):
        j1 = min(j0 + step, piece_len)
        kt, vt = _keys(call, b, start, pieces, piece_len, j0, j1, cdtype)
        if e.exact:  # computed from zeroed inputs; which keys and values were not finite is kept
            k_fin, v_bad = torch.isfinite(kt), ~torch.isfinite(vt)
            k_bad = ~k_fin.all(-1).unsqueeze(-2)  # (P, Hkv, 1, n)
            kt, vt = kt.masked_fill_(~k_fin, 0.0), vt.masked_fill_(v_bad, 0.0)
        s = torch.matmul(e.qt, kt.transpose(-1, -2))  # (P, Hkv, R, n)
        if not e.exact:
            probe.add(s)
        k_pos = None
        if masked or e.slope is not None:
            k_pos = piece_start + torch.arange(j0, j1, device=dev).view(1, 1, 1, -1)  # (P, 1, 1, n)
        if spec.softcap > 0:
            s = s.div_(spec.softcap).tanh_().mul_(spec.softcap)
        if e.slope is not None:
            s = s.sub_(e.slope * (e.q_pos - k_pos).abs().to(cdtype))
        ok = None
        if masked:
            ok = torch.ones(1, 1, e.rows, j1 - j0, dtype=torch.bool, device=dev)
            if left >= 0:
                ok = ok & (k_pos >= e.q_pos - left)
            if right >= 0:
                ok = ok & (k_pos <= e.q_pos + right)
        if e.exact:  # a bad score: an allowed pair with a non-finite query row or key
            allowed = ok if ok is not None else torch.ones(1, 1, e.rows, j1 - j0, dtype=torch.bool, device=dev)
            row_bad |= (allowed & (k_bad | e.q_bad)).any(-1, keepdim=True)
            chan_bad |= torch.matmul(allowed.to(cdtype), v_bad.to(cdtype)) > 0  # an allowed key's bad value
        if softmax:
            if ok is not None:
                s = s.masked_fill_(~ok, -math.inf)
            m_new = torch.maximum(mx, s.amax(-1, keepdim=True))
            # rows with nothing allowed yet keep max -inf; subtract 0 so exp gives 0, not NaN
            m_use = m_new.masked_fill(m_new == -math.inf, 0.0) if ok is not None else m_new
            p = s.sub_(m_use).exp_()
            alpha = (mx - m_use).exp_()
            lsum.mul_(alpha).add_(p.sum(-1, keepdim=True))
            acc.mul_(alpha)
            mx = m_new
        elif spec.score == "sigmoid":
            p = s.add_(e.sig_bias).sigmoid_()
        else:
            p = F.silu(s, inplace=True).mul_(e.silu_scale)
        if ok is not None and not softmax:
            p = p.masked_fill_(~ok, 0.0)
        acc.add_(torch.matmul(p, vt))
    if e.exact:  # NaN propagates through the merge: a bad row's max (softmax) or accumulator
        acc.masked_fill_(chan_bad | row_bad, math.nan)
        if softmax:
            mx.masked_fill_(row_bad, math.nan)
    else:
        probe.add(acc)
    states = [(acc, mx, lsum)]
    rest = length - pieces * piece_len
    if rest:
        states += _segment(spec, call, e, b, start + pieces * piece_len, rest, masked, cdtype, probe)
    return states


def _fused_ok(spec, call, masked: bool, length: int) -> bool:
    q = call.q
    return (not masked and length >= FUSED_MIN_KEYS and spec.score == "softmax" and spec.softcap == 0
            and call.alibi is None and not call.paged and q.device.type == "cpu"
            and q.dtype in (torch.bfloat16, torch.float16, torch.float32) and call.k.shape[3] == call.v.shape[3]
            and torch_sdpa.channels_contiguous(q, call.k, call.v))


def _fused_segment(spec, call, b: int, start: int, length: int, cdtype, probe: _Probe):
    """Partial states of the unmasked keys [start, start + length) by the fused CPU kernel: each
    piece's (normalised out, lse) is a state with row max lse and row sum 1 (see _merge). One more
    query row of zeros per kv head goes along for the probe (module docstring)."""
    nq, hq, d = call.q.shape[1:]
    hkv = call.k.shape[2]
    g = hq // hkv
    rows = g * nq
    # rows of one kv head: (query head of the group, query) pairs, ordered as _Entry's rows
    q = call.q[b].view(nq, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, rows, d)
    q = torch.cat([q, q.new_zeros(1, hkv, 1, d)], dim=2)
    k, v = call.contiguous_keys(b, start, start + length)
    workers = torch_threads.workers_for(q.device, length // FUSED_MIN_KEYS)
    pieces = max(1, min(length // FUSED_MIN_KEYS, FUSED_PIECES_PER_WORKER * workers))
    bounds = [(length * p // pieces, length * (p + 1) // pieces) for p in range(pieces)]
    done: list = [None] * pieces  # by piece, so the merge adds them in one order every run

    def piece(_, item) -> None:
        p, (j0, j1) = item
        # (n, Hkv, D) -> (1, Hkv, n, D): a strided view, read in place
        done[p] = torch_sdpa.FORWARD(q, k[j0:j1].transpose(0, 1).unsqueeze(0),
                                     v[j0:j1].transpose(0, 1).unsqueeze(0), scale=spec.scale)

    torch_threads.run(piece, enumerate(bounds), threads=workers)
    acc = torch.cat([o for o, _ in done]).to(cdtype)
    mx = torch.cat([lse for _, lse in done]).to(cdtype).unsqueeze(-1)
    probe.add(acc[:, :, rows:])
    probe.add(mx[:, :, rows:])
    acc, mx = acc[:, :, :rows], mx[:, :, :rows]
    return [(acc, mx, torch.ones_like(mx))]


def _merge(states, softmax: bool):
    """Exact merge of partial states over their first dim -> (out (Hkv, R, Dv), lse (Hkv, R) or None)."""
    acc = torch.cat([s[0] for s in states])
    if not softmax:
        return acc.sum(0), None
    mx = torch.cat([s[1] for s in states])
    lsum = torch.cat([s[2] for s in states])
    m = mx.amax(0)
    m_safe = m.masked_fill(m == -math.inf, 0.0)
    w = (mx - m_safe).exp()
    total = (w * lsum).sum(0)
    empty = total == 0  # `== 0`, not `<= 0`: a NaN (a NaN key) stays NaN
    out = (w * acc).sum(0) / total.masked_fill(empty, 1.0)
    out = out.masked_fill(empty, 0.0)
    lse = (m_safe + total.log()).masked_fill(empty, -math.inf)
    return out, lse.squeeze(-1)


def _entry_states(spec, call, e: _Entry, b: int, nq: int, cdtype, probe: _Probe) -> list:
    """One entry's partial states; unless ``e.exact``, the probe sees what took part."""
    if not e.exact:
        probe.add(e.qt)
    states = []
    for start, end, masked in _segments(spec, e.length, nq):
        if not e.exact and _fused_ok(spec, call, masked, end - start):
            states += _fused_segment(spec, call, b, start, end - start, cdtype, probe)
        else:
            states += _segment(spec, call, e, b, start, end - start, masked, cdtype, probe)
    return states


def attention(spec, call, out_dtype: Optional[torch.dtype] = None):
    """out (B, Nq, Hq, Dv) in ``out_dtype`` (default q's) and, for softmax, lse (B, Hq, Nq) float32."""
    q = call.q
    bsz, nq, hq, _ = q.shape
    hkv, dv = call.k.shape[2], call.v.shape[3]
    softmax = spec.score == "softmax"
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(bsz, nq, hq, dv, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q.device) if softmax else None

    def entry(b: int, exact: bool, probe: _Probe) -> None:
        e = _Entry(spec, call, b, cdtype, exact)
        states = _entry_states(spec, call, e, b, nq, cdtype, probe)
        if states:
            o, l_b = _merge(states, softmax)
        else:  # no visible key: 0, lse -inf
            o = torch.zeros(hkv, e.rows, dv, dtype=cdtype, device=q.device)
            l_b = torch.full((hkv, e.rows), -math.inf, dtype=cdtype, device=q.device)
        out[b] = o.view(hkv, hq // hkv, nq, dv).permute(2, 0, 1, 3).reshape(nq, hq, dv)
        if softmax:
            lse[b] = l_b.reshape(hq, nq)

    probes = [_Probe() for _ in range(bsz)]
    for b in range(bsz):
        entry(b, False, probes[b])
    # one look at the probes for the whole call (a device sync on GPUs): the entries where
    # something non-finite took part go again, by DESIGN.md's rule
    for b in _noticed(probes, q.device):
        entry(b, True, _Probe())
    return out, lse

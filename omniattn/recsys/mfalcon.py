"""M-FALCON inference (HSTU paper, section 3.4): score m candidates per user in micro-batches of
c against the user's history, computed once and cached per layer.

Candidates are HSTU *targets*: they attend to the history and to themselves, never to each other,
share one position (right after the history) and the request time. Two ways to compute them:

- ``use_kv_cache=True`` (default): the history runs through the model once, leaving each layer's
  K and V (padded to (B, L, H, D)) and the bias every candidate gives each history key. That bias
  depends on the key only: a candidate sits at position L and its "next timestamp" is the request
  time, so ``rab(cand, j) = pos_w[M - 1 + j - L] + ts_w[bucket(t_request - t_j)]``. A micro-batch
  then costs O(c * L): its queries attend to the cached keys (``attention(score="silu")`` with the
  bias as a float mask, -inf past each history) plus one term for the candidate's own key
  (``rab(cand, cand) = pos_w[M - 1] + ts_w[0]``), summed: SiLU attention has no normaliser to merge.
- ``use_kv_cache=False``: every micro-batch re-runs ``hstu_attention`` over history + candidates
  as targets (O((L + c)^2) per micro-batch); the same numbers, kept as the baseline the benchmark
  (``omniattn.bench.mfalcon``) compares with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..api import attention, hstu_attention
from ..hstu.relative_bias import bucketize
from .data import make_batch
from .models import HSTU


def _interleave(lens: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order that turns [all history rows; all candidate rows] into per-user [history_b; candidates_b],
    and the positions of the candidate rows in that order."""
    hist_start = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]])
    total_hist = int(lens.sum())
    order, cand_rows, at = [], [], 0
    for b, n in enumerate(lens.tolist()):
        order.append(torch.arange(hist_start[b], hist_start[b] + n))
        order.append(total_hist + b * c + torch.arange(c))
        cand_rows.append(at + n + torch.arange(c))
        at += n + c
    return torch.cat(order), torch.cat(cand_rows)


def _padded_rows(lens: torch.Tensor, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) row of each padded slot in the jagged history (clamped) and whether it holds one."""
    starts = torch.cumsum(lens, 0) - lens
    j = torch.arange(width, device=device)
    valid = j[None, :] < lens[:, None]
    return (starts[:, None] + j[None, :]).clamp(max=max(int(lens.sum()) - 1, 0)), valid


def _candidate_bias(rab, lens: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, hist_times: torch.Tensor,
                    request_times: torch.Tensor):
    """(B, Hr, 1, width): the bias a candidate adds to each history key's score (-inf past the
    history), and (Hr,) the bias of its own key; float32 at least. Hr: the bias's heads (1 when shared)."""
    dtype = torch.promote_types(rab.pos_w.dtype, torch.float32)
    pos_w = rab.pos_w.to(dtype).reshape(-1, rab.pos_w.shape[-1])
    ts_w = rab.ts_w.to(dtype).reshape(-1, rab.ts_w.shape[-1])
    center = rab.max_seq_len - 1
    j = torch.arange(rows.shape[1], device=rows.device)
    rel = (center + j[None, :] - lens[:, None]).clamp(min=0)  # (B, width); padded slots are masked below
    bucket = bucketize(request_times[:, None] - hist_times[rows], rab.num_buckets, rab.bucketization)
    bias = pos_w[:, rel] + ts_w[:, bucket]  # (Hr, B, width)
    bias = torch.where(valid, bias, -math.inf).transpose(0, 1).unsqueeze(2)
    return bias, pos_w[:, center] + ts_w[:, 0]


@torch.no_grad()
def candidate_representations(model: HSTU, histories: list, history_times: list, candidates: torch.Tensor,
                              request_times: torch.Tensor, micro_batch: int = 32,
                              use_kv_cache: bool = True) -> torch.Tensor:
    """(B, m, dim) unit vectors, one per candidate, from HSTU's output at the candidate's token.

    ``histories``/``history_times``: per-user item ids and timestamps (kept to the last
    max_seq_len - 1 with the KV cache, max_seq_len - micro_batch without); ``candidates`` (B, m)
    item ids; ``request_times`` (B,).
    """
    if not isinstance(model, HSTU):
        raise TypeError(f"model: M-FALCON needs an HSTU model, got {type(model).__name__}")
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch: expected an int >= 1, got {micro_batch!r}")
    if candidates.dim() != 2 or candidates.shape[0] != len(histories):
        raise ValueError(f"candidates: expected (B, m) item ids with B = {len(histories)}, got {tuple(candidates.shape)}")
    model.eval()
    device = model.item_emb.weight.device
    b, m = candidates.shape
    if b == 0 or m == 0:  # nothing to score
        return torch.empty(b, m, model.dim, device=device, dtype=model.item_emb.weight.dtype)
    c = min(micro_batch, m)
    keep = model.max_seq_len - (1 if use_kv_cache else c)
    if keep < 1:
        raise ValueError(f"micro_batch: {micro_batch} leaves no room for a history in max_seq_len={model.max_seq_len}")
    histories = [h[-keep:] for h in histories]
    history_times = [t[-keep:] for t in history_times]
    lens = torch.tensor([len(h) for h in histories])
    request_times = request_times.to(torch.int64).to(device)

    # 1) the history, once: one placeholder target per user makes the last history token's
    #    "next timestamp" the request time, exactly as when candidates follow it
    seqs = [torch.cat([h, torch.zeros(1, dtype=torch.long)]) for h in histories]
    times = [torch.cat([t, request_times[i:i + 1].cpu()]) for i, t in enumerate(history_times)]
    batch = make_batch(seqs, times).to(device)
    hist_rows = torch.cat([torch.arange(s, s + n) for s, n in zip(batch.offsets[:-1].tolist(), lens.tolist())]).to(device)
    hist_times = batch.times[hist_rows]
    ones = torch.ones(b, dtype=torch.long, device=device)
    if use_kv_cache:
        pad_rows, pad_ok = _padded_rows(lens.to(device), int(lens.max()), device)
    cache = []
    x = model.embed(batch)
    for layer in model.layers:
        u, v, q, k = layer.project(x)
        if use_kv_cache:
            bias = None if layer.rab is None else _candidate_bias(layer.rab, lens.to(device), pad_rows, pad_ok,
                                                                   hist_times, request_times)
            keep = pad_ok[:, :, None, None]
            cache.append((torch.where(keep, k[hist_rows][pad_rows], 0), torch.where(keep, v[hist_rows][pad_rows], 0), bias))
        else:
            cache.append((q[hist_rows], k[hist_rows], v[hist_rows]))
        attn = hstu_attention(q, k, v, batch.offsets, layer.max_seq_len, num_targets=ones, rab=layer.rab,
                              timestamps=batch.times if layer.rab is not None else None, backend=layer.backend)
        x = layer.finish(x, u, attn)

    # 2) candidates, a micro-batch at a time, against the cached history
    out = torch.empty(b, m, model.dim, device=device, dtype=model.item_emb.weight.dtype)
    positions = lens.to(device).repeat_interleave(c)  # every candidate sits where the next item would
    step = _cached_step if use_kv_cache else _targets_step(lens, c, hist_times, request_times, device)
    for start in range(0, m, c):
        chunk = candidates[:, start:start + c]
        width = chunk.shape[1]
        if width < c:  # pad the last micro-batch; padded candidates never influence the others
            chunk = torch.cat([chunk, chunk[:, :1].expand(b, c - width)], 1)
        items = chunk.reshape(-1).to(device)
        xc = model.dropout(model.item_emb(items) * model.dim**0.5 + model.pos_emb(positions))
        for layer, entry in zip(model.layers, cache):
            u, v, q, k = layer.project(xc)
            xc = layer.finish(xc, u, step(layer, entry, q, k, v, b, c))
        reps = F.normalize(model.norm(xc), dim=-1).view(b, c, -1)
        out[:, start:start + width] = reps[:, :width]
    return out


def _cached_step(layer, entry, q, k, v, b: int, c: int) -> torch.Tensor:
    """Candidates (B*c, H, D) of one layer against the cached history: O(c * L)."""
    hk, hv, bias = entry
    h, dqk = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(dqk)
    mask, own = bias if bias is not None else (None, None)
    acc = torch.promote_types(v.dtype, torch.float32)
    if hk.shape[1] == 0:  # no user has a history: only the own key remains
        cross = torch.zeros_like(v, dtype=acc)
    else:
        cross = attention(q.view(b, c, h, dqk), hk, hv, score="silu", scale=scale, silu_norm=float(layer.max_seq_len),
                          attn_mask=mask, backend=layer.backend).reshape(b * c, h, -1).to(acc)
    s = scale * (q.to(acc) * k.to(acc)).sum(-1)  # (B*c, H): each candidate's score for its own key
    if own is not None:
        s = s + own
    return (cross + (F.silu(s) / layer.max_seq_len).unsqueeze(-1) * v.to(acc)).to(v.dtype)


def _targets_step(lens, c: int, hist_times, request_times, device):
    """The baseline step: history + candidates as targets through ``hstu_attention``."""
    order, cand_rows = (t.to(device) for t in _interleave(lens, c))
    offsets = torch.zeros(len(lens) + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(lens.to(device) + c, 0)
    targets = torch.full((len(lens),), c, dtype=torch.long, device=device)
    times = torch.cat([hist_times, request_times.repeat_interleave(c)])[order]

    def step(layer, entry, q, k, v, b, c_):
        hq, hk, hv = entry
        attn = hstu_attention(torch.cat([hq, q])[order], torch.cat([hk, k])[order], torch.cat([hv, v])[order],
                              offsets, layer.max_seq_len, num_targets=targets, rab=layer.rab,
                              timestamps=times if layer.rab is not None else None, backend=layer.backend)
        return attn[cand_rows]

    return step


def score_candidates(model: HSTU, histories, history_times, candidates, request_times, micro_batch: int = 32,
                     use_kv_cache: bool = True):
    """(B, m) scores: each candidate's representation against its own item vector."""
    reps = candidate_representations(model, histories, history_times, candidates, request_times, micro_batch,
                                     use_kv_cache)
    return (reps * model.item_vectors(candidates.to(reps.device))).sum(-1)

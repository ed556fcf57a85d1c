"""M-FALCON inference (HSTU paper, section 3.4): score m candidates per user in micro-batches of
c against the user's history, computed once and cached per layer.

Each micro-batch appends c candidates to every history as HSTU *targets*: they attend to the
history and to themselves, never to each other, and share one position and the request time, so a
candidate's representation is the same whatever else is in its micro-batch (tested against
scoring each candidate alone). The history's per-layer Q, K, V are computed once; each micro-batch
projects only its candidates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import hstu_attention
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


@torch.no_grad()
def candidate_representations(model: HSTU, histories: list, history_times: list, candidates: torch.Tensor,
                              request_times: torch.Tensor, micro_batch: int = 32) -> torch.Tensor:
    """(B, m, dim) unit vectors, one per candidate, from HSTU's output at the candidate's token.

    ``histories``/``history_times``: per-user item ids and timestamps (kept to the last
    max_seq_len - micro_batch); ``candidates`` (B, m) item ids; ``request_times`` (B,).
    """
    if not isinstance(model, HSTU):
        raise TypeError(f"model: M-FALCON needs an HSTU model, got {type(model).__name__}")
    model.eval()
    device = model.item_emb.weight.device
    b, m = candidates.shape
    c = min(micro_batch, m)
    if c < 1:
        raise ValueError(f"micro_batch: expected >= 1, got {micro_batch}")
    keep = model.max_seq_len - c
    histories = [h[-keep:] for h in histories]
    history_times = [t[-keep:] for t in history_times]
    lens = torch.tensor([len(h) for h in histories])
    request_times = request_times.to(torch.int64)

    # 1) the history, once: one placeholder target per user makes the last history token's
    #    "next timestamp" the request time, exactly as when candidates follow it
    seqs = [torch.cat([h, torch.zeros(1, dtype=torch.long)]) for h in histories]
    times = [torch.cat([t, request_times[i:i + 1]]) for i, t in enumerate(history_times)]
    batch = make_batch(seqs, times).to(device)
    hist_rows = torch.cat([torch.arange(s, s + n) for s, n in zip(batch.offsets[:-1].tolist(), lens.tolist())]).to(device)
    ones = torch.ones(b, dtype=torch.long, device=device)
    cache = []
    x = model.embed(batch)
    for layer in model.layers:
        u, v, q, k = layer.project(x)
        cache.append((q[hist_rows], k[hist_rows], v[hist_rows]))
        attn = hstu_attention(q, k, v, batch.offsets, layer.max_seq_len, num_targets=ones, rab=layer.rab,
                              timestamps=batch.times if layer.rab is not None else None, backend=layer.backend)
        x = layer.finish(x, u, attn)
    hist_times = batch.times[hist_rows]

    # 2) candidates, a micro-batch at a time, against the cached history
    out = torch.empty(b, m, model.dim, device=device, dtype=model.item_emb.weight.dtype)
    order, cand_rows = (t.to(device) for t in _interleave(lens, c))
    offsets = torch.zeros(b + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(lens.to(device) + c, 0)
    targets = torch.full((b,), c, dtype=torch.long, device=device)
    positions = lens.to(device).repeat_interleave(c)  # every candidate sits where the next item would
    times = torch.cat([hist_times, request_times.to(device).repeat_interleave(c)])[order]
    for start in range(0, m, c):
        chunk = candidates[:, start:start + c]
        width = chunk.shape[1]
        if width < c:  # pad the last micro-batch; padded candidates never influence the others
            chunk = torch.cat([chunk, chunk[:, :1].expand(b, c - width)], 1)
        items = chunk.reshape(-1).to(device)
        xc = model.dropout(model.item_emb(items) * model.dim**0.5 + model.pos_emb(positions))
        for layer, (hq, hk, hv) in zip(model.layers, cache):
            u, v, q, k = layer.project(xc)
            attn = hstu_attention(torch.cat([hq, q])[order], torch.cat([hk, k])[order], torch.cat([hv, v])[order],
                                  offsets, layer.max_seq_len, num_targets=targets, rab=layer.rab,
                                  timestamps=times if layer.rab is not None else None, backend=layer.backend)
            xc = layer.finish(xc, u, attn[cand_rows])
        reps = F.normalize(model.norm(xc), dim=-1).view(b, c, -1)
        out[:, start:start + width] = reps[:, :width]
    return out


def score_candidates(model: HSTU, histories, history_times, candidates, request_times, micro_batch: int = 32):
    """(B, m) scores: each candidate's representation against its own item vector."""
    reps = candidate_representations(model, histories, history_times, candidates, request_times, micro_batch)
    return (reps * model.item_vectors(candidates.to(reps.device))).sum(-1)

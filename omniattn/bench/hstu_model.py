"""HSTU at the model level, on a GPU: what a recommender engineer feels.

- ``mfalcon`` rows: candidates scored per second by a 4-layer HSTU model (bf16, dim 512, 4 heads of
  128, relative bias) for B users with L history items and m candidates each: M-FALCON with the KV
  cache (``use_kv_cache=True``), the same micro-batches re-running history + candidates as targets
  (``use_kv_cache=False``), and one forward per candidate (history + that candidate), the way a
  model without M-FALCON scores. The per-candidate rate is measured on the first candidates only
  (it is a rate; scoring all of them one forward each would take minutes).
- ``hstu-layer-step`` rows: one ``omniattn.nn.HSTULayer`` training step (forward, backward, AdamW)
  at B=32, N=4096 jagged (lengths in [0.9N, N]), H=4, D=128, bf16, with and without the relative
  bias, and the share of it that ``hstu_attention``'s forward+backward takes on the same inputs.

    python3 -m omniattn.bench.hstu_model --json hstu_model.json
"""

from __future__ import annotations

import argparse

import torch

from .measure import device_name, wall_seconds
from .report import write_json

DIM, HEADS, HEAD_DIM, LAYERS = 512, 4, 128, 4


def _seconds(fn, reps: int = 3) -> float:
    """Median wall-clock seconds of ``fn``, after one warm-up call."""
    fn()
    return wall_seconds(fn, reps)[0]


def _histories(users: int, length: int, num_items: int, gen: torch.Generator):
    hist = [torch.randint(1, num_items + 1, (length,), generator=gen) for _ in range(users)]
    times = [torch.sort(torch.randint(0, 10**8, (length,), generator=gen)).values for _ in range(users)]
    request = torch.stack([t[-1] + 3600 for t in times])
    return hist, times, request


def mfalcon_rows(users: int = 64, history: int = 1024, candidates: int = 1024, per_candidate: int = 16,
                 dev: torch.device = torch.device("cuda"), dim: int = DIM, heads: int = HEADS,
                 micro_batches: tuple = (128,)) -> list[dict]:
    from ..recsys import HSTU
    from ..recsys.data import make_batch
    from ..recsys.mfalcon import candidate_representations

    gen = torch.Generator().manual_seed(0)
    num_items = 100_000
    model = HSTU(num_items, dim=dim, num_blocks=LAYERS, num_heads=heads, max_seq_len=history + candidates,
                 dropout=0.0).to(dev, torch.bfloat16).eval()
    for layer in model.layers:
        layer.rab.float()  # the bias's weights stay float32 (as in training)
    hist, times, request = _histories(users, history, num_items, gen)
    cands = torch.randint(1, num_items + 1, (users, candidates), generator=gen)
    base = {"op": "mfalcon", "mode": "fwd", "dtype": "bf16", "batch": users, "seqlen": history, "heads": heads,
            "head_dim": dim // heads, "causal": True, "layers": LAYERS, "dim": dim, "candidates": candidates,
            "rab": True, "tflops": None}
    rows = []
    ref = candidate_representations(model, hist, times, cands, request, micro_batch=candidates)
    for cache in (True, False):
        for c in (*micro_batches, candidates):
            run = lambda: candidate_representations(model, hist, times, cands, request, micro_batch=c,
                                                    use_kv_cache=cache)
            s = _seconds(run)
            err = float((run().float() - ref.float()).abs().max())
            rows.append({**base, "impl": "omniattn", "method": "kv-cache" if cache else "targets", "micro_batch": c,
                         "ms": round(s * 1e3, 3), "cand_per_s": round(users * candidates / s, 1),
                         "max_err": float(f"{err:.3g}")})

    def one_each():  # one forward of history + candidate per candidate (all users batched)
        out = []
        for j in range(per_candidate):
            batch = make_batch([torch.cat([h, cands[i, j:j + 1]]) for i, h in enumerate(hist)],
                               [torch.cat([t, request[i:i + 1]]) for i, t in enumerate(times)]).to(dev)
            with torch.no_grad():
                enc = model.encode(batch, num_targets=torch.ones(users, dtype=torch.long, device=dev))
            out.append(enc[batch.offsets[1:] - 1])
        return torch.stack(out, 1)

    s = _seconds(one_each, reps=1)
    err = float((one_each().float() - ref[:, :per_candidate].float()).abs().max())
    rows.append({**base, "impl": "omniattn", "method": "per-candidate", "micro_batch": 1, "candidates_timed": per_candidate,
                 "ms": round(s * 1e3 * candidates / per_candidate, 3),
                 "cand_per_s": round(users * per_candidate / s, 1), "max_err": float(f"{err:.3g}")})
    return rows


def layer_step_rows(batch: int = 32, n: int = 4096, dev: torch.device = torch.device("cuda"), dim: int = DIM,
                    heads: int = HEADS, head_dim: int = HEAD_DIM) -> list[dict]:
    from ..api import hstu_attention
    from ..nn import HSTULayer

    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(int(0.9 * n), n + 1, (batch,), generator=gen)
    offsets = torch.zeros(batch + 1, dtype=torch.long)
    offsets[1:] = lens.cumsum(0)
    total = int(offsets[-1])
    times = torch.cat([torch.sort(torch.randint(0, 10**8, (int(m),), generator=gen)).values for m in lens])
    offsets, times = offsets.to(dev), times.to(dev)
    flops_attn = sum(2 * 2 * heads * head_dim * int(m) * (int(m) + 1) / 2 for m in lens) * 3.5
    rows = []
    for rab in (False, True):
        torch.manual_seed(0)
        layer = HSTULayer(dim, heads, attention_dim=head_dim, linear_dim=head_dim, max_seq_len=n,
                          relative_bias=rab).to(dev, torch.bfloat16)
        if rab:
            layer.rab.float()  # float32 bias weights, as generative-recommenders trains them
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)
        x = torch.randn(total, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)

        def train_step():
            opt.zero_grad(set_to_none=True)
            y = layer(x, offsets, timestamps=times)
            y.float().square().mean().backward()
            opt.step()

        q, k, v = (torch.randn(total, heads, head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(v)

        def attention_only():
            out = hstu_attention(q, k, v, offsets, n, rab=layer.rab, timestamps=times if rab else None)
            out.backward(dout)

        step_s = _seconds(train_step, reps=5)
        attn_s = _seconds(attention_only, reps=5)
        rows.append({"op": "hstu-layer-step", "impl": "omniattn", "mode": "fwdbwd", "dtype": "bf16", "batch": batch,
                     "seqlen": n, "heads": heads, "head_dim": head_dim, "causal": True, "rab": rab, "dim": dim,
                     "ms": round(step_s * 1e3, 3), "attention_ms": round(attn_s * 1e3, 3),
                     "attention_share": round(attn_s / step_s, 3),
                     "tflops": round(flops_attn / attn_s / 1e12, 1), "max_err": None})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write DESIGN.md's results format here")
    parser.add_argument("--skip-mfalcon", action="store_true")
    parser.add_argument("--skip-layer", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    if not args.skip_mfalcon:
        rows += mfalcon_rows()
    if not args.skip_layer:
        rows += layer_step_rows()
    for r in rows:
        print({k: r[k] for k in r if k in ("op", "method", "micro_batch", "rab", "ms", "cand_per_s", "attention_ms",
                                          "attention_share", "tflops", "max_err")})
    if args.json:
        write_json(args.json, device_name(torch.device("cuda")), rows)


if __name__ == "__main__":
    main()

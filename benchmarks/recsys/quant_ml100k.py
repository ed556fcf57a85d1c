"""HSTU on MovieLens-100K with and without quantized attention (issue 8 item 4).

Trains the run_ml100k.sh recipe (seed 0), then evaluates the weights best on validation with
exact attention and with every attention call at int8, int8-fp8, fp8 and int4-fp8: a calibration
plan over validation batches records each call site's cosine against exact attention and forces
that precision everywhere (min_cos ~ 0). On a CPU the quantized precisions are the tiled backend's
emulation (same scales and roundings as the Triton kernels, float32 arithmetic).

    python3 benchmarks/recsys/quant_ml100k.py --wheel PATH/recbole-1.2.1-py3-none-any.whl --json out.json
"""

import argparse
import json
import sys
import os

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from omniattn.quant import calibrate  # noqa: E402
from omniattn.recsys import TrainConfig, Trainer, movielens_100k  # noqa: E402
from omniattn.recsys.data import make_batch  # noqa: E402
from omniattn.recsys.train import evaluate  # noqa: E402

PRECISIONS = ("int8", "int8-fp8", "fp8", "int4-fp8")


class Encoder(nn.Module):
    """The model's encode() as its forward, so a plan's call-site count restarts per batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.max_seq_len = model.max_seq_len

    def forward(self, batch):
        return self.model.encode(batch)

    def encode(self, batch):
        return self(batch)

    def item_vectors(self, items=None):
        return self.model.item_vectors(items)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--wheel", required=True, help="recbole-1.2.1 wheel (MovieLens-100K inside)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--json")
    args = p.parse_args()
    cfg = TrainConfig(model="hstu", dim=50, blocks=2, heads=1, max_len=200, dropout=0.2, epochs=args.epochs,
                      batch_size=128, lr=1e-3, negatives=128, temperature=0.05, seed=0)
    trainer = Trainer(cfg, movielens_100k(args.wheel))
    trainer.fit(on_epoch=lambda row: print(f"epoch {row['epoch']} ndcg@10 {row['ndcg@10']:.4f}", flush=True))
    results = {"exact": trainer.test(), "best_epoch": trainer.state.best_epoch}
    enc = Encoder(trainer.model).eval()
    hist, times, _ = trainer.split.histories("valid")
    batches = [make_batch([s[-cfg.max_len:] for s in hist[i:i + 256]], [t[-cfg.max_len:] for t in times[i:i + 256]])
               for i in range(0, 512, 256)]
    for prec in PRECISIONS:
        plan = calibrate(enc, batches, candidates=(prec,), min_cos=1e-9)
        with torch.no_grad(), plan.apply(enc):
            metrics = evaluate(enc, trainer.split, "test")
        results[prec] = dict(metrics, site_cos=[rec.cos.get(prec) for rec in plan.sites],
                             precisions=plan.precisions, unavailable=[rec.unavailable.get(prec) for rec in plan.sites])
        print(prec, {k: round(v, 4) for k, v in metrics.items()}, "cos", results[prec]["site_cos"],
              "ran as", plan.precisions, [u for u in results[prec]["unavailable"] if u], flush=True)
    print("exact", {k: round(v, 4) for k, v in results["exact"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

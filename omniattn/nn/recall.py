"""A tiny trained example: associative recall with softmax and with sigmoid attention.

Each sequence is n (key, value) tokens followed by a query naming one of the keys; the model
must answer that key's value. The answer sits in another token, found by content, so only a
model whose attention learned to match keys gets above chance (1 / values). Run it as a script::

    python3 -m omniattn.nn.recall --steps 400

which trains the same 2-layer model with ``Attention(score="softmax")`` and with
``Attention.flash_sigmoid`` (sigmoid, b = -ln n, QK-norm, LayerScale) and prints both losses.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from .attention import Attention


def batch(gen: torch.Generator, size: int, pairs: int, keys: int, values: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (size, pairs + 1) and the answers (size,) in 0..values-1.

    Token ``k * values + v`` is the pair (key k, value v); keys are distinct within a sequence;
    the last token ``keys * values + k`` asks for key k's value."""
    k = torch.rand(size, keys, generator=gen).argsort(-1)[:, :pairs]
    v = torch.randint(values, (size, pairs), generator=gen)
    pick = torch.randint(pairs, (size,), generator=gen).view(-1, 1)
    query = keys * values + k.gather(1, pick)
    return torch.cat([k * values + v, query], 1), v.gather(1, pick).squeeze(1)


class RecallModel(nn.Module):
    """Embedding, ``layers`` pre-norm blocks of (Attention, MLP), a head read at the last token."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, score: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        # the same block for both: QK-norm and rotary positions; only the score function differs
        make = (lambda: Attention.flash_sigmoid(dim, heads, rope=True, layer_scale=1.0)) if score == "sigmoid" else (
            lambda: Attention(dim, heads, rope=True, qk_norm=True, layer_scale=1.0))
        self.attn = nn.ModuleList(make() for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                 for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab))  # answers are ids 0..values-1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for attn, norm, mlp in zip(self.attn, self.norms, self.mlp):
            x = x + attn(norm(x))
            x = x + mlp(x)
        return self.head(x[:, -1])


def train(score: str, steps: int = 400, seed: int = 0, pairs: int = 8, keys: int = 16, values: int = 8,
          dim: int = 64, heads: int = 4, layers: int = 2, batch_size: int = 32, lr: float = 1e-2) -> dict:
    """Train one model; returns {"loss": mean loss of the last 20 steps, "accuracy": on a fresh batch, "seconds"}."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = RecallModel(keys * values + keys, dim, heads, layers, score)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        x, y = batch(gen, batch_size, pairs, keys, values)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        x, y = batch(gen, 512, pairs, keys, values)
        acc = (model(x).argmax(-1) == y).float().mean().item()
    return {"loss": sum(losses[-20:]) / 20, "accuracy": acc, "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for score in ("softmax", "sigmoid"):
        r = train(score, steps=args.steps, seed=args.seed)
        print(f"{score:8s} loss {r['loss']:.4f}  accuracy {r['accuracy']:.3f}  ({r['seconds']:.1f} s)")


if __name__ == "__main__":
    main()

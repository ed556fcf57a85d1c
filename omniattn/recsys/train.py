"""Training and evaluation like the HSTU paper: next-item prediction at every position with a
sampled softmax (uniform negatives, temperature), optional Stochastic Length, and full-ranking
HR@K / NDCG@K on leave-one-out splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .data import Interactions, Split, make_batch
from .models import MODELS

KS = (10, 50, 200)


@dataclass
class TrainConfig:
    model: str = "hstu"
    dim: int = 50
    blocks: int = 2
    heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    negatives: int = 128
    temperature: float = 0.05
    stochastic_length: Optional[float] = None  # HSTU's alpha; None = off
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"


def build_model(cfg: TrainConfig, num_items: int):
    if cfg.model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {cfg.model!r}")
    return MODELS[cfg.model](num_items, dim=cfg.dim, num_blocks=cfg.blocks, num_heads=cfg.heads,
                             max_seq_len=cfg.max_len, dropout=cfg.dropout, backend=cfg.backend)


def stochastic_length(seq: torch.Tensor, times: torch.Tensor, max_len: int, alpha: float, gen: torch.Generator):
    """HSTU's Stochastic Length (Zhai et al. 2024, section 3.2): a history of length n longer than
    L = max_len^(alpha/2) is replaced, with probability 1 - L^2/n^2, by L of its items chosen at
    random (order kept); shorter histories are kept. Expected attention cost drops from O(n^2)
    towards O(max_len^alpha)."""
    keep = int(max_len ** (alpha / 2))
    n = seq.shape[0]
    if n <= keep or float(torch.rand(1, generator=gen)) >= 1.0 - keep**2 / n**2:
        return seq, times
    idx = torch.randperm(n, generator=gen)[:keep].sort().values
    return seq[idx], times[idx]


def ranks_of(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items (ties counted in the target's favour);
    column 0 (padding) never competes."""
    scores = scores.clone()
    scores[:, 0] = -math.inf
    target_scores = scores.gather(1, targets.view(-1, 1))
    return (scores > target_scores).sum(1)


def metrics_from_ranks(ranks: torch.Tensor, ks=KS) -> dict:
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.float().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks.float() + 2.0), 0.0).mean().item()
    return out


def popularity_metrics(split: Split, which: str = "test", ks=KS) -> dict:
    """The baseline every sequential model must beat: rank items by training frequency."""
    counts = torch.zeros(split.data.num_items + 1)
    for s in split.train:
        counts.index_add_(0, s, torch.ones(s.shape[0]))
    _, _, targets = split.histories(which)
    return metrics_from_ranks(ranks_of(counts.expand(len(targets), -1), targets), ks)


@torch.no_grad()
def evaluate(model, split: Split, which: str = "valid", batch_size: int = 256, device="cpu", ks=KS) -> dict:
    """Full ranking over every item: the representation after each user's history scores all items."""
    model.eval()
    histories, times, targets = split.histories(which)
    ranks = []
    items = model.item_vectors()
    for start in range(0, len(histories), batch_size):
        seqs = [s[-model.max_seq_len:] for s in histories[start:start + batch_size]]
        ts = [t[-model.max_seq_len:] for t in times[start:start + batch_size]]
        batch = make_batch(seqs, ts).to(device)
        user = model.encode(batch)[batch.last]
        ranks.append(ranks_of(user @ items.t(), targets[start:start + batch_size].to(device)).cpu())
    return metrics_from_ranks(torch.cat(ranks), ks)


@dataclass
class TrainState:
    epoch: int = 0
    history: list = field(default_factory=list)
    best: Optional[dict] = None
    best_epoch: int = -1


class Trainer:
    """Sampled-softmax training with per-epoch validation, best-by-NDCG@10 weights, checkpoints."""

    def __init__(self, cfg: TrainConfig, data: Interactions, dataset_spec: Optional[str] = None):
        self.cfg, self.data = cfg, data
        self.dataset_spec = dataset_spec or data.name
        self.split = Split.leave_one_out(data)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, data.num_items).to(cfg.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        self.state = TrainState()
        self.best_weights = None
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def _batches(self):
        cfg = self.cfg
        order = torch.randperm(len(self.split.train), generator=self.gen).tolist()
        usable = [u for u in order if len(self.split.train[u]) >= 2]
        for start in range(0, len(usable), cfg.batch_size):
            seqs, times = [], []
            for u in usable[start:start + cfg.batch_size]:
                s, t = self.split.train[u], self.split.train_times[u]
                if cfg.stochastic_length is not None:
                    s, t = stochastic_length(s, t, cfg.max_len + 1, cfg.stochastic_length, self.gen)
                s, t = s[-(cfg.max_len + 1):], t[-(cfg.max_len + 1):]
                seqs.append(s)
                times.append(t)
            yield seqs, times

    def train_step(self, seqs, times) -> float:
        """Inputs are every sequence but its last item; targets are every sequence but its first."""
        cfg = self.cfg
        batch = make_batch([s[:-1] for s in seqs], [t[:-1] for t in times]).to(cfg.device)
        targets = torch.cat([s[1:] for s in seqs]).to(cfg.device)
        user = self.model.encode(batch)  # (T, d), unit vectors
        negatives = torch.randint(1, self.data.num_items + 1, (cfg.negatives,), generator=self.gen).to(cfg.device)
        pos = (user * self.model.item_vectors(targets)).sum(-1, keepdim=True)
        neg = user @ self.model.item_vectors(negatives).t()
        neg = neg.masked_fill(negatives.view(1, -1) == targets.view(-1, 1), -math.inf)  # a sampled positive is no negative
        logits = torch.cat([pos, neg], 1) / cfg.temperature
        loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def fit(self, on_epoch: Optional[Callable] = None, progress: Optional[Callable] = None) -> TrainState:
        cfg = self.cfg
        while self.state.epoch < cfg.epochs:
            self.model.train()
            start, losses = time.perf_counter(), []
            n_batches = math.ceil(sum(len(s) >= 2 for s in self.split.train) / cfg.batch_size)
            for i, (seqs, times) in enumerate(self._batches()):
                losses.append(self.train_step(seqs, times))
                if progress:
                    progress(self.state.epoch, i + 1, n_batches, losses[-1])
            metrics = evaluate(self.model, self.split, "valid", device=cfg.device)
            self.state.epoch += 1
            row = dict(epoch=self.state.epoch, loss=sum(losses) / max(len(losses), 1),
                       seconds=time.perf_counter() - start, **metrics)
            self.state.history.append(row)
            if self.state.best is None or metrics["ndcg@10"] > self.state.best["ndcg@10"]:
                self.state.best, self.state.best_epoch = metrics, self.state.epoch
                self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if on_epoch:
                on_epoch(row)
        return self.state

    def test(self) -> dict:
        """Test metrics of the weights that were best on validation."""
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        return evaluate(self.model, self.split, "test", device=self.cfg.device)

    # checkpoints --------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Atomically: a crash during the save leaves the previous checkpoint at ``path`` intact."""
        save_checkpoint(path, dict(config=asdict(self.cfg), dataset=self.data.name, dataset_spec=self.dataset_spec,
                                   num_items=self.data.num_items, model=self.model.state_dict(),
                                   optimizer=self.opt.state_dict(), state=asdict(self.state),
                                   best_weights=self.best_weights, rng=self.gen.get_state()))

    def load(self, path: str) -> None:
        ckpt = load_checkpoint(path, self.cfg.device)
        if ckpt["num_items"] != self.data.num_items or ckpt["dataset"] != self.data.name:
            raise CheckpointError(f"{path}: trained on {ckpt['dataset']} ({ckpt['num_items']} items), "
                                  f"not on {self.data.name} ({self.data.num_items} items)")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as e:  # shapes of another --dim / --blocks / --heads / --max-len
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path}: does not fit this model ({first}); train with the checkpoint's "
                                  f"settings: {_settings(ckpt['config'])}") from None
        self.state = TrainState(**ckpt["state"])
        self.best_weights = ckpt["best_weights"]
        self.gen.set_state(ckpt["rng"])


def _settings(config: dict) -> str:
    keys = ("model", "dim", "blocks", "heads", "max_len")
    return " ".join(f"--{k.replace('_', '-')} {config[k]}" for k in keys if k in config)


def load_model(path: str, device="cpu"):
    """(model with its best validation weights, config, dataset spec) from a checkpoint."""
    ckpt = load_checkpoint(path, device)
    cfg = TrainConfig(**{**ckpt["config"], "device": str(device)})
    model = build_model(cfg, ckpt["num_items"]).to(device)
    model.load_state_dict(ckpt["best_weights"] or ckpt["model"])
    return model, cfg, ckpt["dataset_spec"]


# checkpoint files ---------------------------------------------------------------------------
#
# A checkpoint is one header line, then torch.save's bytes:
#     b"omniattn-checkpoint 1 sha256=<64 hex> bytes=<n>\n" + payload
# The header's SHA-256 over the payload catches truncation and flipped bytes, which torch.load
# alone may not notice (a damaged tensor payload still unpickles, into wrong optimizer state).
# Saves write a temporary file beside the target, fsync it, rename it over the target and fsync
# the folder: a process killed at any moment leaves either the old or the new checkpoint.

MAGIC = b"omniattn-checkpoint"
VERSION = 1
HEADER_LIMIT = 256  # bytes; a first line longer than this is no header of ours
KEYS = ("config", "dataset", "dataset_spec", "num_items", "model", "optimizer", "state", "best_weights", "rng")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def _header(payload: bytes) -> bytes:
    return b"%s %d sha256=%s bytes=%d\n" % (MAGIC, VERSION, hashlib.sha256(payload).hexdigest().encode(), len(payload))


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); some file systems cannot open a folder: skip."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def partial_path(path: str) -> str:
    """Where a save in progress writes (a leftover one is the remains of an interrupted save)."""
    return path + ".partial"


def save_checkpoint(path: str, ckpt: dict) -> None:
    """Write ``ckpt`` to ``path`` atomically, with a checksum; the previous file stays until the new one is complete."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    payload = buffer.getvalue()
    folder = os.path.dirname(os.path.abspath(path))
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(_header(payload))
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror})") from None


def _describe(data: bytes) -> str:
    """What a file that is no checkpoint of ours looks like, for the error message."""
    head = data[:40]
    try:
        text = head.decode("utf-8")
        if text.isprintable() or set(text) & set("\n\t"):
            return f"text starting {text.splitlines()[0][:40]!r}" if text.strip() else "blank text"
    except UnicodeDecodeError:
        pass
    return f"{len(data)} bytes of something else"


def _payload(path: str, data: bytes) -> bytes:
    """The verified torch.save bytes of a checkpoint file (or of a legacy file without a header)."""
    if not data:
        raise CheckpointError(f"{path}: empty file, expected an omniattn checkpoint (a save that never completed?)")
    if data.startswith(b"PK\x03\x04"):  # written by torch.save directly (omniattn before checksums)
        return data
    end = data.find(b"\n", 0, HEADER_LIMIT)
    if end < 0 and len(data) < HEADER_LIMIT and data.startswith(MAGIC[: len(data)]):
        raise CheckpointError(f"{path}: truncated checkpoint: {len(data)} bytes, the header is cut off")
    fields = data[:end].split(b" ") if end > 0 else []
    if len(fields) != 4 or fields[0] != MAGIC:
        raise CheckpointError(f"{path}: expected an omniattn checkpoint (written by `omniattn recsys train "
                              f"--checkpoint`), found {_describe(data)}")
    if fields[1] != str(VERSION).encode():
        raise CheckpointError(f"{path}: checkpoint format {fields[1].decode(errors='replace')!r}, this omniattn "
                              f"reads format {VERSION}")
    try:
        digest = fields[2].removeprefix(b"sha256=").decode()
        size = int(fields[3].removeprefix(b"bytes="))
    except ValueError:
        raise CheckpointError(f"{path}: damaged checkpoint header {data[:end][:80]!r}") from None
    payload = data[end + 1:]
    if len(payload) != size:
        raise CheckpointError(f"{path}: truncated or extended checkpoint: the header says {size} bytes of data, "
                              f"the file holds {len(payload)}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: corrupted checkpoint: the SHA-256 of its {size} bytes of data does not "
                              "match the one written with them")
    return payload


def load_checkpoint(path: str, device="cpu") -> dict:
    """A checkpoint written by :func:`save_checkpoint`, verified; every failure is a CheckpointError naming ``path``."""
    payload = _payload(path, _read_bytes(path))
    try:
        # Our own checkpoints hold only tensors, dicts, lists and numbers: the safe unpickler suffices.
        ckpt = torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for damaged data; all mean the same here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {first[:160]})") from None
    missing = [k for k in KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: expected an omniattn recsys checkpoint, found one without {missing}")
    return ckpt

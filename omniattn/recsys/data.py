"""Interaction data for sequential recommendation: loaders, the leave-one-out split, batching.

Every dataset becomes per-user item sequences in time order with ids 1..num_items (0 pads).
Leave-one-out by time (SASRec, HSTU): a user's last item is the test target, the one before it
the validation target, the rest is training history.
"""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Optional

import torch

RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"


@dataclass
class Interactions:
    """Per-user item and timestamp sequences (int64, time order); item ids 1..num_items."""

    name: str
    num_items: int
    items: list
    times: list

    @property
    def num_users(self) -> int:
        return len(self.items)


def _from_triples(name: str, triples, min_len: int = 3) -> Interactions:
    """(user, item, timestamp) rows -> sequences sorted by time (ties keep file order), items remapped
    densely in order of first appearance, users with fewer than ``min_len`` interactions dropped."""
    by_user: dict = {}
    for order, (user, item, ts) in enumerate(triples):
        by_user.setdefault(user, []).append((ts, order, item))
    item_ids: dict = {}
    items, times = [], []
    for user in sorted(by_user, key=lambda u: (str(type(u)), u)):
        events = sorted(by_user[user])
        if len(events) < min_len:
            continue
        seq = [item_ids.setdefault(item, len(item_ids) + 1) for _, _, item in events]
        items.append(torch.tensor(seq, dtype=torch.int64))
        times.append(torch.tensor([int(ts) for ts, _, _ in events], dtype=torch.int64))
    if not items:
        raise ValueError(f"{name}: no user has {min_len} or more interactions")
    return Interactions(name, len(item_ids), items, times)


def parse_recbole_inter(text: str, name: str = "ml-100k") -> Interactions:
    """RecBole's atomic .inter format: a tab-separated header of ``field:type`` names, then rows."""
    rows = text.splitlines()
    if not rows:
        raise ValueError(f"{name}: empty .inter file")
    header = [h.split(":")[0] for h in rows[0].split("\t")]
    for needed in ("user_id", "item_id", "timestamp"):
        if needed not in header:
            raise ValueError(f"{name}: .inter header lacks {needed!r} (got {header})")
    u, i, t = header.index("user_id"), header.index("item_id"), header.index("timestamp")
    triples = []
    for line in rows[1:]:
        if line.strip():
            f = line.split("\t")
            triples.append((int(f[u]), int(f[i]), int(float(f[t]))))
    return _from_triples(name, triples)


def _cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "omniattn")


def find_recbole_wheel(path: Optional[str] = None, download: bool = True) -> str:
    """The recbole wheel: ``path`` (a wheel or a folder holding one), else the cache, else
    ``pip download --no-deps recbole==1.2.1`` into the cache."""
    candidates = []
    if path:
        candidates = [path] if path.endswith(".whl") else glob.glob(os.path.join(path, "recbole-*.whl"))
    else:
        candidates = glob.glob(os.path.join(_cache_dir(), "recbole-*.whl"))
    if candidates:
        return sorted(candidates)[-1]
    if path or not download:
        raise FileNotFoundError(f"no recbole wheel at {path or _cache_dir()}; get it with "
                                f"`pip download --no-deps {RECBOLE_WHEEL} -d DIR`")
    os.makedirs(_cache_dir(), exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", RECBOLE_WHEEL, "-d", _cache_dir()],
                   check=True)
    return find_recbole_wheel(None, download=False)


def movielens_100k(path: Optional[str] = None) -> Interactions:
    """MovieLens-100K from the recbole wheel (``path``: the wheel, a folder with it, or an .inter file)."""
    if path and path.endswith(".inter"):
        with open(path) as f:
            return parse_recbole_inter(f.read())
    with zipfile.ZipFile(find_recbole_wheel(path)) as wheel:
        return parse_recbole_inter(wheel.read(ML100K_MEMBER).decode())


def movielens_1m(path: str) -> Interactions:
    """MovieLens-1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``); ``path``: the file or its folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "ratings.dat")
    triples = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.strip():
                user, item, _, ts = line.strip().split("::")
                triples.append((int(user), int(item), int(ts)))
    return _from_triples("ml-1m", triples)


def movielens_20m(path: str) -> Interactions:
    """MovieLens-20M ``ratings.csv`` (``userId,movieId,rating,timestamp``); ``path``: the file or its folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "ratings.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        triples = [(int(r["userId"]), int(r["movieId"]), int(r["timestamp"])) for r in reader]
    return _from_triples("ml-20m", triples)


def synthetic(num_users: int = 600, num_items: int = 200, length: tuple = (15, 60), branching: int = 3,
              noise: float = 0.1, seed: int = 0) -> Interactions:
    """Users walk a sparse Markov chain over items: each item has ``branching`` likely successors,
    taken with probability 1 - noise (else a uniform item). Next-item structure a sequential model
    can learn and a popularity ranking cannot; timestamps grow by random gaps."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(1, num_items + 1, (num_items + 1, branching), generator=gen)
    items, times = [], []
    for _ in range(num_users):
        n = int(torch.randint(length[0], length[1] + 1, (1,), generator=gen))
        seq = [int(torch.randint(1, num_items + 1, (1,), generator=gen))]
        for _ in range(n - 1):
            if float(torch.rand(1, generator=gen)) < noise:
                seq.append(int(torch.randint(1, num_items + 1, (1,), generator=gen)))
            else:
                seq.append(int(successors[seq[-1], int(torch.randint(0, branching, (1,), generator=gen))]))
        items.append(torch.tensor(seq))
        gaps = torch.randint(1, 10_000, (n,), generator=gen)
        times.append(torch.cumsum(gaps, 0) + 1_000_000_000)
    return Interactions("synthetic", num_items, items, times)


def load(spec: str) -> Interactions:
    """``synthetic``, ``ml-100k[:PATH]``, ``ml-1m:PATH``, ``ml-20m:PATH``."""
    name, _, path = spec.partition(":")
    if name == "synthetic":
        return synthetic()
    if name == "ml-100k":
        return movielens_100k(path or None)
    if name in ("ml-1m", "ml-20m"):
        if not path:
            raise ValueError(f"--dataset {name}:PATH: give the folder (or file) of the MovieLens download")
        return movielens_1m(path) if name == "ml-1m" else movielens_20m(path)
    raise ValueError(f"dataset: expected synthetic, ml-100k[:PATH], ml-1m:PATH or ml-20m:PATH, got {spec!r}")


@dataclass
class Split:
    """Leave-one-out by time. ``train[u]`` is user u's history without the last two items;
    validation predicts items[-2] from train[u]; test predicts items[-1] from items[:-1]."""

    data: Interactions
    train: list
    train_times: list
    valid_target: torch.Tensor
    test_target: torch.Tensor

    @classmethod
    def leave_one_out(cls, data: Interactions) -> "Split":
        return cls(
            data,
            [s[:-2] for s in data.items],
            [t[:-2] for t in data.times],
            torch.stack([s[-2] for s in data.items]),
            torch.stack([s[-1] for s in data.items]),
        )

    def histories(self, which: str) -> tuple[list, list, torch.Tensor]:
        """(item histories, their timestamps, targets) for ``valid`` or ``test``."""
        if which == "valid":
            return self.train, self.train_times, self.valid_target
        if which == "test":
            return [s[:-1] for s in self.data.items], [t[:-1] for t in self.data.times], self.test_target
        raise ValueError(f"split: expected 'valid' or 'test', got {which!r}")


@dataclass
class JaggedBatch:
    """Sequences laid end to end: items/timestamps (T,), offsets (B+1,), positions (T,)."""

    items: torch.Tensor
    times: torch.Tensor
    offsets: torch.Tensor
    positions: torch.Tensor

    def to(self, device) -> "JaggedBatch":
        return JaggedBatch(*(t.to(device) for t in (self.items, self.times, self.offsets, self.positions)))

    @property
    def last(self) -> torch.Tensor:
        """Index of each sequence's last token."""
        return self.offsets[1:] - 1


def make_batch(seqs: list, times: list) -> JaggedBatch:
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lens, 0)
    positions = torch.cat([torch.arange(n) for n in lens.tolist()]) if seqs else torch.zeros(0, dtype=torch.int64)
    items = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.int64)
    ts = torch.cat(times) if seqs else torch.zeros(0, dtype=torch.int64)
    return JaggedBatch(items, ts, offsets, positions)


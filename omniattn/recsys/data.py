"""Interaction data for sequential recommendation: loaders, the leave-one-out split, batching.

Every dataset becomes per-user item sequences in time order with ids 1..num_items (0 pads).
Leave-one-out by time (SASRec, HSTU): a user's last item is the test target, the one before it
the validation target, the rest is training history.
"""

from __future__ import annotations

import contextlib
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


class DataError(ValueError):
    """A data file that is not what its loader expects; the message is ``path:line: expected ..., found ...``."""


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


def _from_triples(name: str, triples, min_len: int = 3, source: Optional[str] = None) -> Interactions:
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
        raise DataError(f"{source or name}: expected users with {min_len} or more interactions, found none "
                        f"({len(by_user)} users)")
    return Interactions(name, len(item_ids), items, times)


def _bad(source: str, line: int, expected: str, found: str) -> DataError:
    return DataError(f"{source}:{line}: expected {expected}, found {found}")


def _shown(text: str, limit: int = 60) -> str:
    """A line as it appears in a message: quoted, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _separator_hint(line: str, sep: str) -> str:
    """Why a line splits into too few fields, when the reason is another separator."""
    for other, name in (("\t", "tabs"), (",", "commas"), ("::", "'::'"), (";", "semicolons")):
        if other != sep and other in line:
            return f" (separated by {name}?)"
    return ""


def _split(source: str, line_no: int, line: str, sep: str, names: tuple) -> list:
    """The fields of one row; a row with too few fields is an error that shows the row."""
    fields = line.rstrip("\r\n").split(sep)
    if len(fields) < len(names):
        sep_name = {"\t": "tab", "::": "'::'", ",": "comma"}.get(sep, repr(sep))
        raise _bad(source, line_no, f"{len(names)} {sep_name}-separated fields ({', '.join(names)})",
                   f"{len(fields)}: {_shown(line.rstrip())}{_separator_hint(line, sep)}")
    return fields


def _number(source: str, line_no: int, field: str, text: str, integral: bool = True) -> int:
    """An id or a timestamp: an integer (``integral``) or any number, truncated to an int."""
    try:
        return int(text) if integral else int(float(text))
    except ValueError:
        kind = "an integer" if integral else "a number"
        raise _bad(source, line_no, f"{kind} {field}", _shown(text)) from None


def _read_text(path: str, what: str, encoding: str = "utf-8") -> str:
    """A whole (small) data file; a missing or unreadable one is a DataError that says what was wanted."""
    with _open_data(path, what, encoding) as f:
        return f.read()


@contextlib.contextmanager
def _open_data(path: str, what: str, encoding: str = "utf-8"):
    """A data file opened for reading line by line (MovieLens-20M has 20M lines: never all in
    memory); opening and decoding failures become DataErrors that say what the file should be."""
    try:
        f = open(path, encoding=encoding, newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected {what})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder (expected {what})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    with f:
        try:
            yield f
        except UnicodeDecodeError:
            raise DataError(f"{path}: expected {what} as {encoding} text, found undecodable bytes") from None


def _nonempty_lines(text: str, source: str, what: str):
    """(line number, line) of every non-blank line; an empty file is an error."""
    rows = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise _bad(source, 1, what, "an empty file")
    return rows


def parse_recbole_inter(text: str, name: str = "ml-100k", source: Optional[str] = None) -> Interactions:
    """RecBole's atomic .inter format: a tab-separated header of ``field:type`` names, then rows.
    ``source`` names the file in error messages (default: ``name``)."""
    source = source or name
    rows = _nonempty_lines(text, source, "a RecBole .inter file (a tab-separated header, then rows)")
    header_no, header_line = rows[0]
    header = [h.split(":")[0].strip() for h in header_line.split("\t")]
    for needed in ("user_id", "item_id", "timestamp"):
        if needed not in header:
            raise _bad(source, header_no, "a tab-separated header with user_id, item_id and timestamp fields",
                       f"{_shown(header_line)}{_separator_hint(header_line, chr(9))}")
    u, i, t = header.index("user_id"), header.index("item_id"), header.index("timestamp")
    names = tuple(header[: max(u, i, t) + 1])
    triples = []
    for n, line in rows[1:]:
        f = _split(source, n, line, "\t", names)
        triples.append((_number(source, n, "user_id", f[u]), _number(source, n, "item_id", f[i]),
                        _number(source, n, "timestamp", f[t], integral=False)))
    return _from_triples(name, triples, source=source)


def _cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "omniattn")


RECBOLE_WHEEL_MB = 2.1  # recbole-1.2.1-py3-none-any.whl is 2,130,151 bytes


def find_recbole_wheel(path: Optional[str] = None, download: bool = True, log=sys.stderr) -> str:
    """The recbole wheel: ``path`` (a wheel or a folder holding one), else the cache, else
    ``pip download --no-deps recbole==1.2.1`` into the cache (saying so on ``log`` first)."""
    candidates = []
    if path:
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or folder (expected the recbole wheel, a folder holding it, "
                            "or an ml-100k .inter file)")
        candidates = [path] if path.endswith(".whl") else glob.glob(os.path.join(path, "recbole-*.whl"))
    else:
        candidates = glob.glob(os.path.join(_cache_dir(), "recbole-*.whl"))
    if candidates:
        return sorted(candidates)[-1]
    if path or not download:
        raise DataError(f"{path or _cache_dir()}: no recbole wheel there; get it with "
                        f"`pip download --no-deps {RECBOLE_WHEEL} -d DIR`")
    os.makedirs(_cache_dir(), exist_ok=True)
    # Say what is fetched before fetching it: a user on a metered or offline machine should know.
    print(f"MovieLens-100K: downloading the {RECBOLE_WHEEL} wheel ({RECBOLE_WHEEL_MB} MB, from the package index "
          f"pip uses, PyPI by default) into {_cache_dir()}; it ships the data set as "
          f"{ML100K_MEMBER}", file=log, flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", RECBOLE_WHEEL, "-d",
                           _cache_dir()])
    if done.returncode != 0:
        raise DataError(f"pip download {RECBOLE_WHEEL} failed (exit {done.returncode}); download it on a machine "
                        f"with network access (`pip download --no-deps {RECBOLE_WHEEL} -d DIR`) and pass "
                        "--dataset ml-100k:DIR")
    return find_recbole_wheel(None, download=False)


def _wheel_member(wheel: str) -> str:
    """The ml-100k .inter text inside the recbole wheel."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(ML100K_MEMBER).decode()
    except zipfile.BadZipFile:
        raise DataError(f"{wheel}: expected the recbole wheel (a zip file), found something else") from None
    except KeyError:
        raise DataError(f"{wheel}: expected a recbole wheel holding {ML100K_MEMBER}, found none") from None


def movielens_100k(path: Optional[str] = None) -> Interactions:
    """MovieLens-100K from the recbole wheel (``path``: the wheel, a folder with it, or an .inter file)."""
    if path and path.endswith(".inter"):
        return parse_recbole_inter(_read_text(path, "a RecBole .inter file"), source=path)
    wheel = find_recbole_wheel(path)
    return parse_recbole_inter(_wheel_member(wheel), source=f"{wheel}[{ML100K_MEMBER}]")


ML1M_FIELDS = ("UserID", "MovieID", "Rating", "Timestamp")


def movielens_1m(path: str) -> Interactions:
    """MovieLens-1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``); ``path``: the file or its folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "ratings.dat")
    triples, n = [], 0
    with _open_data(path, "MovieLens-1M ratings.dat", encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            user, item, _, ts = _split(path, n, line.strip(), "::", ML1M_FIELDS)[:4]
            triples.append((_number(path, n, "UserID", user), _number(path, n, "MovieID", item),
                            _number(path, n, "Timestamp", ts)))
    if not triples:
        raise _bad(path, 1, "UserID::MovieID::Rating::Timestamp rows", "an empty file")
    return _from_triples("ml-1m", triples, source=path)


ML20M_FIELDS = ("userId", "movieId", "rating", "timestamp")


def _csv_header(path: str, reader) -> tuple:
    """(column of userId, of movieId, of timestamp, fields a row needs) from the first non-blank row."""
    header = next((row for row in reader if any(c.strip() for c in row)), None)
    if header is None:
        raise _bad(path, 1, "a CSV header userId,movieId,rating,timestamp, then rows",
                   "an empty file")
    names = [h.strip() for h in header]
    if any(name not in names for name in ("userId", "movieId", "timestamp")):
        line = ",".join(header)
        raise _bad(path, reader.line_num, "a comma-separated header with userId, movieId and timestamp",
                   f"{_shown(line)}{_separator_hint(line, ',')}")
    u, i, t = names.index("userId"), names.index("movieId"), names.index("timestamp")
    return u, i, t, tuple(names[: max(u, i, t) + 1])


def movielens_20m(path: str) -> Interactions:
    """MovieLens-20M ``ratings.csv`` (``userId,movieId,rating,timestamp``); ``path``: the file or its folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "ratings.csv")
    triples = []
    with _open_data(path, "MovieLens-20M ratings.csv") as f:
        reader = csv.reader(f)
        u, i, t, names = _csv_header(path, reader)
        for row in reader:
            n = reader.line_num
            if len(row) < len(names):
                if not any(c.strip() for c in row):
                    continue
                _split(path, n, ",".join(row), ",", names)  # raises, with the row and a separator hint
            triples.append((_number(path, n, "userId", row[u]), _number(path, n, "movieId", row[i]),
                            _number(path, n, "timestamp", row[t])))
    return _from_triples("ml-20m", triples, source=path)


def synthetic(num_users: int = 600, num_items: int = 2000, length: tuple = (15, 60), branching: int = 3,
              noise: float = 0.1, seed: int = 0) -> Interactions:
    """Users walk a sparse Markov chain over items: each item has ``branching`` likely successors,
    taken with probability 1 - noise (else a uniform item). Next-item structure a sequential model
    can learn and a popularity ranking cannot; timestamps grow by random gaps. The catalogue is
    ten times the largest cutoff (HR@200), so that no metric is 1.0 by construction: with 200
    items every ranking put every target in its top 200."""
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
            raise ValueError(f"dataset: {name} needs the folder (or file) of the MovieLens download: {name}:PATH")
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


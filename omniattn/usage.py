"""Counters of what the drop-in entry points did: how many calls omniattn computed, by which path,
and how many it handed to PyTorch (and why). ``omniattn.stats()`` reads them.

A model run through the SDPA drop-in or the transformers integration should show 0 fallbacks;
these counters are how a user (and the tests) can see that instead of trusting it.
"""

from __future__ import annotations

import warnings
from collections import Counter

_counts: Counter = Counter()
_warned: set = set()


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to the counter ``name`` (e.g. ``"sdpa.varlen"``)."""
    _counts[name] += n


def fallback(where: str, reason: str, stacklevel: int = 3) -> None:
    """Record that ``where`` (e.g. ``"sdpa"``) handed a call to PyTorch for ``reason``; warn once per reason."""
    _counts[f"{where}.fallback"] += 1
    _counts[f"{where}.fallback[{reason}]"] += 1
    if (where, reason) not in _warned:
        _warned.add((where, reason))
        warnings.warn(f"omniattn.{where}: {reason} runs on PyTorch's implementation (counted in omniattn.stats())",
                      stacklevel=stacklevel)


def stats(reset: bool = False) -> dict:
    """Counters of the drop-in entry points since the start (or the last reset), as a plain dict.

    Keys: ``"sdpa"`` (calls computed by omniattn), ``"sdpa.dense"`` / ``"sdpa.varlen"`` (a key-padding
    mask run as packed sequences) / ``"sdpa.masked"`` (any other mask, read tile by tile),
    ``"sdpa.fallback"`` and ``"sdpa.fallback[<reason>]"`` (handed to PyTorch), and likewise
    ``"transformers"``, ``"flash_attn.<function>"``, ``"hstu_mha"``. Missing keys are 0.
    ``reset=True`` returns the counters and clears them (and the once-per-reason warnings).

    Example::

        omniattn.stats(reset=True)
        model(**batch)
        assert omniattn.stats().get("sdpa.fallback", 0) == 0
    """
    out = dict(_counts)
    if reset:
        _counts.clear()
        _warned.clear()
    return out

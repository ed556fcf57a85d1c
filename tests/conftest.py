import os
import sys

import pytest
import torch

# The Triton interpreter must be chosen before any @triton.jit function is defined; on a machine
# without a CUDA GPU every Triton kernel in the suite runs under it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from omniattn.backends import torch_tiled  # noqa: E402

from .helpers import poison  # noqa: E402


def nan_empty(*shape, **kw):
    """torch.empty that poisons (NaN in floats), so any element a kernel forgets to write fails the test."""
    return poison(torch.empty(*shape, **kw))


@pytest.fixture(autouse=True)
def fresh_launch_plans():
    """Every test plans its own kernel launches (backends/triton/launch.py keeps a plan per call
    signature): tests patch the rules and constants that plans are made from."""
    launch = sys.modules.get("omniattn.backends.triton.launch")
    if launch is not None:
        launch._PLANS.clear()


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles much smaller than the test sequences, so skipped, FULL and PARTIAL tiles all occur."""
    monkeypatch.setattr(torch_tiled, "BLOCK_Q", 16)
    monkeypatch.setattr(torch_tiled, "TILE_ELEMS", 1)  # key chunks of MIN_BLOCK_K keys
    monkeypatch.setattr(torch_tiled, "MIN_BLOCK_K", 8)
    monkeypatch.setattr(torch_tiled, "_empty", nan_empty)
    yield


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(torch_tiled, "_empty", nan_empty)
    yield

import pytest
import torch

# GPU-only tests: skipped on machines without CUDA (the CI runs on CPUs).
if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _gpu_seed():
    torch.cuda.manual_seed(0)
    yield

"""HSTU's relative bias in the Triton kernels: time buckets by thresholds or by the float32 log,
targets, causal or not, against the reference (outputs and every gradient, weights included).

Runs under TRITON_INTERPRET=1 on CI (float32: the interpreter's bf16 is wrong)."""

import pytest
import torch

import omniattn as oa
from omniattn.backends.triton import supported

from .helpers import check_outputs_and_grads, rand, varlen_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not supported(torch.device(DEVICE), explicit=True)[0],
                                reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")


def _timestamps(kind: str, n: int, gen) -> torch.Tensor:
    if kind == "close":  # sorted, small gaps: tiles off the diagonal span few buckets (threshold path)
        return torch.randint(1, 40, (n,), generator=gen).cumsum(0)
    if kind == "unsorted":
        return torch.randint(0, 5000, (n,), generator=gen)
    if kind == "huge":  # gaps beyond int32: the float32 path must take over
        return torch.randint(0, 40, (n,), generator=gen).cumsum(0) * (1 << 33)
    return torch.full((n,), 7, dtype=torch.int64)  # "equal": every gap 0 -> bucket 0


CASES = [
    # (timestamps, num_buckets, bucketization, causal, targets, rab heads)
    ("close", 64, "log", True, None, None),
    ("close", 64, "sqrt", True, [0, 3, 1], 2),
    ("unsorted", 20, "log", True, [2, 0, 5], None),
    ("huge", 128, "log", True, None, 2),
    ("equal", 8, "log", True, [1, 1, 1], None),
    ("close", 64, "log", False, [0, 4, 2], None),
    ("unsorted", 32, "sqrt", False, [3, 0, 1], 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_relative_bias_matches_reference(case):
    kind, nb, bucketization, causal, targets, heads = case
    gen = torch.Generator().manual_seed(10 * CASES.index(case))
    lens = [37, 50, 21]
    p = varlen_problem(lens, lens, 2, 2, 16, 16, torch.float32, gen, DEVICE)
    offsets = p.varlen[0]
    rab = oa.hstu.RelativeBias(64, num_buckets=nb, bucketization=bucketization, num_heads=heads).to(DEVICE)
    with torch.no_grad():
        rab.pos_w.copy_(rand(rab.pos_w.shape, torch.float32, gen, DEVICE))
        rab.ts_w.copy_(rand(rab.ts_w.shape, torch.float32, gen, DEVICE))
    ts = _timestamps(kind, sum(lens), gen).to(DEVICE)
    nt = torch.tensor(targets, device=DEVICE) if targets is not None else None
    kw = dict(causal=causal, num_targets=nt, rab=rab, timestamps=ts)

    def fn():
        return oa.hstu_attention(p.q, p.k, p.v, offsets, 64, backend="triton", **kw)

    def ref(dtype):
        return oa.reference.hstu_attention(p.q, p.k, p.v, offsets, 64, dtype=dtype, **kw)

    check_outputs_and_grads(p, "triton", gen, extra_leaves=[rab.pos_w, rab.ts_w], fn=fn, ref=ref)

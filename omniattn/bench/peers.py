"""Peers timed beside omniattn from a local checkout or an installed package, never vendored:
generative-recommenders' Triton HSTU kernel (``--peer generative-recommenders=PATH``, a checkout of
github.com/facebookresearch/generative-recommenders) and SageAttention 1 (``pip install
sageattention``, its Triton INT8 kernel).

generative-recommenders' backward hits an illegal memory access on Triton 3.6, which poisons the
CUDA context of the process: its forward+backward rows therefore run in a child process, and a
crash there becomes the row's ``error``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import torch

from .impls import Impl, Inputs, Runner, hstu_kwargs
from .suites import Case

_PATHS: dict = {}  # peer name -> checkout path (set by the CLI's --peer)
GR = "generative-recommenders"


def register(spec: str) -> None:
    """``name=path`` from the command line."""
    name, sep, path = spec.partition("=")
    if name != GR or not sep:
        raise ValueError(f"--peer: expected {GR}=PATH (a checkout of facebookresearch/generative-recommenders), "
                         f"got {spec!r}")
    if not os.path.isfile(os.path.join(path, "generative_recommenders", "ops", "triton", "triton_hstu_attention.py")):
        raise ValueError(f"--peer: {path} has no generative_recommenders/ops/triton/triton_hstu_attention.py")
    _PATHS[name] = os.path.abspath(path)
    os.environ["OMNIATTN_PEER_GR"] = _PATHS[name]  # the child processes of fwdbwd rows read it


def _gr_module():
    path = _PATHS.get(GR) or os.environ.get("OMNIATTN_PEER_GR")
    if not path:
        return None
    import triton.language as tl

    # Its TMA code path references four names later Triton releases renamed; it only uses them when
    # TMA is enabled (off here), but they must exist to compile. Alias them to anything callable.
    for owner, name in ((tl, "_experimental_descriptor_load"), (tl, "_experimental_descriptor_store"),
                        (tl.extra.cuda, "experimental_device_tensormap_create2d"),
                        (tl.extra.cuda, "experimental_tensormap_fenceproxy_acquire")):
        if not hasattr(owner, name):
            setattr(owner, name, tl.load)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("generative_recommenders.ops.triton.triton_hstu_attention")


def _gr_usable(case: Case, device: torch.device):
    if device.type != "cuda" or not (_PATHS.get(GR) or os.environ.get("OMNIATTN_PEER_GR")):
        return False, "no checkout (--peer generative-recommenders=PATH)"
    if case.options.get("precision"):
        return False, "exact only"
    if case.options.get("rab"):
        return False, "the open kernels fuse no relative attention bias"
    if case.options.get("targets") and case.mode == "fwdbwd":
        return False, "its backward is measured once, without targets"
    return True, ""


def _gr(case: Case, x: Inputs) -> Runner:
    kw = hstu_kwargs(case, x)
    if case.mode == "fwdbwd":
        return _in_child(case)
    mod = _gr_module()
    offsets = x.cu.long()
    nt = kw["num_targets"]
    alpha = 1.0 / math.sqrt(case.head_dim)
    q, k, v = x.leaves

    def run():
        # their kernel divides by N (max_seq_len), as omniattn's default silu_norm
        return mod.triton_hstu_mha(case.seqlen, alpha, q, k, v, offsets, num_targets=nt)

    return Runner(run, [q, k, v])


def _in_child(case: Case) -> Runner:
    """Time the case in a child process; its row's numbers come back as the runner's ``result``."""
    cmd = [sys.executable, "-m", "omniattn.bench.peers", json.dumps(case.__dict__, default=list)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise RuntimeError(f"child process exited with {done.returncode}: {tail}")
    result = json.loads(lines[-1])
    runner = Runner(lambda: None, [])
    runner.result = result  # type: ignore[attr-defined]
    return runner


def _child_main(case_json: str) -> None:
    from .impls import make_inputs
    from .measure import step, time_ms

    fields = json.loads(case_json)
    fields["extra"] = tuple(tuple(kv) for kv in fields["extra"])
    fields["lens"] = tuple(fields["lens"]) if fields["lens"] else None
    case = Case(**{**fields, "mode": "fwd"})
    device = torch.device("cuda")
    x = make_inputs(Case(**fields), device)
    runner = _gr(case, x)  # the forward runner; step() adds the peer's own backward
    dout = torch.randn_like(x.q)
    fn = step(runner, Case(**fields), dout)
    fn()
    torch.cuda.synchronize()
    print(json.dumps({"ms": time_ms(fn, device, runner.leaves)}))


def _sage_usable(case: Case, device: torch.device):
    if device.type != "cuda" or case.op != "softmax" or case.lens or case.mode != "fwd":
        return False, "dense softmax forward on CUDA"
    try:
        importlib.import_module("sageattention")
    except ImportError:
        return False, "sageattention is not installed"
    return True, ""


def _sage(case: Case, x: Inputs) -> Runner:
    """SageAttention 1 (Triton, INT8 Q.K with K smoothing, FP16 P.V): its own quantization included."""
    from sageattention import sageattn

    q, k, v = (t.detach().transpose(1, 2).contiguous() for t in x.leaves)  # (B, H, N, D)
    return Runner(lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=case.causal).transpose(1, 2), [q, k, v],
                  lambda t: t.transpose(1, 2))


PEER_IMPLS = [
    Impl(GR, ("hstu",), _gr, _gr_usable),
    Impl("sageattention", ("softmax",), _sage, _sage_usable),
]


if __name__ == "__main__":
    _child_main(sys.argv[1])

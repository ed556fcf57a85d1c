"""Tile-config sweep for the Triton kernels on the GPU (one shape, several configs, one run).

    python benchmarks/gpu_sweep.py --json $OUT/sweep.json

For each score and mask it times the forward with each forward config, then forward+backward
while varying the dK/dV config and then the dQ config (the others at their defaults), checking
the output against SDPA's each time so a fast wrong config never wins.
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import omniattn as oa  # noqa: E402

FWD = ["128,64,4,3", "128,64,8,3", "128,128,8,3", "128,128,8,2", "64,64,4,3", "128,64,8,4"]
DKDV = ["64,128,8,2", "32,128,4,2", "32,128,8,2", "64,64,4,2", "64,64,8,2", "32,64,4,2"]
DQ = ["128,64,8,2", "128,32,4,2", "64,64,4,2", "128,64,4,2", "128,128,8,2"]


def tflops(b, h, n, d, causal, ms, mult=1.0):
    f = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0) * mult
    return f / (ms * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--json")
    ap.add_argument("--skip-bwd", action="store_true")
    args = ap.parse_args()
    b, n, h, d = args.batch, args.seqlen, args.heads, args.dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    rows = []
    for score in ("softmax", "sigmoid", "silu"):
        kw = dict(score=score)
        if score == "sigmoid":
            kw["sigmoid_bias"] = -math.log(n)
        for causal in (False, True):
            ref = oa.attention(q[:1], k[:1], v[:1], causal=causal, backend="torch", **kw).float()
            for cfg in FWD:
                os.environ["OMNIATTN_FWD_CONFIG"] = cfg
                try:
                    with torch.no_grad():
                        out = oa.attention(q, k, v, causal=causal, **kw)
                    err = (out[:1].float() - ref).abs().max().item()
                    ms = do_bench(lambda: oa.attention(q, k, v, causal=causal, **kw), warmup=25, rep=100,
                                  return_mode="median")
                    rows.append(dict(kernel="fwd", score=score, causal=causal, cfg=cfg, ms=ms, err=err,
                                     tflops=tflops(b, h, n, d, causal, ms)))
                except Exception as e:  # a config that does not fit (shared memory, registers)
                    rows.append(dict(kernel="fwd", score=score, causal=causal, cfg=cfg, error=str(e)[:120]))
                print(rows[-1], flush=True)
            os.environ.pop("OMNIATTN_FWD_CONFIG")
            if args.skip_bwd or score != "softmax":
                continue
            for kind, cfgs in (("dkdv", DKDV), ("dq", DQ)):
                for cfg in cfgs:
                    os.environ[f"OMNIATTN_{kind.upper()}_CONFIG"] = cfg
                    try:
                        def step():
                            oa.attention(q, k, v, causal=causal, **kw).backward(dout)

                        ms = do_bench(step, warmup=10, rep=50, grad_to_none=[q, k, v], return_mode="median")
                        rows.append(dict(kernel=kind, score=score, causal=causal, cfg=cfg, ms=ms,
                                         tflops=tflops(b, h, n, d, causal, ms, 3.5)))
                    except Exception as e:
                        rows.append(dict(kernel=kind, score=score, causal=causal, cfg=cfg, error=str(e)[:120]))
                    print(rows[-1], flush=True)
                os.environ.pop(f"OMNIATTN_{kind.upper()}_CONFIG")
    # baselines in the same run
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        for causal in (False, True):
            def fwd():
                with sdpa_kernel(backend), torch.no_grad():
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

            def fb():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).backward(dout.transpose(1, 2))

            ms = do_bench(fwd, return_mode="median")
            ms2 = do_bench(fb, grad_to_none=[qt, kt, vt], return_mode="median")
            rows.append(dict(kernel="baseline", impl=name, causal=causal, ms=ms, tflops=tflops(b, h, n, d, causal, ms),
                             ms_fwdbwd=ms2, tflops_fwdbwd=tflops(b, h, n, d, causal, ms2, 3.5)))
            print(rows[-1], flush=True)
    print("\nbest per (kernel, score, causal):")
    best = {}
    for r in rows:
        if "ms" in r and r["kernel"] != "baseline":
            key = (r["kernel"], r["score"], r["causal"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    for key, r in sorted(best.items()):
        print(f"{key}: {r['cfg']} {r['ms']:.3f} ms {r['tflops']:.0f} TFLOPS")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), shape=[b, n, h, d], rows=rows,
                           date=time.strftime("%Y-%m-%d")), f, indent=1)


if __name__ == "__main__":
    main()

"""Decode rows: one query token against a KV cache, omniattn's split-KV kernel against SDPA (flash,
cuDNN; enable_gqa=True) and FlexAttention (compiled), same inputs, same run. bf16, 32 query / 8 kv
heads, D=128; ``gbps`` = K and V bytes read / time (the H100 copies ~3.0 TB/s).

    python3 -m omniattn.bench.decode --json decode.json
"""

from __future__ import annotations

import argparse
import gc
import math

import torch

from .measure import device_name
from .report import write_json

SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 32768), (8, 131072), (64, 4096), (16, 16384)]
FLEX_SHAPES = {(1, 131072), (8, 32768), (64, 4096), (8, 131072)}  # ANCHORS.md's set (each is a compile)
HQ, HKV, D = 32, 8, 128


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _reference_entry0(q, k, v):
    """float64 attention of entry 0's query over all its keys, one kv head at a time: (Hq, D)."""
    g = HQ // HKV
    out = torch.empty(HQ, D, dtype=torch.float64, device=q.device)
    for h in range(HKV):
        s = q[0, 0, h * g : (h + 1) * g].double() @ k[0, :, h].double().t() / math.sqrt(D)
        out[h * g : (h + 1) * g] = torch.softmax(s, -1) @ v[0, :, h].double()
    return out


def _row(impl, b, n, ms, err, **extra):
    kv_bytes = 2 * b * n * HKV * D * 2
    row = {"op": "decode", "impl": impl, "mode": "fwd", "dtype": "bf16", "batch": b, "seqlen": 1, "context": n,
           "heads": HQ, "kv_heads": HKV, "head_dim": D, "causal": True}
    if ms is None:
        row["error"] = extra.pop("error", "failed")
    else:
        row.update(ms=round(ms, 4), gbps=round(kv_bytes / (ms * 1e-3) / 1e9, 1), tflops=None,
                   max_err=None if err is None else float(f"{err:.3g}"))
    row.update(extra)
    return row


def _shape_rows(b: int, n: int, with_flex: bool) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..decode import attention_with_kvcache

    dev = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(b, 1, HQ, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, n, HKV, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.full((b,), n, dtype=torch.int32, device=dev)
    ref = _reference_entry0(q, k, v)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # SDPA/Flex layout (B, H, N, D)
    impls = {"omniattn": lambda: attention_with_kvcache(q, k, v, lens)}
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True).transpose(1, 2)
        impls[name] = sdpa
    if with_flex:
        from torch.nn.attention.flex_attention import flex_attention

        from .impls import _compiled_flex

        flex = _compiled_flex(flex_attention)
        impls["flex"] = lambda: flex(qs, ks, vs, enable_gqa=True).transpose(1, 2)
    rows = []
    for name, fn in impls.items():
        try:
            out = fn()
            err = (out[0, 0].double() - ref).abs().max().item()
            rows.append(_row(name, b, n, _bench_ms(fn), err))
        except Exception as e:  # a peer that fails keeps its row (DESIGN.md)
            rows.append(_row(name, b, n, None, None, error=f"{type(e).__name__}: {str(e)[:200]}"))
    print("  ".join(f"{r['impl']} {r.get('gbps', r.get('error'))}" for r in rows), f"<- B={b} N={n}", flush=True)
    return rows


def run(shapes=SHAPES, flex_shapes=FLEX_SHAPES) -> list[dict]:
    rows = []
    for b, n in shapes:
        rows += _shape_rows(b, n, (b, n) in flex_shapes)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write DESIGN.md's results format here")
    parser.add_argument("--quick", action="store_true", help="ANCHORS.md's four shapes only, Flex at two")
    args = parser.parse_args(argv)
    if args.quick:
        rows = run([(1, 131072), (8, 32768), (64, 4096), (8, 131072)], {(1, 131072), (64, 4096)})
    else:
        rows = run()
    if args.json:
        write_json(args.json, device_name(torch.device("cuda")), rows)


if __name__ == "__main__":
    main()

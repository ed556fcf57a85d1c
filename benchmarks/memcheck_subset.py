"""A small subset of every kernel variant, for `compute-sanitizer --tool memcheck`.

    compute-sanitizer --tool memcheck python3 benchmarks/memcheck_subset.py

Odd lengths, tile-straddling sequences, empty sequences, GQA, windows, HSTU targets and the
relative bias: the places an out-of-bounds access would hide. Prints the largest error against
the reference so the run is also a correctness check.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import omniattn as oa  # noqa: E402


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def main():
    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=bf16, generator=g).requires_grad_()

    worst = 0.0
    for score in ("softmax", "sigmoid", "silu"):
        for kw in (dict(causal=True), dict(window=(37, 5), softcap=20.0, alibi_slopes=torch.rand(4, device=dev))):
            q, k, v = rnd(2, 301, 4, 128), rnd(2, 333, 2, 128), rnd(2, 333, 2, 128)
            out = oa.attention(q, k, v, score=score, backend="triton", **kw)
            out.backward(torch.randn_like(out))
            worst = max(worst, err(out, oa.reference.attention(q, k, v, score=score, **kw)))
        lens = [0, 5, 130, 1, 77, 0, 64]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        q, k, v = rnd(sum(lens), 8, 64), rnd(sum(lens), 2, 64), rnd(sum(lens), 2, 64)
        out = oa.attention_varlen(q, k, v, cu, cu, 130, 130, score=score, causal=True, backend="triton")
        out.backward(torch.randn_like(out))
        worst = max(worst, err(out, oa.reference.attention_varlen(q, k, v, cu, cu, 130, 130, score=score, causal=True)))
    lens = [200, 0, 1, 129]
    offsets = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev)
    q, k, v = rnd(sum(lens), 2, 128), rnd(sum(lens), 2, 128), rnd(sum(lens), 2, 128)
    rab = oa.hstu.RelativeBias(256, num_heads=2).to(dev)
    ts = torch.arange(sum(lens), device=dev) * 97
    for kw in (dict(num_targets=torch.tensor([20, 0, 1, 7], device=dev), rab=rab, timestamps=ts),
               dict(contextual_seq_len=3, max_attn_len=40, causal=False)):
        out = oa.hstu_attention(q, k, v, offsets, 256, backend="triton", **kw)
        out.backward(torch.randn_like(out))
        worst = max(worst, err(out, oa.reference.hstu_attention(q, k, v, offsets, 256, **kw)))
    torch.cuda.synchronize()
    print(f"memcheck subset done; largest output error vs reference {worst:.3e}")


if __name__ == "__main__":
    main()

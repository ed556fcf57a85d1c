"""`omniattn check`: every backend available here against the reference, on random odd-sized inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import api, reference
from .accuracy import bound, magnitude, max_err
from .hstu import RelativeBias


@dataclass
class Problem:
    name: str
    run: Callable  # run(fn_kind, backend_or_dtype) -> output
    leaves: list


def _problems(device, dtype, seed: int) -> list[Problem]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    problems = []
    dense = [
        ("plain", {}),
        ("causal", dict(causal=True)),
        ("window", dict(window=(24, 5))),
        ("gqa+causal+window", dict(causal=True, window=(31, 0), gqa=True)),
        ("alibi+softcap", dict(alibi=True, softcap=5.0)),
    ]
    for score in ("softmax", "sigmoid", "silu"):
        for label, kw in dense:
            kw = dict(kw)
            hkv = 2 if kw.pop("gqa", False) else 4
            q, k, v = rnd(2, 67, 4, 32), rnd(2, 93, hkv, 32), rnd(2, 93, hkv, 32)
            if kw.pop("alibi", False):
                kw["alibi_slopes"] = torch.rand(4, generator=gen).to(device)

            def run(kind, arg, q=q, k=k, v=v, kw=kw, score=score):
                if kind == "api":
                    return api.attention(q, k, v, score=score, backend=arg, **kw)
                return reference.attention(q, k, v, score=score, dtype=arg, **kw)

            problems.append(Problem(f"{score} dense {label}", run, [q, k, v]))
        lens_q, lens_k = [17, 0, 129, 3], [40, 5, 100, 3]
        cu_q = torch.tensor([0, 17, 17, 146, 149], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 40, 45, 145, 148], dtype=torch.int32, device=device)
        q, k, v = rnd(sum(lens_q), 4, 32), rnd(sum(lens_k), 2, 32), rnd(sum(lens_k), 2, 32)

        def run_varlen(kind, arg, q=q, k=k, v=v, score=score):
            args = (q, k, v, cu_q, cu_k, 129, 100)
            if kind == "api":
                return api.attention_varlen(*args, score=score, causal=True, backend=arg)
            return reference.attention_varlen(*args, score=score, causal=True, dtype=arg)

        problems.append(Problem(f"{score} varlen causal gqa", run_varlen, [q, k, v]))
    lens = [70, 1, 0, 33]
    offsets = torch.tensor([0, 70, 71, 71, 104], device=device)
    hstu_variants = [
        ("hstu", {}),
        ("hstu targets+rab", dict(num_targets=torch.tensor([5, 1, 0, 8], device=device), rab=True)),
        ("hstu contextual+window", dict(contextual_seq_len=3, max_attn_len=9, causal=False)),
    ]
    for label, kw in hstu_variants:
        kw = dict(kw)
        q, k, v = rnd(sum(lens), 2, 32), rnd(sum(lens), 2, 32), rnd(sum(lens), 2, 32)
        extra = []
        if kw.pop("rab", False):
            rab = RelativeBias(80, num_buckets=16, num_heads=2).to(device)
            with torch.no_grad():
                rab.pos_w.normal_()
                rab.ts_w.normal_()
            kw.update(rab=rab, timestamps=torch.arange(sum(lens), device=device) * 37)
            extra = [rab.pos_w, rab.ts_w]

        def run_hstu(kind, arg, q=q, k=k, v=v, kw=kw):
            if kind == "api":
                return api.hstu_attention(q, k, v, offsets, 80, backend=arg, **kw)
            return reference.hstu_attention(q, k, v, offsets, 80, dtype=arg, **kw)

        problems.append(Problem(label, run_hstu, [q, k, v] + extra))
    return problems


@dataclass
class CheckRow:
    case: str
    backend: str
    err_out: float
    err_grad: float
    ok: bool
    worst: str


def run_check(backends: list[str], device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[CheckRow]:
    rows = []
    for p in _problems(device, dtype, seed):
        out64 = p.run("ref", torch.float64)
        same = p.run("ref", dtype)
        dout = torch.randn(out64.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
        g64 = torch.autograd.grad(out64, p.leaves, dout.double(), allow_unused=True)
        gsame = torch.autograd.grad(same, p.leaves, dout.to(dtype), allow_unused=True)
        scale = magnitude(out64, *g64)
        for backend in backends:
            out = p.run("api", backend)
            grads = torch.autograd.grad(out, p.leaves, dout.to(dtype), allow_unused=True)
            ok = not torch.isnan(out).any().item() and max_err(out, out64) <= bound(out64, same, dtype, scale)
            worst, err_grad = "out", 0.0
            names = ["dq", "dk", "dv", "d_pos_w", "d_ts_w"]
            for name, g, r, s in zip(names, grads, g64, gsame):
                if r is None:
                    continue
                e = max_err(g, r) if g is not None else float("inf")
                good = g is not None and not torch.isnan(g).any().item() and e <= bound(r, s, dtype, scale)
                if not good and ok:
                    worst = name
                ok = ok and good
                err_grad = max(err_grad, e)
            rows.append(CheckRow(p.name, backend, max_err(out, out64), err_grad, ok, worst if not ok else ""))
    return rows

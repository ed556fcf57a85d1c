"""What `omniattn bench` measures: cases (op, shape, mask, mode) and the size sets per device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class Case:
    """One benchmark problem. ``lens`` makes it varlen (sequence lengths, packed)."""

    op: str  # softmax | sigmoid | silu | hstu
    batch: int
    seqlen: int
    heads: int
    head_dim: int
    causal: bool
    mode: str  # fwd | fwdbwd
    dtype: str = "bf16"
    kv_heads: Optional[int] = None
    lens: Optional[tuple[int, ...]] = None
    extra: tuple = field(default_factory=tuple)  # (key, value) pairs, e.g. (("rab", True),)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    @property
    def hkv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def options(self) -> dict:
        return dict(self.extra)

    def flops(self) -> float:
        """4·H·D per (query, key) pair: causal counts half, forward+backward 3.5x forward."""
        pairs = sum(n * n for n in self.lens) if self.lens else self.batch * self.seqlen**2
        f = 4.0 * self.heads * self.head_dim * pairs
        if self.causal:
            f /= 2
        return f * (3.5 if self.mode == "fwdbwd" else 1.0)

    def label(self) -> str:
        shape = f"varlen{len(self.lens)}x<={self.seqlen}" if self.lens else f"{self.batch}x{self.seqlen}"
        kv = f" kv{self.kv_heads}" if self.kv_heads else ""
        extra = "".join(f" {k}={v}" for k, v in self.extra)
        return f"{self.op} {shape} h{self.heads}{kv} d{self.head_dim}{' causal' if self.causal else ''}{extra} {self.mode}"


def _grid(ops, shapes, heads, dim, dtype, causals=(False, True), modes=("fwd", "fwdbwd")):
    """Shapes outermost, so an interrupted run has every op at the first shapes."""
    return [
        Case(op, b, n, heads, dim, c, m, dtype)
        for b, n in shapes
        for op in ops
        for c in causals
        for m in modes
    ]


def cpu_default() -> list[Case]:
    """A few minutes on a laptop: B=1, H=8, D=64, float32. Forward at N=1024 and 4096, causal or
    not; forward+backward at N=1024; softmax forward at N=16384 for peak memory."""
    ops = ("softmax", "sigmoid", "silu")
    cases = _grid(ops, [(1, 1024), (1, 4096)], 8, 64, "fp32", modes=("fwd",))
    cases += _grid(ops, [(1, 1024)], 8, 64, "fp32", modes=("fwdbwd",))
    cases.append(Case("softmax", 1, 16384, 8, 64, False, "fwd", "fp32"))
    # Shapes outermost and softmax first within a shape: each problem's rows print as they finish,
    # and sigmoid/silu rows are compared with SDPA's softmax time of their shape, measured just before.
    op_rank = {"softmax": 0, "sigmoid": 1, "silu": 2}
    return sorted(cases, key=lambda c: (c.seqlen > 4096, c.mode, c.seqlen, c.causal, op_rank.get(c.op, 3)))


def smoke() -> list[Case]:
    """Seconds, for tests of the bench itself."""
    cases = _grid(("softmax", "sigmoid", "silu"), [(1, 128)], 2, 32, "fp32", causals=(True,))
    return cases + [
        Case("softmax", 2, 96, 4, 32, True, "fwdbwd", "fp32", kv_heads=2, lens=(96, 40)),
        Case("hstu", 3, 48, 2, 16, True, "fwdbwd", "fp32", lens=(48, 30, 45), extra=(("rab", True), ("targets", 5))),
    ]


def gpu_default() -> list[Case]:
    return _grid(("softmax", "sigmoid", "silu"), [(4, 4096)], 16, 128, "bf16")


def jagged_lengths(batch: int, max_len: int, seed: int, low: float = 0.5) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    lo = max(1, int(low * max_len))
    return tuple(torch.randint(lo, max_len + 1, (batch,), generator=gen).tolist())


def gpu_full() -> list[Case]:
    """The kernel template's matrix (bf16, H=16, D=128, 16k tokens in three shapes): softmax forward
    and forward+backward, causal or not; sigmoid and SiLU beside it; varlen GQA (32 query / 8
    key-value heads) with short and long sequences; head dims 64 and 256."""
    cases = _grid(("softmax",), [(4, 4096), (16, 1024), (1, 16384)], 16, 128, "bf16")
    cases += _grid(("sigmoid", "silu"), [(4, 4096)], 16, 128, "bf16", modes=("fwd",))
    cases += _grid(("sigmoid", "silu"), [(1, 16384)], 16, 128, "bf16", causals=(False,), modes=("fwd",))
    cases += _grid(("sigmoid", "silu"), [(4, 4096)], 16, 128, "bf16", causals=(False,), modes=("fwdbwd",))
    for n, b in ((1024, 16), (4096, 4)):
        lens = jagged_lengths(b, n, seed=n)
        for mode in ("fwd", "fwdbwd"):
            cases.append(Case("softmax", b, n, 32, 128, True, mode, "bf16", kv_heads=8, lens=lens))
    cases += [Case("softmax", 4, 4096, 16, d, False, "fwd", "bf16") for d in (64, 256)]
    return cases


HSTU_VARIANTS = ((("rab", False), ("targets", 0)), (("rab", False), ("targets", 20)), (("rab", True), ("targets", 0)),
                 (("rab", True), ("targets", 20)))


def hstu() -> list[Case]:
    """The HSTU issue's matrix: jagged lengths uniform in [0.9N, N], causal, H=4, D=128, bf16,
    (B, N) in {(64, 1024), (32, 4096)}; no bias, 20 targets, the relative bias, both."""
    cases = []
    for b, n in ((64, 1024), (32, 4096)):
        lens = jagged_lengths(b, n, seed=n + 1, low=0.9)
        for extra in HSTU_VARIANTS:
            for mode in ("fwd", "fwdbwd"):
                cases.append(Case("hstu", b, n, 4, 128, True, mode, "bf16", lens=lens, extra=extra))
    return cases


QUANT_PRECISIONS = ("int8", "int8-fp8", "fp8", "int4-fp8")


def quant() -> list[Case]:
    """The quantization issue's matrix, forward, inputs with a per-channel key offset of std 3,
    quantization time included: INT8 and INT8-FP8 softmax at the kernel suite's shapes, every
    precision for every score at 4x4096, D=64, HSTU INT8 and INT8-FP8 at (32, 4096); and FP8 P.V
    in one accumulator (pv_accum="fp32") at those shapes."""
    q = lambda p: (("precision", p),)  # noqa: E731
    cases = [Case("softmax", b, n, 16, 128, c, "fwd", "bf16", extra=q(p))
             for b, n, c in ((4, 4096, False), (4, 4096, True), (1, 16384, False), (16, 1024, False))
             for p in ("int8", "int8-fp8")]
    cases += [Case("softmax", 4, 4096, 16, 128, False, "fwd", "bf16", extra=q(p)) for p in QUANT_PRECISIONS[2:]]
    cases += [Case(op, 4, 4096, 16, 128, False, "fwd", "bf16", extra=q(p)) for op in ("sigmoid", "silu")
              for p in QUANT_PRECISIONS]
    cases += [Case("softmax", 4, 4096, 16, 64, False, "fwd", "bf16", extra=q(p)) for p in ("int8", "int8-fp8")]
    lens = jagged_lengths(32, 4096, seed=4097, low=0.9)
    cases += [Case("hstu", 32, 4096, 4, 128, True, "fwd", "bf16", lens=lens, extra=q(p)) for p in ("int8", "int8-fp8")]
    # FP8 P.V in one float32 accumulator (QuantConfig(pv_accum="fp32")): on Hopper the Gluon kernel's path
    one = lambda p: q(p) + (("pv_accum", "fp32"),)  # noqa: E731
    cases += [Case("softmax", b, n, 16, 128, c, "fwd", "bf16", extra=one("int8-fp8"))
              for b, n, c in ((4, 4096, False), (4, 4096, True), (1, 16384, False), (16, 1024, False))]
    cases += [Case(op, 4, 4096, 16, 128, False, "fwd", "bf16", extra=one(p)) for op in ("softmax", "sigmoid", "silu")
              for p in ("int8-fp8", "fp8") if (op, p) != ("softmax", "int8-fp8")]
    cases += [Case("hstu", 32, 4096, 4, 128, True, "fwd", "bf16", lens=lens, extra=one("int8-fp8"))]
    return cases


def gpu_all() -> list[Case]:
    return hstu() + quant() + gpu_full()


SUITES = {"cpu": cpu_default, "gpu": gpu_default, "gpu-full": gpu_all, "kernels": gpu_full, "hstu": hstu, "quant": quant,
          "smoke": smoke}


def default_suite(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"

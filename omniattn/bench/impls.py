"""Implementations the benchmark times: omniattn and PyTorch's own attention, on the same inputs.

Every implementation gets its preferred layout, built outside the timed region: omniattn the
flash-attn layout (B, N, H, D) or packed (T, H, D); SDPA contiguous (B, H, N, D); FlexAttention
(B, H, N, D) with its block mask built once. Each returns its output in omniattn's layout, so the
rows compared with the reference are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import omniattn as oa

from .suites import Case


@dataclass
class Inputs:
    q: torch.Tensor  # (B, N, H, D) or packed (T, H, D)
    k: torch.Tensor
    v: torch.Tensor
    cu: Optional[torch.Tensor] = None  # varlen offsets (B+1,), same for q and k
    hstu: dict = field(default_factory=dict)  # op "hstu": num_targets, rab, timestamps

    @property
    def leaves(self):
        return [self.q, self.k, self.v]


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt).requires_grad_(case.mode == "fwdbwd")

    if case.lens:
        total = sum(case.lens)
        cu = torch.tensor([0] + list(torch.tensor(case.lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
        x = Inputs(rnd(total, case.heads, case.head_dim), rnd(total, case.hkv, case.head_dim),
                   rnd(total, case.hkv, case.head_dim), cu)
        if case.op == "hstu":
            x.hstu = _hstu_extras(case, device, total)
        return x
    b, n = case.batch, case.seqlen
    k = rnd(b, n, case.hkv, case.head_dim)
    if case.options.get("precision"):  # a per-channel key offset of std 3, as real LLM keys have (ANCHORS.md)
        with torch.no_grad():
            k += 3 * torch.randn(case.head_dim, generator=gen, device=device, dtype=dt)
    return Inputs(rnd(b, n, case.heads, case.head_dim), k, rnd(b, n, case.hkv, case.head_dim))


def _hstu_extras(case: Case, device, total: int) -> dict:
    """Targets, relative bias and timestamps of an HSTU case (fixed seed, same for every impl)."""
    from ..hstu import RelativeBias

    opts = case.options
    gen = torch.Generator().manual_seed(1)
    extras = dict(num_targets=None, rab=None, timestamps=None)
    if opts.get("targets"):
        extras["num_targets"] = torch.tensor([min(opts["targets"], n) for n in case.lens], device=device)
    if opts.get("rab"):
        rab = RelativeBias(case.seqlen, num_buckets=128).to(device)
        with torch.no_grad():
            rab.pos_w.copy_(torch.randn(rab.pos_w.shape, generator=gen) * 0.5)
            rab.ts_w.copy_(torch.randn(rab.ts_w.shape, generator=gen) * 0.5)
        extras["rab"] = rab
        extras["timestamps"] = torch.randint(0, 10**9, (total,), generator=gen).sort().values.to(device)
    return extras


def hstu_kwargs(case: Case, x: Inputs) -> dict:
    return dict(num_targets=x.hstu["num_targets"], rab=x.hstu["rab"], timestamps=x.hstu["timestamps"])


def score_kwargs(case: Case) -> dict:
    """Keywords that pin the score function's constants, so every implementation computes the same maths."""
    if case.op == "silu":
        return dict(score="silu", silu_norm=float(case.seqlen))
    if case.op == "sigmoid":
        return dict(score="sigmoid", sigmoid_bias=-math.log(case.seqlen))
    return dict(score="softmax")


@dataclass
class Runner:
    """A built implementation: ``fn()`` returns the output in omniattn's layout; ``leaves`` are the
    tensors it differentiates; ``dq()`` gives q's gradient in omniattn's layout."""

    fn: Callable
    leaves: list
    to_oa: Callable = lambda t: t
    comparable: bool = True  # computes the same maths as the reference (a max error is meaningful)

    def dq(self) -> torch.Tensor:
        return self.to_oa(self.leaves[0].grad)


@dataclass
class Impl:
    name: str
    ops: tuple
    build: Callable  # build(case, inputs) -> Runner
    usable: Callable = lambda case, device: (True, "")


def _omniattn(case: Case, x: Inputs) -> Runner:
    precision = case.options.get("precision", "exact")
    # quantized cases may name the FP8 P.V accumulator (QuantConfig.pv_accum); the default otherwise
    quant = dict(quant_config=oa.QuantConfig(pv_accum=case.options["pv_accum"])) if "pv_accum" in case.options else {}
    if case.op == "hstu":
        kw = dict(hstu_kwargs(case, x), **quant)
        return Runner(lambda: oa.hstu_attention(x.q, x.k, x.v, x.cu, case.seqlen, precision=precision, **kw),
                      x.leaves)
    kw = dict(score_kwargs(case), causal=case.causal, precision=precision, **quant)
    if x.cu is not None:
        return Runner(lambda: oa.attention_varlen(x.q, x.k, x.v, x.cu, x.cu, case.seqlen, case.seqlen, **kw), x.leaves)
    return Runner(lambda: oa.attention(x.q, x.k, x.v, **kw), x.leaves)


def _bhnd(x: Inputs):
    """Contiguous (B, H, N, D) leaves for SDPA-style APIs, detached copies that take gradients."""
    return [t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in x.leaves]


def _from_bhnd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _sdpa(backend_name: Optional[str]):
    def build(case: Case, x: Inputs) -> Runner:
        q, k, v = _bhnd(x)
        gqa = case.hkv != case.heads

        def run():
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa).transpose(1, 2)

        if backend_name is None:
            return Runner(run, [q, k, v], _from_bhnd)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def run_pinned():
            with sdpa_kernel(backend):
                return run()

        return Runner(run_pinned, [q, k, v], _from_bhnd)

    return build


def _flex(case: Case, x: Inputs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = _compiled_flex(flex_attention)
    device = x.q.device
    if x.cu is not None:
        # packed sequences as one batch row with a document mask (FlexAttention's varlen recipe)
        seq_id = torch.repeat_interleave(torch.arange(len(case.lens), device=device),
                                         torch.tensor(case.lens, device=device))
        leaves = [t.detach().unsqueeze(0).transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in x.leaves]

        def mask_mod(b, h, qi, ki):
            same = seq_id[qi] == seq_id[ki]
            return same & (ki <= qi) if case.causal else same

        n = seq_id.numel()
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=device)
        unpack = lambda o: o.transpose(1, 2)[0]  # noqa: E731
    else:
        leaves = _bhnd(x)
        n = case.seqlen
        block_mask = None
        if case.causal:
            block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, n, n, device=device)
        unpack = _from_bhnd
    gqa = case.hkv != case.heads
    q, k, v = leaves
    return Runner(lambda: unpack(compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)), leaves, unpack)


_FLEX = {}


def _compiled_flex(fn):
    if "fn" not in _FLEX:
        # every shape and mask is a recompile; past dynamo's default limit (8) it would silently
        # fall back to eager flex_attention, which materialises the scores
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        _FLEX["fn"] = torch.compile(fn, dynamic=False)
    return _FLEX["fn"]


def _eager(case: Case, x: Inputs):
    """The maths materialised: scores (B, H, N, N), the baseline every fused kernel exists to beat."""
    if case.op == "hstu":
        return _hstu_eager(case, x)
    q, k, v = _bhnd(x)
    g = case.heads // case.hkv
    scale = 1.0 / math.sqrt(case.head_dim)
    kw = score_kwargs(case)

    def run():
        kk = k.repeat_interleave(g, 1) if g > 1 else k
        vv = v.repeat_interleave(g, 1) if g > 1 else v
        s = torch.matmul(q, kk.transpose(-1, -2)) * scale
        if case.causal:
            n = s.shape[-1]
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), -math.inf if case.op == "softmax" else 0.0)
        if case.op == "softmax":
            p = torch.softmax(s.float(), -1).to(q.dtype)
        elif case.op == "sigmoid":
            p = torch.sigmoid(s + kw["sigmoid_bias"])
        else:
            p = F.silu(s) / kw["silu_norm"]
        if case.causal and case.op != "softmax":
            p = p.tril()
        return torch.matmul(p, vv).transpose(1, 2)

    return Runner(run, [q, k, v], _from_bhnd)


def _padded(x: Inputs, case: Case, t: torch.Tensor) -> torch.Tensor:
    """Jagged (T, H, D) -> padded (B, H, N, D), a copy that takes gradients."""
    out = t.new_zeros(len(case.lens), case.seqlen, t.shape[1], t.shape[2])
    for b, (s, n) in enumerate(zip(x.cu[:-1].tolist(), case.lens)):
        out[b, :n] = t[s:s + n].detach()
    return out.transpose(1, 2).requires_grad_(t.requires_grad)


def _unpad(case: Case, o: torch.Tensor) -> torch.Tensor:
    """Padded (B, H, N, D) -> jagged (T, H, D)."""
    o = o.transpose(1, 2)
    return torch.cat([o[b, :n] for b, n in enumerate(case.lens)])


def _hstu_dense_parts(case: Case, x: Inputs, with_bias: bool = True):
    """Padded q, k, v and HSTU's (B, 1, N, N) mask and (B, 1, N, N) shared bias, materialised."""
    from .. import reference

    q, k, v = (_padded(x, case, t) for t in x.leaves)
    kw = hstu_kwargs(case, x)
    n = case.seqlen
    mask = torch.zeros(len(case.lens), 1, n, n, dtype=torch.bool, device=q.device)
    bias = None
    rab = kw["rab"] if with_bias else None
    if rab is not None:
        bias = torch.zeros(len(case.lens), 1, n, n, device=q.device, dtype=torch.float32)
    starts = x.cu[:-1].tolist()
    for b, length in enumerate(case.lens):
        t = int(kw["num_targets"][b]) if kw["num_targets"] is not None else 0
        mask[b, 0, :length, :length] = reference.hstu_allowed_mask(length, True, t, device=q.device)
        if rab is not None:
            ts = kw["timestamps"][starts[b]:starts[b] + length]
            with torch.no_grad():
                bias[b, :, :length, :length] = reference.relative_bias(rab.pos_w.view(1, -1), rab.ts_w.view(1, -1), ts,
                                                                       rab.max_seq_len, rab.num_buckets,
                                                                       rab.bucketization, t)
    return q, k, v, mask, bias


def _hstu_sdpa(case: Case, x: Inputs) -> Runner:
    """SDPA on padded inputs with HSTU's mask as a boolean attn_mask: softmax, not SiLU, so a speed
    reference for the same masked work only (its error against HSTU's maths is not reported)."""
    q, k, v, mask, _ = _hstu_dense_parts(case, x, with_bias=False)
    run = lambda: _unpad(case, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))  # noqa: E731
    runner = Runner(run, [q, k, v], lambda g: _unpad(case, g))
    runner.comparable = False
    return runner


def _hstu_eager(case: Case, x: Inputs) -> Runner:
    """HSTU's formula materialised on padded inputs: silu(alpha q.k + rab) / N, masked, times V."""
    q, k, v, mask, bias = _hstu_dense_parts(case, x)
    alpha = 1.0 / math.sqrt(case.head_dim)

    def run():
        s = torch.matmul(q, k.transpose(-1, -2)) * alpha
        if bias is not None:
            s = s + bias.to(s.dtype)
        p = F.silu(s) / case.seqlen * mask
        return _unpad(case, torch.matmul(p, v))

    return Runner(run, [q, k, v], lambda g: _unpad(case, g))


def _eager_fits(case: Case, device: torch.device):
    if case.lens and case.op != "hstu":
        return False, "no varlen"
    score_bytes = case.batch * case.heads * case.seqlen**2 * 4
    limit = 6 << 30 if device.type == "cuda" else 1 << 31
    return score_bytes * (3 if case.mode == "fwdbwd" else 2) <= limit, "scores do not fit"


def _cuda_only(case: Case, device: torch.device):
    return device.type == "cuda", "CUDA only"


def _dense_cuda(case: Case, device: torch.device):
    if device.type != "cuda":
        return False, "CUDA only"
    return case.lens is None, "no varlen"


def _mask_fits(case: Case, device: torch.device):
    return case.batch * case.seqlen**2 <= (4 << 30), "mask does not fit"


# what a quantized case is timed against: exact bf16 kernels and SageAttention
QUANT_BASELINES = ("omniattn", "sdpa-cudnn", "sdpa-flash", "sageattention")

IMPLS = [
    Impl("omniattn", ("softmax", "sigmoid", "silu", "hstu"), _omniattn),
    Impl("sdpa-masked", ("hstu",), _hstu_sdpa, _mask_fits),
    Impl("sdpa", ("softmax",), _sdpa(None), lambda c, d: (d.type != "cuda" and c.lens is None, "CPU dispatch")),
    Impl("sdpa-flash", ("softmax",), _sdpa("FLASH_ATTENTION"), _dense_cuda),
    Impl("sdpa-cudnn", ("softmax",), _sdpa("CUDNN_ATTENTION"), _dense_cuda),
    Impl("sdpa-efficient", ("softmax",), _sdpa("EFFICIENT_ATTENTION"), _dense_cuda),
    Impl("flex", ("softmax",), _flex, _cuda_only),
    Impl("torch-eager", ("softmax", "sigmoid", "silu", "hstu"), _eager, _eager_fits),
]


def impls_for(case: Case, device: torch.device, only: Optional[list[str]] = None) -> list[Impl]:
    from .peers import PEER_IMPLS

    out = []
    for impl in IMPLS + PEER_IMPLS:
        precision = case.options.get("precision")
        if precision and impl.name != "omniattn" and (impl.name not in QUANT_BASELINES or precision != "int8"):
            continue  # baselines once per shape, in its INT8 case
        if case.op not in impl.ops or (only and impl.name not in only):
            continue
        ok, _ = impl.usable(case, device)
        if ok:
            out.append(impl)
    return out

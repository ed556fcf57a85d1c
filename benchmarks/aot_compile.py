"""Compile every Triton kernel variant for a GPU target without a GPU (catches compile errors early).

Runs the real launchers on CPU tensors, but replaces each kernel launch by an ahead-of-time
compile for the target (default sm_90) with the exact arguments and constexprs of that launch.
Useful with the Triton version of the GPU machine installed in a separate environment:

    python benchmarks/aot_compile.py            # prints one line per compiled variant
"""

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402

import omniattn as oa  # noqa: E402
from omniattn.backends import triton as tb  # noqa: E402
from omniattn.backends.triton import bwd, fwd, launch, rab_cache  # noqa: E402
from omniattn.backends.triton import quant as quant_kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SEEN: dict = {}

class Compiling:
    """Stands in for kernel[grid]: compiles instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return self

    def bind(self, grid, kwargs):  # as FastLaunch.bind (launch plans)
        return lambda *args: self(*args, **kwargs)

    def __call__(self, *args, num_warps=4, num_stages=3, maxnreg=None, **constexprs):
        names = self.kernel.arg_names
        values = dict(zip(names, args))
        values.update(constexprs)
        signature, consts, attrs = {}, {}, {}
        for i, name in enumerate(names):
            value, param = values[name], self.kernel.params[i]
            if param.is_constexpr:
                signature[name] = "constexpr"
                consts[name] = value
                continue
            # specialize as the JIT does on a GPU (16-aligned pointers and ints divisible by 16 become
            # hints, ints equal to 1 constants), else the SASS differs from what runs: no vector loads
            kind, hint = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                                not param.do_not_specialize_on_alignment)
            if kind == "constexpr":
                signature[name] = "constexpr"
                consts[name] = hint
            else:
                signature[name] = kind
                if hint == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        key = (self.kernel.__name__, tuple(sorted((k, str(v)) for k, v in consts.items())), num_warps, num_stages)
        if key in SEEN:
            return
        start = time.time()
        if getattr(self.kernel, "is_gluon", lambda: False)():
            from triton.experimental.gluon._runtime import GluonASTSource as Source
        else:
            Source = triton.compiler.ASTSource
        src = Source(fn=self.kernel, signature=signature, constexprs=consts, attrs=attrs)
        options = dict(num_warps=num_warps, num_stages=num_stages)
        if maxnreg is not None:
            options["maxnreg"] = maxnreg
        compiled = triton.compile(src, target=TARGET, options=options)
        SEEN[key] = compiled
        flags = ",".join(k for k, v in consts.items() if v is True)
        blocks = "x".join(str(consts[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if k in consts)
        print(f"{self.kernel.__name__:<28} {time.time() - start:5.1f}s {blocks:<12} w{num_warps} s{num_stages} "
              f"{resources(compiled)}  {flags}", flush=True)


def _ptxas() -> str | None:
    """The ptxas Triton itself uses for sm_90 (its own bundled one), else one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(TARGET.arch).path
    except Exception:  # an older Triton without the helper
        return shutil.which("ptxas")


def resources(compiled) -> str:
    """Registers, spills and shared memory, from ptxas -v on the kernel's PTX."""
    shared = compiled.metadata.shared
    ptxas = _ptxas()
    if not ptxas:
        return f"smem {shared // 1024}K"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    done = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spill = re.search(r"(\d+) bytes spill stores", done.stderr)
    return f"regs {regs.group(1) if regs else '?'} spill {spill.group(1) if spill else '?'} smem {shared // 1024}K"


def install() -> None:
    """Kernel launches become compiles; CPU tensors are accepted as if on the GPU target."""
    for mod, name in ((fwd, "attn_fwd_kernel"), (bwd, "attn_bwd_dkdv_kernel"), (bwd, "attn_bwd_dq_kernel"),
                      (bwd, "attn_bwd_preprocess_kernel"), (bwd, "rab_grad_reduce_kernel"),
                      (rab_cache, "rab_cache_kernel")):
        setattr(launch, name, Compiling(getattr(mod, name)))
    for name in ("kv_stats_kernel", "kv_stats_finish_kernel", "quant_kv_kernel", "quant_q_kernel"):  # quantization (their outputs stay empty)
        setattr(launch, name, Compiling(getattr(quant_kernels, name)))
    tb.supported = lambda device, explicit=False: (True, "")
    from omniattn import backends

    backends.triton_supported = lambda device, explicit=False: (True, "")
    # the flags a GPU launch sets from q.is_cuda: the inline-PTX gathers and log estimate, and
    # the one-instruction tanh for 16-bit inputs (float32 products are IEEE there)
    init = launch._Launch.__init__

    def as_on_gpu(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.meta.update(GPU_GATHER=True, FAST_MATH=self.meta["DOT_PRECISION"] != "ieee")

    launch._Launch.__init__ = as_on_gpu


def hstu_long(int64: bool) -> None:
    """HSTU with the relative bias on a sequence >= 2048 (128x64 tiles, forward and backward), with
    64-bit addressing forced or not, and without the bias over query windows (context parallel);
    prints one line per variant then the variant keys (tests/test_gpu_compile.py)."""
    if int64:
        launch._needs_int64 = lambda *args: True
    n = 2100
    offsets = torch.tensor([0, n, n + 50])
    q = torch.randn(n + 50, 2, 128).to(torch.bfloat16).requires_grad_()
    rab = oa.hstu.RelativeBias(n, 16)
    for table_mb in ("64", "0"):  # the bias read from the call's table (rab_cache, opt-in), then per pair
        os.environ[rab_cache.BUDGET_ENV] = table_mb
        out = oa.hstu_attention(q, q, q, offsets, n, backend="triton", rab=rab, timestamps=torch.arange(n + 50))
        out.sum().backward()
    os.environ.pop(rab_cache.BUDGET_ENV)
    import dataclasses

    from omniattn import backends, spec

    s, call = spec.hstu_call(q, q, q, offsets, n, alpha=0.1, causal=True, num_targets=None, contextual_seq_len=0,
                             max_attn_len=0, rab=None, timestamps=None, silu_norm=None, precision="exact",
                             backend="triton")
    call = dataclasses.replace(call, query_windows=(((0, 500), (1600, 2100)), ((0, 50),)))
    backends.run(s, call, "triton")[0].sum().backward()
    for name, consts, _, _ in SEEN:
        c = dict(consts)
        print(f"VARIANT {name} {c.get('BLOCK_M')}x{c.get('BLOCK_N')} INT64_OFFSETS={c.get('INT64_OFFSETS')} "
              f"HAS_Q_WIN={c.get('HAS_Q_WIN')} HAS_RAB={c.get('HAS_RAB')} RAB_CACHED={c.get('RAB_CACHED')}")


def tma() -> None:
    """The non-causal forward with TMA descriptors (Hopper's path), softmax and sigmoid, dense and
    varlen, bf16 and fp16, head dim 128 and 96 (zero-filled columns), and the quantized precisions
    (with the quantization kernels); prints the variant keys."""
    launch._tma_ok = lambda *args: True
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 96)):
        q = torch.randn(2, 300, 4, d).to(dtype)
        oa.attention(q, q, q, backend="triton")
        oa.attention(q, q, q, score="sigmoid", backend="triton")
        offsets = torch.tensor([0, 100, 256])
        for score in ("softmax", "sigmoid"):
            oa.attention_varlen(q[0, :256], q[0, :256], q[0, :256], offsets, offsets, 156, 156, score=score,
                                backend="triton")
    with torch.no_grad():  # quantized: INT8 / INT4 K and FP8 V^T descriptors, dense and packed
        q = torch.randn(2, 256, 4, 128).to(torch.bfloat16)
        for precision in ("int8", "int8-fp8", "fp8", "int4-fp8"):
            oa.attention(q, q, q, precision=precision, backend="triton")
        offsets = torch.tensor([0, 100, 256])
        oa.attention_varlen(q[0], q[0], q[0], offsets, offsets, 156, 156, precision="int8-fp8", backend="triton")
    for (name, consts, _, _), compiled in SEEN.items():
        c = dict(consts)
        # single-byte global stores (the quantization kernel's FP8 V^T must store 16-byte vectors)
        byte_stores = len(re.findall(r"st\.global(?:\.\w+)*?\.[bsu]8\b", compiled.asm["ptx"]))
        print(f"VARIANT {name} USE_TMA={c.get('USE_TMA')} IS_VARLEN={c.get('IS_VARLEN')} SCORE={c.get('SCORE')} "
              f"QK_MODE={c.get('QK_MODE')} PV_FP8={c.get('PV_FP8')} BYTE_STORES={byte_stores}")


def sm90() -> None:
    """Hopper's Gluon forward (fwd_sm90) and backward (bwd_sm90): softmax, sigmoid and SiLU, causal
    or not, dense (GQA) and packed, bf16 and fp16 with head dims 128 and 96 (and 256: forward only),
    softmax with a sliding window, softcap and ALiBi (their backward: the template's), and HSTU
    (causal, with targets; non-causal with a contextual prefix and max_attn_len); prints the
    variant keys."""
    module, _ = launch._sm90_kernel()
    launch._GLUON["fwd_sm90"] = (module, Compiling(module.attn_fwd_sm90_kernel))
    bwd_module, _ = launch._sm90_bwd_kernel()
    launch._GLUON["bwd_sm90"] = (bwd_module, Compiling(bwd_module.attn_bwd_sm90_kernel))
    launch.sm90_forward_ok = lambda *args, quant=None, **kwargs: quant is None or (
        quant.qk_mode in (1, 3) and quant.q_mean is None and not (quant.pv_fp8 and quant.pv_two_level))
    launch.sm90_backward_ok = lambda q, k, v, dout, x, p, max_q, max_k: (p.softcap == 0 and x.alibi is None
                                                                        and q.shape[-1] <= 128)
    launch.sm90_programs = lambda device, items: items  # (no GPU to count SMs on)

    def grad(out):
        out.float().sum().backward()

    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 96)):
        q = torch.randn(2, 300, 4, d).to(dtype).requires_grad_()
        kv = torch.randn(2, 300, 2, d).to(dtype).requires_grad_()
        offsets = torch.tensor([0, 100, 256])
        packed = q.detach()[0, :256].requires_grad_()
        for score, causal in itertools.product(("softmax", "sigmoid", "silu"), (False, True)):
            grad(oa.attention(q, kv, kv, score=score, causal=causal, backend="triton"))
            grad(oa.attention_varlen(packed, packed, packed, offsets, offsets, 156, 156, score=score, causal=causal,
                                     backend="triton"))
    with torch.no_grad():  # head dim 256 (its backward: the template's)
        q = torch.randn(2, 300, 4, 256).to(torch.bfloat16)
        for score, causal in itertools.product(("softmax", "sigmoid", "silu"), (False, True)):
            oa.attention(q, q, q, score=score, causal=causal, backend="triton")
        wide = q[0, :256]
        oa.attention_varlen(wide, wide, wide, offsets, offsets, 156, 156, causal=True, backend="triton")
    q = torch.randn(2, 300, 4, 128).to(torch.bfloat16).requires_grad_()
    grad(oa.attention(q, q, q, window=(64, 0), backend="triton"))
    grad(oa.attention(q, q, q, window=(32, 32), softcap=30.0, backend="triton"))
    grad(oa.attention(q, q, q, causal=True, alibi_slopes=torch.rand(4), backend="triton"))
    jagged = q.detach()[0, :256].requires_grad_()
    for kw in (dict(), dict(num_targets=torch.tensor([3, 5])), dict(contextual_seq_len=2, max_attn_len=16, causal=False)):
        grad(oa.hstu_attention(jagged, jagged, jagged, offsets, 160, backend="triton", **kw))
    with torch.no_grad():  # quantized forwards, FP8 P.V in one accumulator (the quantization kernels: the template's)
        kv = torch.randn(2, 256, 2, 128).to(torch.bfloat16)
        one = oa.QuantConfig(pv_accum="fp32")
        for precision, score, causal in itertools.product(("int8", "int8-fp8", "fp8"), ("softmax", "sigmoid", "silu"),
                                                          (False, True)):
            oa.attention(q.detach()[:, :256], kv, kv, score=score, causal=causal, precision=precision,
                         quant_config=one, backend="triton")
        oa.attention(q.detach()[:, :256], kv, kv, precision="int8-fp8", quant_config=one, return_lse=True,
                     backend="triton")
        oa.attention_varlen(packed.detach(), packed.detach(), packed.detach(), offsets, offsets, 156, 156,
                            causal=True, precision="int8-fp8", quant_config=one, backend="triton")
        oa.hstu_attention(jagged.detach(), jagged.detach(), jagged.detach(), offsets, 160, precision="int8",
                          num_targets=torch.tensor([3, 5]), backend="triton")
    keys = ("SCORE", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "IS_VARLEN", "MASK_KIND", "HSTU_CAUSAL",
            "HAS_TARGETS", "HAS_CONTEXT", "HAS_MAX_ATTN", "QK_MODE", "PV_FP8", "HAS_ROW_BIAS", "HEAD_DIM")
    for name, consts, _, _ in SEEN:
        c = dict(consts)
        print(f"VARIANT {name} " + " ".join(f"{k}={c.get(k)}" for k in keys))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="bf16 only")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--scores", nargs="+", default=["softmax", "sigmoid", "silu"])
    parser.add_argument("--dense-only", action="store_true", help="skip the window/softcap/varlen/HSTU variants")
    parser.add_argument("--hstu-long", choices=["int32", "int64"], help="only HSTU+bias on a long sequence")
    parser.add_argument("--tma", action="store_true", help="only the forward's TMA variants")
    parser.add_argument("--sm90", action="store_true", help="only Hopper's Gluon forward and backward")
    args = parser.parse_args()
    install()
    if args.hstu_long:
        return hstu_long(args.hstu_long == "int64")
    if args.sm90:
        return sm90()
    if args.tma:
        return tma()
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float32]
    for dtype, score, causal, d in itertools.product(dtypes, args.scores, [False, True], args.dims):
        q = torch.randn(1, 256, 4, d, generator=g).to(dtype).requires_grad_()
        k = torch.randn(1, 256, 2, d, generator=g).to(dtype).requires_grad_()
        out = oa.attention(q, k, k, score=score, causal=causal, backend="triton")
        out.sum().backward()
    if args.dense_only:
        return
    for extra in (dict(window=(64, 0)), dict(softcap=5.0, alibi_slopes=torch.rand(4))):
        q = torch.randn(1, 256, 4, 64, generator=g).to(torch.bfloat16).requires_grad_()
        out = oa.attention(q, q, q, backend="triton", **extra)
        out.sum().backward()
    offsets = torch.tensor([0, 100, 256])
    q = torch.randn(256, 2, 128, generator=g).to(torch.bfloat16).requires_grad_()
    rab = oa.hstu.RelativeBias(160, 32)
    for kw in (dict(), dict(num_targets=torch.tensor([3, 5]), rab=rab, timestamps=torch.arange(256)),
               dict(contextual_seq_len=2, max_attn_len=16, causal=False)):
        out = oa.hstu_attention(q, q, q, offsets, 160, backend="triton", **kw)
        out.sum().backward()
    # 64-bit addressing (chosen per call for offsets reaching 2^31 elements): the same kernels with it forced
    launch._needs_int64 = lambda *args: True
    out = oa.attention(q[None], q[None], q[None], causal=True, backend="triton")
    out.sum().backward()
    out = oa.hstu_attention(q, q, q, offsets, 160, backend="triton", rab=rab, timestamps=torch.arange(256))
    out.sum().backward()
    print(f"compiled {len(SEEN)} kernel variants for {TARGET} with triton {triton.__version__}")


if __name__ == "__main__":
    main()

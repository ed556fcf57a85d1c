"""The `omniattn` command: info, check, bench (the main job), plot and recsys.

Every mistake a user can make (a missing file, an unknown dataset, a backend this machine lacks,
a bad argument value, a damaged data file or checkpoint) ends in one line on stderr and exit
code 2, never a traceback. A traceback means a bug in omniattn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

SUPPORT = [
    # feature, torch (tiled), triton, reference
    ("softmax / sigmoid / silu scores", "yes", "yes", "yes"),
    ("causal (bottom-right), sliding window", "yes", "yes", "yes"),
    ("varlen (packed, cu_seqlens)", "yes", "yes", "yes"),
    ("GQA / MQA", "yes", "yes", "yes"),
    ("ALiBi, softcap", "yes", "yes", "yes"),
    ("return_lse (softmax), lse gradient", "yes", "yes", "yes"),
    ("HSTU masks (targets, contextual, max_attn_len)", "yes", "yes", "yes"),
    ("HSTU relative position+time bias (+weight grads)", "yes", "yes", "yes"),
    ("backward for all of the above", "yes", "yes", "autograd"),
    ("dtypes", "fp16 bf16 fp32 fp64", "fp16 bf16 fp32", "any float"),
    ("memory", "O(N)", "O(N)", "O(N^2)"),
    ("quantized precisions (int8, fp8, int4)", "no", "no", "no"),
]


class CliError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _device(arg: str | None) -> torch.device:
    """--device, checked: a name torch knows, on a device this machine has."""
    if not arg:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise CliError(f"--device {arg}: expected a device such as cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {arg}: this machine has no CUDA GPU that torch {torch.__version__} can use")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:  # an index past the last GPU, a backend this torch lacks
        first = (str(e).strip().splitlines() or ["unusable"])[0]
        raise CliError(f"--device {arg}: not usable here ({first[:120]})") from None
    return device


def _output_path(flag: str, path: str | None) -> None:
    """Check an output path before the work that fills it, not after a long run."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise CliError(f"{flag} {path}: is a folder, expected a file name")
    if not os.access(folder, os.W_OK):
        raise CliError(f"{flag} {path}: cannot write in {folder}")


def cmd_info(args) -> int:
    from . import __version__
    from .backends import triton_supported
    from .bench import device_name

    device = _device(args.device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed (pip install 'omniattn[triton]' on CUDA machines)"
    print(f"omniattn {__version__}  torch {torch.__version__}  triton {triton_version}")
    print(f"device: {device} ({device_name(device)})")
    ok, why = triton_supported(device)
    print("backends:")
    print("  torch      available (tiled, O(N) memory, any device)")
    print(f"  triton     {'available' if ok else 'unavailable: ' + why}")
    print("  reference  available (materialised maths, for testing)")
    print(f"  auto       -> {'triton' if ok else 'torch'}")
    print()
    print(f"{'feature':<50} {'torch':<20} {'triton':<16} {'reference'}")
    for row in SUPPORT:
        print(f"{row[0]:<50} {row[1]:<20} {row[2]:<16} {row[3]}")
    return 0


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _check_backends(requested: str | None, device: torch.device) -> list[str]:
    """The backends `check` runs: all available here, or the one asked for if it is available."""
    from .backends import triton_supported

    ok, why = triton_supported(device, explicit=requested == "triton")
    available = ["torch"] + (["triton"] if ok else [])
    if requested and requested not in available:
        raise CliError(f"--backend {requested}: not available here ({why}); available: {', '.join(available)}")
    return [requested] if requested else available


def cmd_check(args) -> int:
    from .check import run_check

    device = _device(args.device)
    backends = _check_backends(args.backend, device)
    dtype = DTYPES[args.dtype]
    rows = run_check(backends, device, dtype, seed=args.seed)
    print(f"{'case':<36} {'backend':<8} {'out err':>9} {'grad err':>9}  result")
    for r in rows:
        verdict = "ok" if r.ok else f"MISMATCH ({r.worst})"
        print(f"{r.case:<36} {r.backend:<8} {r.err_out:9.1e} {r.err_grad:9.1e}  {verdict}")
    bad = sum(not r.ok for r in rows)
    print(f"\n{len(rows) - bad}/{len(rows)} match the reference ({dtype}, {device})")
    return 1 if bad else 0


def _bench_cases(args, device: torch.device) -> tuple[str, list]:
    """The suite's problems after --op / --max-seqlen; an empty selection is a mistake, not a run."""
    from .bench import SUITES, default_suite

    suite = args.suite or default_suite(device)
    cases = SUITES[suite]()
    if args.op:
        cases = [c for c in cases if c.op in args.op]
    if args.max_seqlen:
        cases = [c for c in cases if c.seqlen <= args.max_seqlen]
    if not cases:
        raise CliError(f"bench: suite '{suite}' has no problems with --op {' '.join(args.op or ['(any)'])} "
                       f"and --max-seqlen {args.max_seqlen}")
    return suite, cases


def _check_impls(names: list | None) -> None:
    from .bench import IMPLS
    from .bench.peers import PEER_IMPLS

    known = [i.name for i in IMPLS + PEER_IMPLS]
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise CliError(f"--impl {' '.join(unknown)}: unknown; expected some of {', '.join(known)}")


def _check_matplotlib(flag: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(f"{flag}: needs matplotlib; pip install 'omniattn[plot]'") from None


class _LiveOutput:
    """What `bench` does as each problem finishes: print its rows, rewrite the JSON and the plot,
    so that an interrupted run has shown and saved everything it measured."""

    def __init__(self, args, name: str, metric: str):
        self.args, self.name, self.metric, self.printed = args, name, metric, 0

    def __call__(self, rows: list) -> None:
        from .bench import plot, write_json
        from .bench.report import problem_key, problem_lines

        new = rows[self.printed:]
        self.printed = len(rows)
        groups: dict = {}
        for r in new:
            groups.setdefault(problem_key(r), []).append(r)
        for rs in groups.values():
            print("\n".join(problem_lines(rs, rows)), flush=True)
        if self.args.json:
            write_json(self.args.json, self.name, rows)
        if self.args.plot:
            plot(rows, self.args.plot, title=self.name, metric=self.metric)


def cmd_bench(args) -> int:
    from .bench import device_name, run_bench
    from .bench.load import background_load
    from .bench.report import HEADER, LEGEND

    device = _device(args.device)
    _check_impls(args.impl)
    for peer in args.peer:
        from .bench import peers

        try:
            peers.register(peer)
        except ValueError as e:
            raise CliError(str(e)) from None
    _output_path("--json", args.json)
    _output_path("--plot", args.plot)
    if args.plot:
        _check_matplotlib("--plot")
    suite, cases = _bench_cases(args, device)
    name = device_name(device)
    load = f", {args.background_load} busy background processes" if args.background_load else ""
    print(f"omniattn bench: suite '{suite}' on {name}{load}, {len(cases)} problems", file=sys.stderr)
    print(LEGEND)
    print(HEADER, flush=True)
    extra = dict(threads=torch.get_num_threads(), background_load=args.background_load)
    live = _LiveOutput(args, name, "tflops" if device.type == "cuda" else "ms")
    with background_load(args.background_load):
        rows = run_bench(cases, device, only=args.impl, progress=not args.no_progress, on_rows=live, extra=extra)
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"failed: {r['op']} {r['impl']} {r['batch']}x{r['seqlen']} {r['mode']}: {r['error']}", file=sys.stderr)
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}", file=sys.stderr)
    omni_failed = [r for r in failed if r["impl"] == "omniattn"]
    return 1 if omni_failed else 0


def _results(path: str) -> dict:
    """A results JSON file (DESIGN.md's format), checked enough to chart."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise CliError(f"{path}: no such results file") from None
    except json.JSONDecodeError as e:
        raise CliError(f"{path}:{e.lineno}: expected a results JSON file, found invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise CliError(f"{path}: expected a results JSON file, found binary data") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise CliError(f"{path}: expected a results document with a 'rows' list (omniattn bench --json)")
    needed = {"op", "impl", "mode", "batch", "seqlen", "causal", "ms", "tflops"}
    for i, r in enumerate(doc["rows"]):
        if not isinstance(r, dict) or not needed <= set(r):
            raise CliError(f"{path}: row {i} lacks some of {sorted(needed)}")
    return doc


def cmd_plot(args) -> int:
    from .bench import plot

    _check_matplotlib("plot")
    doc = _results(args.results)
    _output_path("OUT", args.out)
    rows = [r for r in doc["rows"] if args.op is None or r["op"] in args.op]
    if not rows:
        raise CliError(f"{args.results}: no rows{' for --op ' + ' '.join(args.op) if args.op else ''}")
    plot(rows, args.out, title=f"{doc.get('device')} (torch {doc.get('torch')}, triton {doc.get('triton')})",
         metric=args.metric)
    print(f"wrote {args.out}")
    return 0


def _metrics_table(rows: dict) -> str:
    ks = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200")
    lines = [f"{'':<12}" + "".join(f"{k:>10}" for k in ks)]
    for name, m in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{m[k]:>10.4f}" for k in ks))
    return "\n".join(lines)


def _dataset(spec: str):
    """--dataset loaded; a malformed file is a DataError (path:line: expected ..., found ...)."""
    from .recsys import load
    from .recsys.data import DataError

    try:
        return load(spec)
    except DataError:
        raise
    except ValueError as e:  # an unknown name or a missing PATH: the argument, not a file
        raise CliError(f"--dataset {spec}: {str(e).removeprefix('dataset: ')}") from None


def _check_resume(args) -> None:
    if not args.resume:
        return
    if not args.checkpoint:
        raise CliError("--resume: continues from --checkpoint PATH; give --checkpoint too")
    if not os.path.exists(args.checkpoint):
        raise CliError(f"--resume: no checkpoint at {args.checkpoint}")


def cmd_recsys_train(args) -> int:
    import dataclasses

    from .recsys import Trainer, popularity_metrics
    from .recsys.train import TrainConfig

    device = _device(args.device)
    if args.model == "sasrec" and args.dim % args.heads:
        raise CliError(f"--heads {args.heads}: SASRec splits --dim {args.dim} across heads; give a divisor of it")
    _check_resume(args)
    _output_path("--checkpoint", args.checkpoint)
    _output_path("--json", args.json)
    cfg = TrainConfig(model=args.model, dim=args.dim, blocks=args.blocks, heads=args.heads, max_len=args.max_len,
                      dropout=args.dropout, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      negatives=args.negatives, temperature=args.temperature,
                      stochastic_length=args.stochastic_length, seed=args.seed, device=str(device))
    data = _dataset(args.dataset)
    trainer = Trainer(cfg, data, args.dataset)
    if args.resume:
        trainer.load(args.checkpoint)
        print(f"resumed from {args.checkpoint} after epoch {trainer.state.epoch}", file=sys.stderr)
    print(f"{cfg.model} on {data.name}: {data.num_users} users, {data.num_items} items, "
          f"{sum(p.numel() for p in trainer.model.parameters())} parameters", file=sys.stderr)

    def progress(epoch, i, n, loss):
        if not args.no_progress:
            done = int(30 * i / max(n, 1))
            sys.stderr.write(f"\r  epoch {epoch + 1} [{'#' * done}{'.' * (30 - done)}] {i}/{n} loss {loss:.3f}")
            sys.stderr.flush()

    def on_epoch(row):
        if not args.no_progress:
            sys.stderr.write("\n")
        print(f"epoch {row['epoch']}/{cfg.epochs} loss {row['loss']:.4f} valid hr@10 {row['hr@10']:.4f} "
              f"ndcg@10 {row['ndcg@10']:.4f} ({row['seconds']:.1f}s)", flush=True)
        if args.checkpoint:
            trainer.save(args.checkpoint)

    trainer.fit(on_epoch=on_epoch, progress=progress)
    test = trainer.test()
    results = {cfg.model: test, "popularity": popularity_metrics(trainer.split, "test")}
    print(f"\ntest (best validation epoch {trainer.state.best_epoch}):")
    print(_metrics_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=dataclasses.asdict(cfg), dataset=args.dataset, best_epoch=trainer.state.best_epoch,
                           history=trainer.state.history, test=results), f, indent=1)
    return 0


def cmd_recsys_eval(args) -> int:
    from .recsys import Split, evaluate, load_model, popularity_metrics

    device = _device(args.device)
    model, cfg, spec = load_model(args.checkpoint, device)
    data = _dataset(args.dataset or spec)
    if data.num_items != model.num_items:
        raise CliError(f"--dataset {args.dataset or spec}: has {data.num_items} items, the model in "
                       f"{args.checkpoint} was trained on {model.num_items}")
    split = Split.leave_one_out(data)
    results = {cfg.model: evaluate(model, split, args.split, device=device),
               "popularity": popularity_metrics(split, args.split)}
    print(f"{args.split} on {args.dataset or spec}:")
    print(_metrics_table(results))
    return 0


# argument parsing -----------------------------------------------------------------------------


class _Formatter(argparse.HelpFormatter):
    """--help shows each option's default (where it has one worth showing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "%(default)" in text or hidden or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (no usage block), pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, minimum=None, below=None, strict=False):
    """An argparse type: ``kind`` (int or float) >= minimum (> minimum if strict), < below."""
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if strict else '>='} {minimum}")
    if below is not None:
        bounds.append(f"< {below}")
    what = f"{'an int' if kind is int else 'a number'}{' ' + ' and '.join(bounds) if bounds else ''}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        too_low = minimum is not None and (value <= minimum if strict else value < minimum)
        if too_low or (below is not None and value >= below) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


POSITIVE = _number(int, 1)
POSITIVE_FLOAT = _number(float, 0, strict=True)


def _add(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omniattn", description="Fused, memory-efficient attention kernels.",
                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,check,bench,plot,recsys}")

    p = _add(sub, "info", "device, available backends and the support matrix")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda if available, else cpu)")
    p.set_defaults(fn=cmd_info)

    p = _add(sub, "check", "every available backend against the reference; non-zero exit on a mismatch")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=["torch", "triton"], help="only this backend (default: every one available)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the inputs")
    p.add_argument("--seed", type=_number(int, 0), default=0, help="seed of the random inputs")
    p.add_argument("--threads", type=POSITIVE, help="torch threads (default: torch's choice, usually the cores)")
    p.set_defaults(fn=cmd_check)

    p = _add(sub, "bench", "time omniattn against PyTorch's attention on this device (the main job)")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda if available, else cpu)")
    p.add_argument("--suite", choices=["cpu", "gpu", "gpu-full", "kernels", "hstu", "quant", "smoke"],
                   help="size set (default: cpu or gpu, by device; kernels: the kernel template's matrix; "
                        "gpu-full: kernels + hstu + quant)")
    p.add_argument("--gpu-suite", dest="suite", action="store_const", const="gpu-full",
                   help="the full GPU matrix (softmax/sigmoid/silu, HSTU, quantized)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=PATH",
                   help="time a peer from a local checkout beside omniattn: generative-recommenders=PATH")
    p.add_argument("--op", nargs="+", choices=["softmax", "sigmoid", "silu", "hstu"], help="only these ops")
    p.add_argument("--impl", nargs="+", help="only these implementations (e.g. omniattn sdpa torch-eager)")
    p.add_argument("--max-seqlen", type=POSITIVE, help="skip problems longer than this")
    p.add_argument("--threads", type=POSITIVE, help="torch threads (default: torch's choice, usually the cores)")
    p.add_argument("--background-load", type=_number(int, 0), default=0, metavar="N",
                   help="run N busy processes (single-threaded matrix products) beside the benchmark")
    p.add_argument("--json", help="write rows in DESIGN.md's results format to this path, after every problem")
    p.add_argument("--plot", help="write a PNG chart to this path, after every problem")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(fn=cmd_bench)

    p = _add(sub, "plot", "chart a results JSON file")
    p.add_argument("results", help="a file written by omniattn bench --json")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--op", nargs="+", help="only these ops")
    p.add_argument("--metric", default="auto", choices=["auto", "ms", "tflops"],
                   help="bar height; auto: TFLOPS if the median row reaches 1 TFLOPS (GPUs), else ms")
    p.set_defaults(fn=cmd_plot)

    rec = _add(sub, "recsys", "train and evaluate HSTU / SASRec sequential recommenders")
    rsub = rec.add_subparsers(dest="recsys_command", required=True, metavar="{train,eval}")
    p = _add(rsub, "train", "leave-one-out training with sampled softmax; full-ranking HR/NDCG")
    p.add_argument("--dataset", default="synthetic", help="synthetic | ml-100k[:PATH] | ml-1m:PATH | ml-20m:PATH")
    p.add_argument("--model", default="hstu", choices=["hstu", "sasrec"], help="the recommender")
    p.add_argument("--epochs", type=POSITIVE, default=20, help="total epochs (with --resume: including done ones)")
    p.add_argument("--batch-size", type=POSITIVE, default=128, help="users per step")
    p.add_argument("--dim", type=POSITIVE, default=50, help="embedding width")
    p.add_argument("--blocks", type=POSITIVE, default=2, help="attention blocks")
    p.add_argument("--heads", type=POSITIVE, default=1, help="attention heads")
    p.add_argument("--max-len", type=POSITIVE, default=200, help="longest history used (most recent items)")
    p.add_argument("--dropout", type=_number(float, 0, below=1), default=0.2, help="dropout probability")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3, help="Adam learning rate")
    p.add_argument("--negatives", type=POSITIVE, default=128, help="uniform negatives of the sampled softmax")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, default=0.05, help="of the sampled softmax")
    p.add_argument("--stochastic-length", type=POSITIVE_FLOAT, metavar="ALPHA",
                   help="HSTU's Stochastic Length, e.g. 1.6 (default: off)")
    p.add_argument("--seed", type=_number(int, 0), default=0, help="seed of initialisation and sampling")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda if available, else cpu)")
    p.add_argument("--checkpoint", help="save here after every epoch (atomically, with a checksum)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--json", help="write the per-epoch history and test metrics")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--threads", type=POSITIVE, help="torch threads (default: torch's choice, usually the cores)")
    p.set_defaults(fn=cmd_recsys_train)
    p = _add(rsub, "eval", "evaluate a checkpoint (best validation weights)")
    p.add_argument("--checkpoint", required=True, help="a file written by recsys train --checkpoint")
    p.add_argument("--dataset", help="default: the dataset it was trained on")
    p.add_argument("--split", default="test", choices=["valid", "test"], help="leave-one-out target to rank")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=POSITIVE, help="torch threads (default: torch's choice, usually the cores)")
    p.set_defaults(fn=cmd_recsys_eval)
    return parser


def _user_errors() -> tuple:
    """Exceptions that are the user's mistake, not omniattn's: reported in one line."""
    from .recsys.data import DataError
    from .recsys.train import CheckpointError

    return CliError, DataError, CheckpointError


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.fn(args)
    except _user_errors() as e:
        print(f"omniattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nomniattn: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file we were told to write or read: full disk, no permission, ...
        if e.filename is None:
            raise
        print(f"omniattn: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    finally:  # main() called as a function (tests, notebooks) leaves torch's thread count as it was
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())

"""The `omniattn` command: info, check, bench (the main job) and plot."""

from __future__ import annotations

import argparse
import json
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


def _device(arg: str | None) -> torch.device:
    if arg:
        return torch.device(arg)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cmd_info(args) -> int:
    from . import __version__
    from .backends import triton_supported
    from .bench import device_name

    device = _device(args.device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"omniattn {__version__}  torch {torch.__version__}  triton {triton_version}")
    print(f"device: {device} ({device_name(device)})")
    ok, why = triton_supported(device)
    print("backends:")
    print(f"  torch      available (tiled, O(N) memory, any device)")
    print(f"  triton     {'available' if ok else 'unavailable: ' + why}")
    print(f"  reference  available (materialised maths, for testing)")
    print(f"  auto       -> {'triton' if ok else 'torch'}")
    print()
    print(f"{'feature':<50} {'torch':<20} {'triton':<16} {'reference'}")
    for row in SUPPORT:
        print(f"{row[0]:<50} {row[1]:<20} {row[2]:<16} {row[3]}")
    return 0


def cmd_check(args) -> int:
    from .backends import triton_supported
    from .check import run_check

    device = _device(args.device)
    backends = ["torch"] + (["triton"] if triton_supported(device)[0] else [])
    if args.backend:
        backends = [args.backend]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[args.dtype]
    rows = run_check(backends, device, dtype, seed=args.seed)
    print(f"{'case':<36} {'backend':<8} {'out err':>9} {'grad err':>9}  result")
    for r in rows:
        verdict = "ok" if r.ok else f"MISMATCH ({r.worst})"
        print(f"{r.case:<36} {r.backend:<8} {r.err_out:9.1e} {r.err_grad:9.1e}  {verdict}")
    bad = sum(not r.ok for r in rows)
    print(f"\n{len(rows) - bad}/{len(rows)} match the reference ({dtype}, {device})")
    return 1 if bad else 0


def cmd_bench(args) -> int:
    from .bench import SUITES, default_suite, device_name, plot, run_bench, table, write_json

    device = _device(args.device)
    suite = args.suite or default_suite(device)
    cases = SUITES[suite]()
    if args.op:
        cases = [c for c in cases if c.op in args.op]
    if args.max_seqlen:
        cases = [c for c in cases if c.seqlen <= args.max_seqlen]
    name = device_name(device)
    print(f"omniattn bench: suite '{suite}' on {name}, {len(cases)} problems", file=sys.stderr)
    save = (lambda rows: write_json(args.json, name, rows)) if args.json else None
    rows = run_bench(cases, device, only=args.impl, progress=not args.no_progress, on_rows=save)
    print(table(rows))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"failed: {r['op']} {r['impl']} {r['batch']}x{r['seqlen']} {r['mode']}: {r['error']}", file=sys.stderr)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot, title=name)
        print(f"wrote {args.plot}", file=sys.stderr)
    omni_failed = [r for r in failed if r["impl"] == "omniattn"]
    return 1 if omni_failed else 0


def cmd_plot(args) -> int:
    from .bench import plot

    with open(args.results) as f:
        doc = json.load(f)
    rows = [r for r in doc["rows"] if args.op is None or r["op"] in args.op]
    plot(rows, args.out, title=f"{doc.get('device')} (torch {doc.get('torch')}, triton {doc.get('triton')})")
    print(f"wrote {args.out}")
    return 0


def _metrics_table(rows: dict) -> str:
    ks = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200")
    lines = [f"{'':<12}" + "".join(f"{k:>10}" for k in ks)]
    for name, m in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{m[k]:>10.4f}" for k in ks))
    return "\n".join(lines)


def cmd_recsys_train(args) -> int:
    import dataclasses
    import os

    from .recsys import Trainer, load, popularity_metrics
    from .recsys.train import TrainConfig

    cfg = TrainConfig(model=args.model, dim=args.dim, blocks=args.blocks, heads=args.heads, max_len=args.max_len,
                      dropout=args.dropout, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      negatives=args.negatives, temperature=args.temperature,
                      stochastic_length=args.stochastic_length, seed=args.seed, device=str(_device(args.device)))
    data = load(args.dataset)
    trainer = Trainer(cfg, data, args.dataset)
    if args.resume:
        if not args.checkpoint or not os.path.exists(args.checkpoint):
            raise SystemExit(f"--resume: no checkpoint at {args.checkpoint!r}")
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
    from .recsys import Split, evaluate, load, load_model, popularity_metrics

    device = _device(args.device)
    model, cfg, spec = load_model(args.checkpoint, device)
    split = Split.leave_one_out(load(args.dataset or spec))
    results = {cfg.model: evaluate(model, split, args.split, device=device),
               "popularity": popularity_metrics(split, args.split)}
    print(f"{args.split} on {args.dataset or spec}:")
    print(_metrics_table(results))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="omniattn", description="Fused, memory-efficient attention kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="device, available backends and the support matrix")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda if available)")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("check", help="every available backend against the reference; non-zero exit on mismatch")
    p.add_argument("--device")
    p.add_argument("--backend", choices=["torch", "triton"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16", "fp64"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("bench", help="time omniattn against PyTorch's attention on this device (the main job)")
    p.add_argument("--device")
    p.add_argument("--suite", choices=["cpu", "gpu", "gpu-full", "hstu", "smoke"], help="size set (default: by device)")
    p.add_argument("--gpu-suite", dest="suite", action="store_const", const="gpu-full", help="the full GPU matrix (softmax/sigmoid/silu and HSTU)")
    p.add_argument("--op", nargs="+", choices=["softmax", "sigmoid", "silu", "hstu"], help="only these ops")
    p.add_argument("--impl", nargs="+", help="only these implementations (e.g. omniattn sdpa-flash flex)")
    p.add_argument("--max-seqlen", type=int, help="skip problems longer than this")
    p.add_argument("--json", help="write rows in DESIGN.md's results format to this path")
    p.add_argument("--plot", help="write a PNG chart to this path")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("plot", help="chart a results JSON file")
    p.add_argument("results")
    p.add_argument("out")
    p.add_argument("--op", nargs="+")
    p.set_defaults(fn=cmd_plot)

    rec = sub.add_parser("recsys", help="train and evaluate HSTU / SASRec sequential recommenders")
    rsub = rec.add_subparsers(dest="recsys_command", required=True)
    p = rsub.add_parser("train", help="leave-one-out training with sampled softmax; full-ranking HR/NDCG")
    p.add_argument("--dataset", default="synthetic", help="synthetic | ml-100k[:PATH] | ml-1m:PATH | ml-20m:PATH")
    p.add_argument("--model", default="hstu", choices=["hstu", "sasrec"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--negatives", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--stochastic-length", type=float, metavar="ALPHA", help="HSTU's Stochastic Length (e.g. 1.6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--checkpoint", help="save after every epoch to this path")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--json", help="write the per-epoch history and test metrics")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_recsys_train)
    p = rsub.add_parser("eval", help="evaluate a checkpoint (best validation weights)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", help="default: the dataset it was trained on")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--device")
    p.set_defaults(fn=cmd_recsys_eval)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

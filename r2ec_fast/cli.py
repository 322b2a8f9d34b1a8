"""The `r2ec-fast` command line: one subcommand per task (bench, synth-data, prepare-data,
make-tiny-model, import-model, train, eval, plot, ablate).

Each subcommand is an `add_<name>(subparsers)` that defines its arguments and sets `func`, a
function of the parsed arguments returning the exit status. Subcommands import their layer
lazily, so `r2ec-fast --help` stays fast and a CPU-only install can run every command's help.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from r2ec_fast.benchmarks import harness

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("r2ec-fast bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    ops = harness.available_ops() if args.op == "all" else [args.op]
    opts = harness.Options(repeats=args.repeats, memory=not args.no_memory,
                           impl_filter=tuple(args.impl or ()), strict=args.strict)
    try:
        return harness.bench(ops, device, mode, opts, json_path=args.json,
                             out_dir=args.out_dir or harness.RESULTS_DIR)
    except ValueError as exc:
        print(f"r2ec-fast bench: {exc}", file=sys.stderr)
        return 2


def _bench_ops() -> list[str]:
    from r2ec_fast.benchmarks import available_ops  # globs file names; imports no torch

    return available_ops()


def add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="kernel micro-benchmarks: ours vs plain PyTorch, table + JSON report",
        description=(
            "Time every implementation of an op side by side (median, p20-p80 spread), measure\n"
            "its peak memory (CPU: a fresh subprocess per implementation; CUDA:\n"
            "torch.cuda.max_memory_allocated) and its error vs a float64 reference. Prints one\n"
            "table per shape; writes a JSON report and SUMMARY.md beside it (DESIGN §7).\n"
            "Details: benchmarks/README.md."),
        epilog=(
            "examples:\n"
            "  r2ec-fast bench --op catalog --quick          # about a minute on 2 CPU cores\n"
            "  r2ec-fast bench --op catalog                  # CPU full: the 1e6-item shape\n"
            "  r2ec-fast bench --device cuda --json out.json # GPU shapes, d=2304, bf16"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="all", choices=["all", *_bench_ops()],
                   help="which op's benchmark to run (default: all)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="small shapes and short timing budgets (CPU: about a minute)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny shapes that only check the benchmark runs (used by the tests)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda when available, else cpu); Triton rows "
                        "run on cuda only and show 'n/a (needs CUDA)' on cpu")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the report here (one --op only); default: "
                        "benchmarks/results/<op>-<device>[-<mode>]-<date>.json")
    p.add_argument("--out-dir", type=Path, default=None, metavar="DIR",
                   help="folder for the default-named reports (default: benchmarks/results)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="at most N timed runs per implementation after its warmup run, at "
                        "least min(N, 3) (default: the mode's)")
    p.add_argument("--impl", action="append", metavar="SUBSTR",
                   help="only implementations whose name contains SUBSTR (repeatable); their "
                        "plain baselines are kept so that speedups stay defined")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurement (saves one subprocess per row on CPU)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when an acceptance check fails, not only on errors")
    p.set_defaults(func=_run_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r2ec-fast",
        description="r2ec-fast: a kernel-optimised training engine for R2ec recommenders.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_bench(subparsers)
    from r2ec_fast.commands.ablate import add_ablate
    from r2ec_fast.commands.import_model import add_import_model
    from r2ec_fast.commands.make_tiny_model import add_make_tiny_model
    from r2ec_fast.commands.plot import add_plot
    from r2ec_fast.commands.prepare_data import add_prepare_data
    from r2ec_fast.commands.synth_data import add_synth_data
    from r2ec_fast.commands.train import add_eval, add_train

    add_synth_data(subparsers)
    add_prepare_data(subparsers)
    add_make_tiny_model(subparsers)
    add_import_model(subparsers)
    add_train(subparsers)
    add_eval(subparsers)
    add_plot(subparsers)
    add_ablate(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

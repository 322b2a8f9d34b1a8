"""`r2ec-fast plot`: training curves of a run folder as PNG files."""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

PIP_HINT = "pip install matplotlib  (or: pip install 'r2ec-fast[plot]')"
EVAL_PREFIX = "eval/"


def collect_series(records: list[dict], prefix: str = "") -> dict[str, tuple[list, list]]:
    """{name: (steps, values)} of every numeric metric (bools and strings skipped, non-finite
    values dropped). A step logged twice (a resumed run whose log was not truncated) keeps its
    last value; points are sorted by step."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            points = by_key.setdefault(prefix + key, {})
            if math.isfinite(value):
                points[step] = float(value)
            else:
                points.pop(step, None)
    return {key: (sorted(points), [points[s] for s in sorted(points)])
            for key, points in by_key.items() if points}


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", key).strip("_") or "metric"


def _draw(ax, key: str, steps: list, values: list, smooth: int) -> None:
    # evaluation points are few and each is already a mean over users: never smoothed
    if smooth > 1 and not key.startswith(EVAL_PREFIX):
        ax.plot(steps, values, color="C0", alpha=0.3, linewidth=1)
        ax.plot(steps, moving_average(values, smooth), color="C0", linewidth=1.5,
                label=f"mean of {smooth}")
        ax.legend(loc="best", fontsize="small")
    else:
        ax.plot(steps, values, color="C0", linewidth=1.2, marker="." if len(steps) < 50 else None)
    ax.set_title(key, fontsize="medium")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)


def plot_series(series: dict[str, tuple[list, list]], out_dir: Path, smooth: int = 1,
                dpi: int = 100) -> list[Path]:
    """One PNG per series plus `curves.png` with all of them in a grid; returns the paths.
    `smooth` > 1 adds a trailing moving average to the training series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, (steps, values) in series.items():
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        _draw(fig.add_subplot(), key, steps, values, smooth)
        fig.tight_layout()
        written.append(out_dir / f"{file_name(key)}.png")
        fig.savefig(written[-1], dpi=dpi)
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    for i, (key, (steps, values)) in enumerate(series.items()):
        _draw(fig.add_subplot(rows, cols, i + 1), key, steps, values, smooth)
    fig.tight_layout()
    written.append(out_dir / "curves.png")
    fig.savefig(written[-1], dpi=dpi)
    return written


def _select(series: dict, keys: str | None) -> dict:
    """The series named in the comma list `keys` (an eval metric matches with or without its
    "eval/" prefix), in the order given; all of them when `keys` is None."""
    if keys is None:
        return series
    chosen = {}
    for key in (k.strip() for k in keys.split(",") if k.strip()):
        names = [n for n in series if n == key or n == EVAL_PREFIX + key]
        if not names:
            raise ValueError(f"no numeric metric {key!r} in this run; available: "
                             f"{', '.join(series) or 'none'}")
        chosen.update((n, series[n]) for n in names)
    return chosen


def _run_plot(args: argparse.Namespace) -> int:
    from r2ec_fast.train.metrics import read_metrics

    run_dir: Path = args.run_dir
    train_file, eval_file = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    try:
        if args.smooth < 1:
            raise ValueError(f"--smooth must be at least 1, got {args.smooth}")
        if not train_file.is_file() and not eval_file.is_file():
            raise ValueError(f"{run_dir} has neither metrics.jsonl nor eval.jsonl")
        series = {}
        if train_file.is_file():
            series.update(collect_series(read_metrics(train_file)))
        if eval_file.is_file():
            series.update(collect_series(read_metrics(eval_file), prefix=EVAL_PREFIX))
        series = _select(series, args.keys)
        if not series:
            raise ValueError(f"no numeric metrics in {run_dir}")
    except (ValueError, OSError) as exc:
        print(f"r2ec-fast plot: {exc}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"r2ec-fast plot: matplotlib is not installed; {PIP_HINT}", file=sys.stderr)
        return 2
    out_dir = args.out if args.out is not None else run_dir / "plots"
    try:
        written = plot_series(series, out_dir, smooth=args.smooth)
    except OSError as exc:
        print(f"r2ec-fast plot: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} plots ({len(series)} metrics + curves.png) to {out_dir}")
    return 0


def add_plot(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="plot a run's training and evaluation curves as PNG files",
        description=(
            "Read RUN_DIR/metrics.jsonl (the per-step training log) and RUN_DIR/eval.jsonl\n"
            "(evaluation results; their metrics are named eval/<metric>) and write one PNG per\n"
            "numeric metric plus curves.png, a grid of all of them. Non-numeric and\n"
            "non-finite values are skipped. Needs matplotlib."),
        epilog=(
            "examples:\n"
            "  r2ec-fast plot runs/synth\n"
            "  r2ec-fast plot runs/synth --keys loss,reward_mean,ndcg@10 --smooth 20"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the training run's folder")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where to write the PNG files (default: RUN_DIR/plots)")
    p.add_argument("--keys", default=None, metavar="K1,K2",
                   help="comma-separated metrics to plot (default: every numeric one)")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="also draw a trailing moving average over N points of each training "
                        "metric (default: 1, none; eval metrics are never smoothed)")
    p.set_defaults(func=_run_plot)

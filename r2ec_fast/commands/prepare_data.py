"""`r2ec-fast prepare-data`: the reference dataset format from Amazon Reviews 2023 JSONL."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def summary_lines(data) -> list[str]:
    """A few lines on a `RecDataset`: items, users, interactions per split."""
    users = set()
    for split in data.splits.values():
        users.update(split.user_id)
    per_split = ", ".join(f"{name} {len(split)}" for name, split in data.splits.items())
    return [f"  items: {data.items.num_items}", f"  users with samples: {len(users)}",
            f"  interactions: {per_split}"]


def _run_prepare_data(args: argparse.Namespace) -> int:
    from r2ec_fast.data.amazon import prepare_amazon

    try:
        data = prepare_amazon(args.reviews, args.meta, args.category, args.out,
                              min_items=args.min_items, kcore=args.kcore,
                              history_window=args.history_window,
                              progress=not args.no_progress)
    except (ValueError, ImportError, OSError) as exc:
        print(f"r2ec-fast prepare-data: {exc}", file=sys.stderr)
        return 2
    meta = data.meta
    reached = "reached" if meta["min_items_reached"] else "NOT reached (all data used)"
    print(f"{data.category}: wrote {args.out}")
    print("\n".join(summary_lines(data)))
    print(f"  window: {meta['window_years']} year(s), min_items={meta['min_items']} {reached}; "
          f"kcore={meta['kcore']}")
    return 0


def add_prepare_data(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data",
        help="build the training dataset from Amazon Reviews 2023 reviews + meta JSONL",
        description=(
            "Read one category's reviews and meta JSONL (plain or gzipped), keep items with a\n"
            "titled meta entry, widen a time window backwards one year at a time until it holds\n"
            "--min-items items, optionally apply a K-core, and write the train/valid/test\n"
            "splits (temporal 80/10/10, histories newest last) and item_info as a HF\n"
            "DatasetDict (DESIGN §6). Protocol: r2ec_fast/data/amazon.py."),
        epilog=(
            "example:\n"
            "  r2ec-fast prepare-data --reviews Video_Games.jsonl.gz \\\n"
            "      --meta meta_Video_Games.jsonl.gz --category 'Video Games' --out data/games"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reviews", type=Path, required=True, metavar="FILE",
                   help="the category's reviews JSONL (.jsonl or .jsonl.gz)")
    p.add_argument("--meta", type=Path, required=True, metavar="FILE",
                   help="the category's meta JSONL (.jsonl or .jsonl.gz)")
    p.add_argument("--category", required=True, metavar="NAME",
                   help="the category's name as the prompts should say it, e.g. 'Video Games'")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to write the DatasetDict to")
    p.add_argument("--min-items", type=int, default=10000, metavar="N",
                   help="widen the time window until it holds N items (default: 10000)")
    p.add_argument("--kcore", type=int, default=0, metavar="K",
                   help="drop users and items with fewer than K interactions, repeatedly "
                        "(default: 0, none)")
    p.add_argument("--history-window", type=int, default=20, metavar="N",
                   help="at most N history items per sample (default: 20)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars while reading the files")
    p.set_defaults(func=_run_prepare_data)

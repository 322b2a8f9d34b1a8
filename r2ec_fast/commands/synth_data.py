"""`r2ec-fast synth-data`: a synthetic dataset whose next item is predictable from the text."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_synth_data(args: argparse.Namespace) -> int:
    from r2ec_fast.commands.prepare_data import summary_lines
    from r2ec_fast.data.dataset import save_with_progress
    from r2ec_fast.data.synthetic import baselines, make_synthetic

    try:
        data = make_synthetic(args.items, args.users, seed=args.seed, num_genres=args.genres,
                              num_attributes=args.attributes, noise=args.noise)
        save_with_progress(data, args.out, progress=False)
        scores = baselines(data, "test", k=10)
    except (ValueError, ImportError, OSError) as exc:
        print(f"r2ec-fast synth-data: {exc}", file=sys.stderr)
        return 2
    print(f"{data.category} (seed {args.seed}): wrote {args.out}")
    print("\n".join(summary_lines(data)))
    print(f"  rule followed by {data.meta['rule_fraction']:.1%} of samples (about the ceiling)")
    print(f"  test baselines over {scores['rows']} rows:")
    for name, label in (("popularity", "popularity"), ("rule", "rule on the history text")):
        s = scores[name]
        print(f"    {label:<26} Hit@10 {s['hit@10']:.4f}  NDCG@10 {s['ndcg@10']:.4f}")
    return 0


def add_synth_data(subparsers) -> None:
    p = subparsers.add_parser(
        "synth-data",
        help="generate a synthetic catalog and users whose next item follows a text rule",
        description=(
            "Generate items (genre x colour cells, titles and descriptions that name both) and\n"
            "users whose next item is, up to noise, in the cell of the most frequent genre of\n"
            "their history and the colour of their newest item. Writes the same DatasetDict\n"
            "format as prepare-data (DESIGN §6) and prints the Hit@10/NDCG@10 of a popularity\n"
            "baseline and of the rule itself on the test split. Process:\n"
            "r2ec_fast/data/synthetic.py."),
        epilog=(
            "example:\n"
            "  r2ec-fast synth-data --out data/synth --items 2000 --users 2000 --seed 0"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to write the DatasetDict to")
    p.add_argument("--items", type=int, required=True, metavar="N",
                   help="catalog size (at least genres x attributes)")
    p.add_argument("--users", type=int, required=True, metavar="M", help="number of users")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument("--genres", type=int, default=16, metavar="G",
                   help="number of genres, 1..16 (default: 16)")
    p.add_argument("--attributes", type=int, default=12, metavar="A",
                   help="number of colour attributes, 1..12 (default: 12)")
    p.add_argument("--noise", type=float, default=0.2, metavar="P",
                   help="probability that an interaction ignores the rule (default: 0.2)")
    p.set_defaults(func=_run_synth_data)

"""`r2ec-fast ablate`: the paper's ablation table in miniature (issue 15).

Each variant is the base config (a preset or a config file, with `--set`) plus a few
overrides, trained from scratch on the same data with the same step budget, once per seed.
Every run is an ordinary run folder under --out (`<variant>-s<seed>/`). The valid split is
evaluated every `eval_every` steps (the curves); the test split once at the end (the table).
`--out` gets `ablation.json` (every run's curves and test metrics), `ablation.md` (mean ± std
over the seeds, and each variant's difference from R²ec with its standard error) and
`ablation_valid_ndcg.png`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# name -> overrides of the base config; "R2ec" is the base itself
VARIANTS = {
    "R2ec": [],  # the preset: RecPO with the warm start's loss as its anchor
    "w/o anchor": ["recpo.anchor_weight=0"],  # the paper's RecPO
    "anchor only": ["recpo.token_loss_weight=0", "recpo.item_loss_weight=0"],  # no RL
    "w/o reasoning": ["algo=contrastive"],
    "warm start only": ["warm_start_steps={max_steps}"],
    "w/o R_c": ["recpo.beta=0"],
    "w/o R_d": ["recpo.beta=1"],
    "RLOO": ["recpo.advantage=rloo"],
}
TABLE_KEYS = ("hit@5", "hit@10", "ndcg@10", "ndcg@20")
CURVE_KEY = "ndcg@10"


def variant_config(base, name: str, seed: int):
    """The config of one run. A tiny random model is built per seed (`<model.path>-seed<N>`),
    so that the seeds vary the initial weights too, not only the data order and sampling."""
    from r2ec_fast.train.config import apply_overrides

    items = [o.format(max_steps=base.max_steps) for o in VARIANTS[name]] + [f"seed={seed}"]
    if base.model.tiny_arch:
        items.append(f"model.path={base.model.path}-seed{seed}")
    return apply_overrides(base, items)


def prepare(configs) -> None:
    """Build the missing data and models first, once each, before runs share them."""
    import torch

    from r2ec_fast.train.trainer import ensure_data, ensure_model

    for config in {c.data.path: c for c in configs}.values():
        data = ensure_data(config.data)
    for config in {c.model.path: c for c in configs}.values():
        ensure_model(config.model, ensure_data(config.data), torch.device("cpu"), config.seed)
    del data


def run_one(config, run_dir: Path, split: str) -> dict:
    """Train one variant and seed; returns its valid curve and final `split` metrics."""
    from r2ec_fast.train.trainer import EVAL_FILE, Trainer
    from r2ec_fast.train.metrics import read_metrics

    start = time.perf_counter()
    trainer = Trainer(config, run_dir, progress=False)
    trainer.evaluate(refresh=False)  # step 0 of the curve
    trainer.fit()
    test = trainer.evaluate(split)
    curve = [(r["step"], r[CURVE_KEY]) for r in read_metrics(run_dir / EVAL_FILE)
             if r.get("split") == config.data.eval_split]
    return {"curve": curve, "test": {k: test[k] for k in test if "@" in k},
            "users": test["users"], "seconds": round(time.perf_counter() - start, 1)}


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(results: dict, split: str, warm_step: int | None = None) -> str:
    """The markdown table: mean ± std over seeds per variant, then each variant's paired
    difference from R²ec in NDCG@10 (same seeds), mean ± its standard error. With
    `warm_step` (the warm start's length), a second table: each seed's valid NDCG@10 at that
    step and at the end, for the variants whose curves continue after it."""
    names = list(results)
    seeds = sorted({s for runs in results.values() for s in runs})
    lines = [f"{split} split, {len(seeds)} seeds ({', '.join(map(str, seeds))}), mean ± std",
             "", "| variant | " + " | ".join(k.replace("@", "@") for k in TABLE_KEYS) +
             " | NDCG@10 − R²ec (± s.e.) |", "|---" * (len(TABLE_KEYS) + 2) + "|"]
    base = results.get("R2ec", {})
    for name in names:
        runs = results[name]
        cells = []
        for key in TABLE_KEYS:
            m, s = mean_std([runs[seed]["test"][key] for seed in sorted(runs)])
            cells.append(f"{m:.4f} ± {s:.4f}")
        paired = [runs[s]["test"][CURVE_KEY] - base[s]["test"][CURVE_KEY]
                  for s in sorted(runs) if s in base]
        if name == "R2ec" or not paired:
            diff = "—"
        else:
            m, s = mean_std(paired)
            diff = f"{m:+.4f} ± {s / math.sqrt(len(paired)):.4f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {diff} |")
    rows = []
    for name in names if warm_step else []:
        curves = {seed: dict(run["curve"]) for seed, run in results[name].items()}
        if not all(warm_step in c and max(c) > warm_step for c in curves.values()):
            continue  # no warm start to compare with (or nothing after it)
        pairs = {seed: (c[warm_step], c[max(c)]) for seed, c in curves.items()}
        m, sd = mean_std([b - a for a, b in pairs.values()])
        rows.append(f"| {name} | " + " | ".join(
            f"{pairs[s][0]:.4f} -> {pairs[s][1]:.4f}" if s in pairs else "—" for s in seeds)
            + f" | {m:+.4f} ± {sd / math.sqrt(len(pairs)):.4f} |")
    if rows:
        lines += ["", f"valid {CURVE_KEY} per seed at the end of the warm start (step "
                  f"{warm_step}) -> at the end; the gain's mean ± s.e.", "",
                  "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | gain |",
                  "|---" * (len(seeds) + 2) + "|"] + rows
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> None:
    """Valid NDCG@10 against the step: the mean over seeds per variant, a band of ± std."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, runs in results.items():
        curves = [dict(runs[s]["curve"]) for s in sorted(runs)]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [mean_std([c[t] for c in curves]) for t in steps]
        means = [m for m, _ in stats]
        ax.plot(steps, means, marker="o", markersize=3, label=name)
        ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel(f"valid {CURVE_KEY}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_ablate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from r2ec_fast.commands.train import _config

    try:
        base = _config(args)
        names = args.variant or list(VARIANTS)
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        configs = {(n, s): variant_config(base, n, s) for n in names for s in seeds}
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty: choose a new folder")
        prepare(configs.values())
    except (ValueError, ImportError, OSError) as exc:
        print(f"r2ec-fast ablate: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {n: {} for n in names}
    folders = {key: out / f"{key[0].replace('/', '').replace(' ', '-')}-s{key[1]}"
               for key in configs}
    bar = tqdm(total=len(configs), desc="ablate", unit="run", disable=args.no_progress)

    def record(key, result):
        results[key[0]][key[1]] = result
        bar.update(1)
        tqdm.write(f"{key[0]}, seed {key[1]}: {args.split} NDCG@10 "
                   f"{result['test'][CURVE_KEY]:.4f} ({result['seconds']:.0f} s)")

    if args.jobs == 1:
        for key, config in configs.items():
            record(key, run_one(config, folders[key], args.split))
    else:  # one process per run, the CPU threads shared out between them
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {key: pool.submit(run_one, config, folders[key], args.split)
                       for key, config in configs.items()}
            for key, future in futures.items():
                record(key, future.result())
    bar.close()
    results = {n: dict(sorted(runs.items())) for n, runs in results.items()}
    (out / "ablation.json").write_text(json.dumps(
        {"base": base.to_dict(), "variants": {n: VARIANTS[n] for n in names},
         "split": args.split, "results": results}, indent=1) + "\n")
    warm = base.warm_start_steps if base.algo == "recpo" else None
    table = summarise(results, args.split, warm)
    (out / "ablation.md").write_text(table)
    print(table)
    try:
        plot_curves(results, out / "ablation_valid_ndcg.png")
    except ImportError:
        print("r2ec-fast ablate: matplotlib is not installed, no PNG", file=sys.stderr)
    print(f"written: {out}/ablation.json, ablation.md, ablation_valid_ndcg.png")
    return 0


def add_ablate(subparsers) -> None:
    from r2ec_fast.commands.train import add_config_arguments

    p = subparsers.add_parser(
        "ablate", help="the ablation table: R2ec against w/o reasoning, w/o R_c, w/o R_d, RLOO",
        description=(
            "Train each variant from scratch on the same data and step budget, once per\n"
            "seed, and tabulate the test split (mean ± std over seeds, and each variant's\n"
            "paired NDCG@10 difference from R2ec ± its standard error); plot the valid\n"
            "NDCG@10 curves. Variants (overrides of the base config):\n" + "\n".join(
                f"  {n}: {', '.join(o) or '(the base config)'}" for n, o in VARIANTS.items())),
        epilog=("examples:\n"
                "  r2ec-fast ablate --preset tiny --seeds 0,1,2 --out runs/ablate\n"
                "  r2ec-fast ablate --preset tiny --variant R2ec --variant 'w/o reasoning' "
                "--out runs/ab2"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)  # the base config
    p.add_argument("--variant", action="append", metavar="NAME",
                   help="run only these variants (repeatable; default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--split", choices=["valid", "test"], default="test",
                   help="split of the final table (default: test)")
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs in parallel, each in its own process (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_ablate, resume=False, max_steps=None)

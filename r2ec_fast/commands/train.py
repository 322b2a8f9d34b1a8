"""`r2ec-fast train` and `r2ec-fast eval`: the RecPO loop and its evaluation table."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(args):
    from r2ec_fast.train.config import apply_overrides, get_preset, load_config
    from r2ec_fast.train.run_dir import CONFIG_FILE

    own = Path(args.out) / CONFIG_FILE
    if args.config:
        base = load_config(args.config)
    elif args.preset is None and args.resume and own.is_file():
        base = load_config(own)  # --resume alone continues the run with its own config
    else:
        base = get_preset(args.preset or "tiny")
    config = apply_overrides(base, args.set or [])
    if getattr(args, "max_steps", None) is not None:
        config = apply_overrides(config, [f"max_steps={args.max_steps}"])
    return config


def _popularity(trainer, split: str) -> dict:
    from r2ec_fast.eval.evaluate import popularity_ranks, rank_metrics

    data = trainer.data[split]
    rows = len(data) if not trainer.config.data.eval_users else min(
        len(data), trainer.config.data.eval_users)
    ranks = popularity_ranks(trainer.data["train"].item_id, trainer.data.items.num_items,
                             data.item_id[:rows], trainer.histories[split][:rows].numpy())
    return rank_metrics(ranks)


def _warm_start_eval(trainer, split: str) -> dict | None:
    """The evaluation logged at the end of a RecPO run's warm start (eval_every dividing
    warm_start_steps), else None."""
    from r2ec_fast.train.metrics import read_metrics
    from r2ec_fast.train.trainer import EVAL_FILE

    config, path = trainer.config, trainer.run_dir / EVAL_FILE
    if config.algo != "recpo" or not config.warm_start_steps or not path.is_file():
        return None
    found = [r for r in read_metrics(path)
             if r.get("step") == config.warm_start_steps and r.get("split") == split]
    return found[-1] if found else None


def _rank(dist) -> str:
    """The ' (rank r)' of error messages in a multi-process job (every rank prints its own
    errors; everything else is rank 0's to print), else nothing."""
    return f" (rank {dist.rank})" if dist.enabled else ""


def _run_train(args: argparse.Namespace) -> int:
    """Under `torchrun --nproc_per_node N` every process runs this; rank 0 prints."""
    from r2ec_fast.train.distributed import close_distributed, init_distributed

    dist = init_distributed()
    finished = False
    try:
        code = _train(args, dist)
        finished = True
        return code
    finally:
        close_distributed(dist, wait=finished)


def _train(args: argparse.Namespace, dist) -> int:
    from r2ec_fast.eval.evaluate import format_table
    from r2ec_fast.train.run_dir import RunDirError, check_run_dir, remove_unstarted_run
    from r2ec_fast.train.trainer import Trainer

    say = print if dist.is_main else (lambda *a, **k: None)
    try:
        out = Path(args.out)
        config = _config(args)
        if out.exists() and not out.is_dir():
            raise RunDirError(f"--out {out} is a file, not a folder")
        new = not out.exists() or not any(out.iterdir())
        if not new and not args.resume:
            raise RunDirError(f"--out {out} is not empty: pass --resume to continue that run "
                              "(with the same config), or choose a new folder")
        check_run_dir(config, out, resume=args.resume, what="--out")
        dist.barrier()  # every rank has looked at --out before rank 0 writes there
        try:
            trainer = Trainer(config, out, resume=args.resume, progress=not args.no_progress,
                              dist=dist)
        except BaseException:
            if new and dist.is_main:  # a run that never started leaves no folder behind
                remove_unstarted_run(out)
            raise
    except (ValueError, ImportError, OSError) as exc:
        print(f"r2ec-fast train{_rank(dist)}: {exc}", file=sys.stderr)
        return 2
    split = args.eval_split or config.data.eval_split
    columns = {}
    if trainer.step == 0 and not args.no_eval:
        columns["before"] = trainer.evaluate(split, refresh=False)
    trainer.fit()
    if not args.no_eval:
        warm = _warm_start_eval(trainer, split)
        if warm is not None:
            columns["warm start"] = warm  # its last step, warm_start_steps
        columns["after"] = trainer.evaluate(split)
        columns["popularity"] = _popularity(trainer, split)
        say(f"\n{split} split, {columns['after']['users']} users, full catalog of "
            f"{trainer.data.items.num_items} items, history excluded:")
        say(format_table(columns))
    trainer.pop_times()
    say("seconds by phase: " + ", ".join(
        f"{k.removeprefix('time_')} {v:.1f}" for k, v in trainer.phase_seconds.items()))
    say(f"run folder: {out} (metrics.jsonl, eval.jsonl, checkpoints/, config.json)")
    return 0


def add_config_arguments(p) -> None:
    """--config FILE | --preset NAME, and repeatable --set KEY=VALUE (read by `_config`)."""
    from r2ec_fast.train.config import PRESETS

    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, metavar="FILE",
                        help="a JSON config (e.g. a run's config.json)")
    source.add_argument("--preset", choices=list(PRESETS),
                        help="a built-in config (default: tiny)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=2e-5 (repeatable)")


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train an R2ec model with RecPO (or the contrastive warm start)",
        description=(
            "Train with RecPO (DESIGN §5): G sampled reasoning chains per user, rewards over\n"
            "the full catalog, GRPO advantages, token loss + item loss. Builds the synthetic\n"
            "data and the tiny model first when the config says so and they are missing.\n"
            "Writes config.json, metrics.jsonl (one line per step), eval.jsonl and\n"
            "checkpoints/ to --out; evaluates before and after and prints the table.\n"
            "--out must be new or empty, unless --resume continues the run it holds: then\n"
            "the config must be that run's (only max_steps, eval_every, save_every,\n"
            "keep_checkpoints, data.eval_users and data.eval_split may change); without\n"
            "--config/--preset, --resume takes DIR/config.json. Nothing overwrites a run:\n"
            "delete the folder or choose another. A run whose set-up fails (data, model,\n"
            "checkpoint) leaves no new folder behind.\n"
            "A model folder that needs its own Python (auto_map) is refused unless\n"
            "--set model.trust_remote_code=true.\n"
            "Data-parallel on N processes (FSDP2; gloo on CPU, nccl on CUDA):\n"
            "  torchrun --nproc_per_node N -m r2ec_fast.cli train ...\n"
            "optim.users_per_step is the global batch: a multiple of N."),
        epilog=("examples:\n"
                "  r2ec-fast train --preset tiny --out runs/tiny\n"
                "  r2ec-fast train --preset tiny --out runs/tiny --resume --max-steps 120\n"
                "  r2ec-fast train --preset tiny --set algo=contrastive --set optim.lr=2e-3 "
                "--out runs/warm"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the run folder: new or empty, or a run to --resume")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="train until step N (overrides the config's max_steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its config "
                        "(default: DIR/config.json; a different config is refused)")
    p.add_argument("--eval-split", choices=["train", "valid", "test"], default=None,
                   help="split of the before/after evaluation (default: the config's)")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train)


def _run_eval(args: argparse.Namespace) -> int:
    """Under torchrun the users are split over the processes; rank 0 prints."""
    from r2ec_fast.train.distributed import close_distributed, init_distributed

    dist = init_distributed()
    finished = False
    try:
        code = _eval(args, dist)
        finished = True
        return code
    finally:
        close_distributed(dist, wait=finished)


def _eval(args: argparse.Namespace, dist) -> int:
    from r2ec_fast.eval.evaluate import format_table
    from r2ec_fast.train.config import apply_overrides, load_config
    from r2ec_fast.train.trainer import Trainer

    say = print if dist.is_main else (lambda *a, **k: None)
    run = Path(args.run)
    try:
        config = load_config(run / "config.json")
        if args.users is not None:
            config = apply_overrides(config, [f"data.eval_users={args.users}"])
        trainer = Trainer(config, run, resume=True, progress=not args.no_progress, dist=dist,
                          write_config=False)  # an evaluation leaves the run as it was
        if trainer.step == 0:
            say(f"r2ec-fast eval: {run} has no checkpoint; evaluating the initial model",
                file=sys.stderr)
    except (ValueError, ImportError, OSError) as exc:
        print(f"r2ec-fast eval{_rank(dist)}: {exc}", file=sys.stderr)
        return 2
    result = trainer.evaluate(args.split)
    say(f"{args.split} split, step {trainer.step}, {result['users']} users:")
    say(format_table({f"step {trainer.step}": result,
                      "popularity": _popularity(trainer, args.split)}))
    if args.json and dist.is_main:
        keys = {k: v for k, v in result.items() if "@" in k}
        Path(args.json).write_text(json.dumps(keys, indent=2) + "\n")
    return 0


def add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a run: greedy reasoning, full-catalog Hit@K and NDCG@K",
        description=(
            "Load a run's config and latest checkpoint, re-encode the catalog, reason\n"
            "greedily for each user of the split, score the whole catalog with the history\n"
            "excluded, and print Hit@K / NDCG@K for K in 5, 10, 20, 50 beside popularity."),
        epilog="example:\n  r2ec-fast eval --run runs/tiny --split test --json test.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder of r2ec-fast train")
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    p.add_argument("--users", type=int, default=None, metavar="N",
                   help="evaluate the first N users of the split (default: the config's)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help='also write {"hit@5": ..., "ndcg@5": ..., ...} here')
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_eval)

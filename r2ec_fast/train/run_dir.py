"""Which run a run folder holds, checked before anything is written to it.

A run folder (`r2ec-fast train --out DIR`, `Trainer(config, run_dir)`) holds one run:
`config.json`, `metrics.jsonl`, `eval.jsonl` and `checkpoints/`. Two runs must never share
one (their metrics would interleave and a resume would continue the wrong one), so:

- a new run (no resume) refuses a folder that already holds a run;
- a resume refuses a folder whose `config.json` differs from the config it is given, except
  in `RESUME_MAY_CHANGE`: how long to go on, how often to evaluate and checkpoint, how many
  users an evaluation reads (none of which changes a step that was already taken);
- a run that failed before its first step leaves nothing behind (`remove_unstarted_run`).

There is deliberately no flag that overwrites a run: delete the folder (or choose a new one).
"""
from __future__ import annotations

import os
from pathlib import Path

from r2ec_fast.train.config import ConfigError, TrainConfig, load_config

CONFIG_FILE = "config.json"
RUN_ENTRIES = ("config.json", "metrics.jsonl", "eval.jsonl", "checkpoints")  # what a run writes
RESUME_MAY_CHANGE = ("max_steps", "eval_every", "save_every", "keep_checkpoints",
                     "data.eval_users", "data.eval_split")


class RunDirError(ConfigError):
    """A run folder that holds another run, or is not a folder; the message says what to do."""


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_differences(saved: TrainConfig, config: TrainConfig,
                       ignore=RESUME_MAY_CHANGE) -> list[str]:
    """"key (saved there, given here)" for every dotted key outside `ignore` that differs."""
    a, b = _flat(saved.to_dict()), _flat(config.to_dict())
    return [f"{key} ({a.get(key)!r} there, {b.get(key)!r} here)" for key in sorted(a | b)
            if key not in ignore and a.get(key) != b.get(key)]


def check_run_dir(config: TrainConfig, run_dir: str | Path, resume: bool,
                  what: str = "run folder") -> None:
    """Raise RunDirError unless `config` may be trained in `run_dir` (see the module
    docstring); reads only. `what` is how messages name the folder (the CLI: "--out")."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{what} {run_dir} is a file, not a folder")
    if not run_dir.is_dir():
        return
    found = [name for name in RUN_ENTRIES if (run_dir / name).exists()]
    if not resume:
        if found:
            raise RunDirError(f"{what} {run_dir} already holds a run ({', '.join(found)}): "
                              "resume it (--resume, with the same config) or choose a new folder")
        return
    if not (run_dir / CONFIG_FILE).is_file():
        return  # e.g. a checkpoint copied into a new folder: nothing to compare with
    saved = load_config(run_dir / CONFIG_FILE)  # a ConfigError naming the file when damaged
    diff = config_differences(saved, config)
    if diff:
        more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
        raise RunDirError(
            f"{what} {run_dir} holds another run: its {CONFIG_FILE} differs from this config "
            f"in {'; '.join(diff[:8])}{more}. A resume continues a run with the config it was "
            f"started with (only {', '.join(RESUME_MAY_CHANGE)} may change): resume with "
            f"{run_dir / CONFIG_FILE} (r2ec-fast train --resume without --config/--preset/--set "
            "takes it), or choose a new folder")


def write_run_config(config: TrainConfig, run_dir: str | Path) -> Path:
    """Write `run_dir/config.json` atomically (a temporary file renamed into place), making
    the folder first; returns the file."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".tmp-{CONFIG_FILE}"
    config.save(tmp)
    os.replace(tmp, run_dir / CONFIG_FILE)
    return run_dir / CONFIG_FILE


def remove_unstarted_run(run_dir: str | Path) -> None:
    """Undo what setting up a run wrote into a folder that was new or empty before it: its
    config.json, empty log files and checkpoints/ folder, then the folder itself when that
    leaves it empty. Call only for such a folder, after a failure before the first step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for name in (CONFIG_FILE, f".tmp-{CONFIG_FILE}", "metrics.jsonl", "eval.jsonl"):
        file = run_dir / name
        if file.is_file() and not (name.endswith(".jsonl") and file.stat().st_size):
            file.unlink()  # a log with lines in it is a started run's: kept
    for folder in (run_dir / "checkpoints", run_dir):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass

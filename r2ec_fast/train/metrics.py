"""The per-step training log: a JSONL file, phase timers and peak memory.

`metrics.jsonl` holds one JSON object per logged step, `{"step": 12, "loss": 0.53, ...}`,
readable by any strict JSON reader: non-finite numbers are written as the strings "nan",
"inf", "-inf" (`read_metrics` turns them back into floats). Each line is flushed as it is
written, so a crash loses at most the line being written; a resumed run calls
`truncate_after(resumed_step)` first, so that the file never holds a step twice.

Tensors are converted (`.tolist()`, a host sync on CUDA) only when `log` is called: keep them
on the device between log steps. This module imports no torch itself (the plot command reads
metrics without it); it uses torch only when the caller has already imported it.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _plain(value, key: str):
    """A JSON-ready copy of `value`: tensors and numpy values become python numbers (lists for
    more than one element), non-finite floats become strings."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # torch tensors, numpy arrays and numpy scalars
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"metric {key!r}: cannot log a {type(value).__name__} (numbers, strings, "
                    "tensors, numpy values and lists/dicts of them can be logged)")


def _parse_lines(path: Path) -> list[tuple[str, dict | None]]:
    """(raw line, parsed object, or None for a broken line) per non-blank line. Broken lines
    are what a crash mid-write leaves: the last line, or, after a resume that did not
    truncate, a line in the middle."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        out.append((line, record if isinstance(record, dict) else None))
    return out


def _ends_cleanly(path: Path) -> bool:
    """True for an empty file or one whose last byte is a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class MetricsLogger:
    """Appends one JSON line per `log(step, **values)` to `run_dir/filename`."""

    def __init__(self, run_dir: str | Path, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def log(self, step: int, **values) -> dict:
        """Write `{"step": step, **values}` as one line and flush it; returns what was written."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        record = {"step": step, **{k: _plain(v, k) for k, v in values.items()}}
        line = json.dumps(record, allow_nan=False)
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
            if not _ends_cleanly(self.path):
                self._file.write("\n")  # a crash cut the last line: do not append to it
        self._file.write(line + "\n")
        self._file.flush()
        return record

    def truncate_after(self, step: int) -> int:
        """Drop every line with a step > `step`, and broken lines; call on resume, before
        logging. The file is rewritten atomically. Returns the number of lines kept."""
        self.close()
        if not self.path.is_file():
            return 0
        kept = [line for line, record in _parse_lines(self.path)
                if record is not None and isinstance(record.get("step"), int)
                and record["step"] <= step]
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return len(kept)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics file (or of `path/metrics.jsonl` for a run folder), in file
    order, with "nan"/"inf"/"-inf" strings turned back into floats. Broken lines (a crash
    mid-write) are skipped, with a warning unless it is only the last line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    parsed = _parse_lines(path)
    broken = [i + 1 for i, (_, record) in enumerate(parsed[:-1]) if record is None]
    if broken:
        warnings.warn(f"{path}: skipped {len(broken)} broken line(s) (first: line {broken[0]}); "
                      "MetricsLogger.truncate_after rewrites the file without them", stacklevel=2)
    return [{k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}
            for _, record in parsed if record is not None]


def _cuda_in_use():
    """torch.cuda when the caller's torch has initialised CUDA, else None."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda
    return None


class PhaseTimer:
    """Wall-clock seconds per phase, accumulated over a logging interval::

        timer = PhaseTimer()
        with timer("rollout"):
            ...
        logger.log(step, **timer.pop())  # {"time_rollout": 1.23, ...}

    On CUDA it synchronises before reading the clock at both ends of a phase, so that a phase
    is charged for its own kernels rather than the next phase's wait (this costs a sync per
    phase; time a few phases per step, not every op). Phases may nest.
    """

    def __init__(self, clock=time.perf_counter):
        """clock: seconds as a float (tests pass a fake one)."""
        self._seconds: dict[str, float] = defaultdict(float)
        self._clock = clock

    @contextmanager
    def __call__(self, name: str):
        cuda = _cuda_in_use()
        if cuda is not None:
            cuda.synchronize()
        start = self._clock()
        try:
            yield
        finally:
            if cuda is not None:
                cuda.synchronize()
            self._seconds[name] += self._clock() - start

    def pop(self) -> dict[str, float]:
        """{"time_<phase>": seconds} since the last pop; resets the totals."""
        out = {f"time_{name}": s for name, s in self._seconds.items()}
        self._seconds.clear()
        return out


def peak_memory_mib() -> float:
    """Peak memory in MiB: `torch.cuda.max_memory_allocated()` of the current device when CUDA
    is in use, else the process's peak resident set (VmHWM; getrusage where /proc is absent)."""
    cuda = _cuda_in_use()
    if cuda is not None:
        return cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else kB

"""The one benchmark runner of r2ec-fast (DESIGN §7, STYLE "Benchmarks").

An op script `bench_<op>.py` registers `(device, mode) -> list[Case]` with `@register("<op>")`.
A `Case` is one shape and dtype: how to build its random inputs, the implementations to compare
(`Impl`: a name and a callable on the inputs), the float64 reference and the error measure.
For every case and implementation the runner
- times it: one warmup run, then the median of repeats within a time budget, by
  time.perf_counter on CPU and CUDA events on a GPU (with L2 flushed before each run, since
  a 1e4-item bf16 table fits in an H100's 50 MB of L2);
- measures its peak memory: on CPU the peak RSS of a fresh subprocess (this module's worker
  mode) that builds the inputs and runs the implementation twice, resetting its peak before
  each run: the second run's added MiB is the per-call cost, the first's (also recorded)
  includes the process's one-time set-up; the parent's own peak never goes down and would
  hide every implementation after the largest. On CUDA torch.cuda.max_memory_allocated in
  process, minus what the inputs hold;
- measures the error of its (first) output against the float64 reference;
- derives GB/s (the case's bytes: the item table read once), the fraction of the device's
  measured copy bandwidth, TFLOP/s (each Impl's flop formula) and the speedup over its baseline.
It prints one table per case, writes a JSON report and regenerates SUMMARY.md beside it.
"""
from __future__ import annotations

import datetime
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from . import available_ops
from .report import RESULTS_DIR, default_json_path, format_case, write_report

MODES = ("smoke", "quick", "full")
MIB = 1 << 20
MIN_REPEATS = 3
DEFAULT_REPEATS = {"smoke": 3, "quick": 10, "full": 20}
BUDGET_S = {"smoke": 0.2, "quick": 1.0, "full": 5.0}  # timing budget per implementation
WORKER_TIMEOUT_S = 1800
L2_FLUSH_BYTES = 256 * MIB
LOST = "not run: the CUDA context was lost to an earlier failure"

_CASE_BUILDERS: dict[str, Callable[[str, str], list["Case"]]] = {}


def register(op: str):
    """Decorator for an op script's `(device, mode) -> list[Case]`."""
    def wrap(fn):
        _CASE_BUILDERS[op] = fn
        return fn
    return wrap


@dataclass
class Impl:
    name: str  # row label, unique within its case
    run: Callable[[dict], Any]  # inputs -> output (what the case's `errors` reads)
    flops: float  # the case's explicit flop formula for this implementation
    baseline: str | None = None  # the implementation its speedup is measured against
    needs_cuda: bool = False
    about: str = ""


def with_setting(module: str, name: str, value, run: Callable[[dict], Any]):
    """`run` with the module-level `module.name` set to `value` for each call only (e.g. a
    kernel module's BACKWARD design, to time two designs side by side)."""
    def wrapped(inputs: dict):
        mod = importlib.import_module(module)
        saved = getattr(mod, name)
        setattr(mod, name, value)
        try:
            return run(inputs)
        finally:
            setattr(mod, name, saved)
    return wrapped


@dataclass
class Case:
    key: str  # unique within the op, e.g. "N=64 d=256 V=10000 L=20 float32"
    shape: dict[str, int]
    dtype: torch.dtype
    bytes_read: int  # bytes of the GB/s formula
    make_inputs: Callable[[torch.device], dict]  # seeded: the memory worker rebuilds the same
    reference: Callable[[dict], tuple[dict, dict]]  # inputs -> (float64 outputs, notes)
    errors: Callable[[Any, dict], dict[str, float]]  # (output, reference) -> relative errors
    impls: list[Impl]
    checks: Callable[[dict[str, dict]], list[dict]] | None = None  # results by impl -> verdicts


def time_ratio_check(results: dict[str, dict], ours: str, base: str, limit: float) -> dict:
    """An acceptance verdict: median time of `ours` at most `limit` x that of `base`."""
    t_ours = results.get(ours, {}).get("time_ms", {}).get("median")
    t_base = results.get(base, {}).get("time_ms", {}).get("median")
    ratio = t_ours / t_base if t_ours and t_base else None
    return {"name": f"{ours} time <= {limit}x {base}'s",
            "passed": None if ratio is None else ratio <= limit,
            "value": "not measured" if ratio is None else
            f"{ours}/{base} = {ratio:.2f} ({t_ours:.0f} ms vs {t_base:.0f} ms)"}


@dataclass
class Options:
    repeats: int | None = None  # None: the mode's default
    memory: bool = True
    impl_filter: tuple[str, ...] = ()  # substrings of implementation names to keep
    strict: bool = False  # exit status 1 when a check fails
    out: Any = field(default=None)  # stream for the tables (None: sys.stdout at call time)


def load_cases(op: str, device: str, mode: str) -> list[Case]:
    if op not in available_ops():
        raise ValueError(f"unknown benchmark op {op!r}; choose from {available_ops()}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; choose one of {MODES}")
    importlib.import_module(f".bench_{op}", __package__)
    return _CASE_BUILDERS[op](device, mode)


# ----------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def environment() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # a copy of the tree (the GPU machine's) is told its commit through R2EC_GIT_COMMIT: its
    # .git, where there is one, can be older than the files (seen: two runs stamped with the
    # commit of an earlier run)
    commit = os.environ.get("R2EC_GIT_COMMIT") or _git("rev-parse", "HEAD")
    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton_version, "cuda": torch.version.cuda},
        "git_commit": commit,
        "git_dirty": None if commit is None else bool(_git("status", "--porcelain",
                                                           "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info = {"type": "cuda", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "sms": props.multi_processor_count}
    else:
        info = {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}
    info["copy_gbps"] = copy_bandwidth(device)
    return info


def copy_bandwidth(device: str) -> float:
    """GB/s of a large device-local copy: (bytes read + bytes written) / median time."""
    numel = (1 << 28) if device == "cuda" else (1 << 26)  # 1 GiB fp32 on a GPU, 256 MiB on CPU
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = time_fn(lambda: dst.copy_(src), device, repeats=10, budget_s=1.0)["median"]
    return 2 * numel * src.element_size() / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- measurement


def _stats(times_ms: list[float]) -> dict:
    cuts = statistics.quantiles(times_ms, n=5, method="inclusive") if len(times_ms) > 1 else times_ms * 4
    return {"median": statistics.median(times_ms), "p20": cuts[0], "p80": cuts[3],
            "min": min(times_ms), "max": max(times_ms), "n": len(times_ms)}


def time_fn(fn: Callable[[], Any], device: str, repeats: int, budget_s: float) -> dict:
    """Milliseconds of `fn` (already warmed up by the caller): at least MIN_REPEATS runs, then
    more while `budget_s` lasts, at most `repeats`."""
    cuda = device == "cuda"
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if cuda else None
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(repeats, 1) and (len(times) < MIN_REPEATS
                                            or time.perf_counter() - start < budget_s):
        if cuda:
            flush.zero_()  # evict the previous run's table from L2
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times)


def _cpu_clock() -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the whole machine incl. steal, CPU s of this process and its
    finished children), to tell how much of the machine other processes took during a case."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
              resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    return time.perf_counter(), busy, own


def _other_cpu_fraction(start, end) -> float | None:
    if start is None or end is None or end[0] <= start[0]:
        return None
    other = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, other / ((end[0] - start[0]) * (os.cpu_count() or 1)))


def _status_mib(*fields: str) -> dict[str, float]:
    """Fields of /proc/self/status in MiB, read in one snapshot; {} where it is unreadable."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0]) / 1024  # kB
    return values


def _peak_rss_mib() -> float:
    """This process's own peak resident memory (VmHWM). Not ru_maxrss: a child started by
    subprocess (vfork + exec) inherits its parent's peak there (measured: a worker started by
    a 1.2 GiB parent read 1244 MiB before importing anything)."""
    peak = _status_mib("VmHWM").get("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


RESET_SLACK_MIB = 4.0


def _reset_peak_rss() -> bool:
    """Lower the peak to the current RSS (Linux >= 4.0), so that transient peaks of the imports
    and of building the inputs cannot hide what the implementation adds. True only when the
    peak did come down to the current RSS: some sandboxes accept the write to clear_refs and
    ignore it (a CI run read the same VmHWM before and after a 64 MiB allocation)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    now = _status_mib("VmHWM", "VmRSS")
    return len(now) == 2 and now["VmHWM"] - now["VmRSS"] <= RESET_SLACK_MIB


def cuda_memory_run(fn: Callable[[], Any]) -> tuple[Any, dict]:
    """Run `fn` once; its peak CUDA memory beyond what was allocated before (the inputs)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return out, {"peak_mib": peak / MIB, "added_mib": (peak - base) / MIB, "inputs_mib": base / MIB,
                 "method": "torch.cuda.max_memory_allocated minus allocated before the run"}


def cpu_memory(op: str, mode: str, case_key: str, impl_name: str) -> dict:
    """Peak resident memory of one run of `impl_name` in a fresh Python process."""
    spec = json.dumps({"op": op, "mode": mode, "case": case_key, "impl": impl_name})
    proc = subprocess.run([sys.executable, "-m", f"{__package__}.harness", "--worker", spec],
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"memory worker exited with {proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(spec: dict) -> dict:
    """The subprocess side of `cpu_memory`: import everything and build the inputs, then run
    the implementation twice, resetting the peak before each run.

    `first_call_added_mib` is the first run's peak beyond the live inputs: it includes the
    process's one-time set-up for the ops used (library code paged in, BLAS and thread-pool
    buffers; 30-50 MiB for the chunked torch path here). `added_mib` is the second run's: what
    each call of a training loop costs, and what the acceptance checks use."""
    case = next(c for c in load_cases(spec["op"], "cpu", spec["mode"]) if c.key == spec["case"])
    impl = next(i for i in case.impls if i.name == spec["impl"])
    inputs = case.make_inputs(torch.device("cpu"))
    added = []
    for _ in range(2):
        gc.collect()
        reset = _reset_peak_rss()
        before = _peak_rss_mib()
        impl.run(inputs)
        peak = _peak_rss_mib()
        added.append(peak - before)
    method = ("VmHWM of a fresh subprocess, second of two runs" +
              (", peak reset before each run" if reset else
               " (peak reset unavailable: an upper bound on before)"))
    return {"peak_mib": peak, "added_mib": added[1], "first_call_added_mib": added[0],
            "before_run_mib": before, "method": method}


# ----------------------------------------------------------------------------- runner


def _selected(case: Case, impl_filter: tuple[str, ...]) -> list[Impl]:
    """Implementations matching the filter, plus their baselines so speedups stay defined."""
    if not impl_filter:
        return case.impls
    keep = {i.name for i in case.impls if any(f in i.name for f in impl_filter)}
    keep |= {i.baseline for i in case.impls if i.name in keep and i.baseline}
    return [i for i in case.impls if i.name in keep]


def run_impl(op: str, mode: str, case: Case, impl: Impl, inputs: dict, ref: dict, device: str,
             opts: Options) -> dict:
    res: dict[str, Any] = {"impl": impl.name, "about": impl.about, "baseline": impl.baseline}
    if impl.needs_cuda and device != "cuda":
        res["skipped"] = "n/a (needs CUDA)"
        return res
    try:
        if device == "cuda":  # the measured run doubles as the warmup (and Triton's compile)
            out, res["memory"] = cuda_memory_run(lambda: impl.run(inputs))
        else:
            out = impl.run(inputs)
        res["errors"] = case.errors(out, ref)
        res["max_error"] = max(res["errors"].values(), default=None)
        del out
        repeats = opts.repeats or DEFAULT_REPEATS[mode]
        res["time_ms"] = time_fn(lambda: impl.run(inputs), device, repeats, BUDGET_S[mode])
        if device == "cpu" and opts.memory:
            res["memory"] = cpu_memory(op, mode, case.key, impl.name)
    except Exception as exc:  # one failing implementation must not hide the others' numbers
        res["failed"] = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        if device == "cuda" and not _cuda_usable():
            res["fatal"] = True  # e.g. an illegal address: every later CUDA call fails too
            return res
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def _cuda_usable() -> bool:
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - whatever the error, the context cannot run more work
        return False
    return True


def _derive(case: Case, impls: list[Impl], results: list[dict], copy_gbps: float) -> None:
    median = {r["impl"]: r["time_ms"]["median"] for r in results if "time_ms" in r}
    for impl, res in zip(impls, results):
        if impl.name not in median:
            continue
        seconds = median[impl.name] * 1e-3
        res["gbps"] = case.bytes_read / seconds / 1e9
        res["copy_fraction"] = res["gbps"] / copy_gbps
        res["tflops"] = impl.flops / seconds / 1e12
        if impl.baseline in median:
            res["speedup"] = median[impl.baseline] / median[impl.name]  # > 1: faster


def run_case(op: str, mode: str, case: Case, device: str, opts: Options,
             progress) -> tuple[dict, list[Impl], bool]:
    impls = _selected(case, opts.impl_filter)
    clock = _cpu_clock()
    inputs = case.make_inputs(torch.device(device))
    progress.set_postfix_str(f"{case.key} | float64 reference")
    ref, ref_notes = case.reference(inputs)
    results: list[dict] = []
    lost = False
    for impl in impls:
        progress.set_postfix_str(f"{case.key} | {impl.name}")
        if lost:
            results.append({"impl": impl.name, "baseline": impl.baseline, "skipped": LOST})
        else:
            results.append(run_impl(op, mode, case, impl, inputs, ref, device, opts))
            lost = results[-1].get("fatal", False)
        progress.update()
    del inputs, ref
    out = {"key": case.key, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
           "bytes_read": case.bytes_read, "reference": ref_notes, "results": results,
           # > ~0.1: other processes (or the hypervisor) took CPU time, timings are disturbed
           "other_cpu_fraction": _other_cpu_fraction(clock, _cpu_clock())}
    return out, impls, lost


def run_op(op: str, device: str, mode: str, opts: Options) -> dict:
    cases = load_cases(op, device, mode)
    dev = device_info(device)
    report = {"op": op, "mode": mode, "device": dev, **environment(),
              "dtypes": sorted({str(c.dtype).replace("torch.", "") for c in cases}),
              "shapes": [c.shape for c in cases], "cases": []}
    stream = opts.out or sys.stdout
    total = sum(len(_selected(c, opts.impl_filter)) for c in cases)
    with tqdm(total=total, desc=f"bench {op}", file=sys.stderr, leave=False,
              dynamic_ncols=True) as progress:
        for case in cases:
            res, impls, lost = run_case(op, mode, case, device, opts, progress)
            _derive(case, impls, res["results"], dev["copy_gbps"])
            if case.checks:
                res["checks"] = case.checks({r["impl"]: r for r in res["results"]})
            report["cases"].append(res)
            tqdm.write(format_case(op, res, dev), file=stream)
            if lost:  # write what was measured; the remaining cases cannot run in this process
                report["aborted"] = f"{LOST} (in case {case.key})"
                tqdm.write(f"\naborted: {report['aborted']}", file=stream)
                break
    return report


def bench(ops: list[str], device: str, mode: str, opts: Options, json_path: Path | None = None,
          out_dir: Path = RESULTS_DIR) -> int:
    """Run `ops`, write one JSON report each; exit status 1 if an implementation failed (or,
    with `opts.strict`, a check failed)."""
    if json_path is not None and len(ops) != 1:
        raise ValueError("--json PATH names one report: give a single --op (or use --out-dir)")
    status = 0
    for op in ops:
        report = run_op(op, device, mode, opts)
        path = json_path or default_json_path(op, report["device"], mode, out_dir)
        write_report(report, Path(path))
        print(f"\nwrote {path} (and {Path(path).parent / 'SUMMARY.md'})", file=opts.out or sys.stdout)
        results = [r for c in report["cases"] for r in c["results"]]
        checks = [k for c in report["cases"] for k in c.get("checks", [])]
        if any("failed" in r for r in results):
            status = 1
        if opts.strict and any(k["passed"] is False for k in checks):
            status = 1
    return status


def _worker_main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "--worker":
        sys.exit("usage: python -m r2ec_fast.benchmarks.harness --worker '<json spec>'")
    print(json.dumps(worker(json.loads(argv[1]))))


if __name__ == "__main__":
    from . import harness  # the canonical module: the registry the op scripts fill lives there

    harness._worker_main(sys.argv[1:])

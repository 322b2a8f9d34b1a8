"""The benchmark runner end to end on tiny shapes (DESIGN §7): table, JSON report, summary.

One `r2ec-fast bench --smoke` run (N=8, d=32, V=2000, a few seconds plus one fresh subprocess
per implementation for its memory) is shared by the tests of this module. It writes into a
temporary folder, never into benchmarks/results/.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r2ec_fast.benchmarks import harness, report
from r2ec_fast.cli import main
from r2ec_fast.testing import TOLERANCE

REPO = Path(__file__).resolve().parent.parent
MEASURED = ["plain rewards", "torch rewards", "plain fwd+bwd", "torch fwd+bwd"]
CUDA_ONLY = ["triton rewards", "triton fwd+bwd", "triton fwd+bwd fused"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    results_before = sorted(harness.RESULTS_DIR.glob("*")) if harness.RESULTS_DIR.exists() else []
    path = tmp_path_factory.mktemp("bench") / "catalog-smoke.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["bench", "--op", "catalog", "--smoke", "--device", "cpu",
                       "--json", str(path)])
    results_after = sorted(harness.RESULTS_DIR.glob("*")) if harness.RESULTS_DIR.exists() else []
    return {"status": status, "table": stdout.getvalue(), "path": path,
            "report": json.loads(path.read_text()), "results_unchanged":
            results_before == results_after}


def test_smoke_exits_cleanly_and_leaves_results_alone(smoke):
    assert smoke["status"] == 0, smoke["table"]
    assert smoke["results_unchanged"], "the smoke run wrote into benchmarks/results/"


def test_table_has_one_row_per_implementation(smoke):
    table = smoke["table"]
    assert "catalog  N=8 d=32 V=2000 L=20 float32" in table
    for column in ("median ms", "p20-p80 ms", "speedup", "GB/s", "%copy", "peak MiB", "+MiB",
                   "max err"):
        assert column in table
    rows = {line.split()[0] + " " + line.split()[1]: line for line in table.splitlines()
            if line.startswith("  ") and len(line.split()) > 2}
    for name in MEASURED:
        assert name in rows, f"no row for {name}:\n{table}"
        assert len(rows[name].split()) == 11, rows[name]  # 2-word name + 9 numbers
    for name in CUDA_ONLY:
        assert f"{name}: n/a (needs CUDA)" in table
    assert f"wrote {smoke['path']}" in table


def test_json_report_fields(smoke):
    rep = smoke["report"]
    assert rep["op"] == "catalog" and rep["mode"] == "smoke"
    assert rep["device"]["type"] == "cpu" and rep["device"]["name"]
    assert math.isfinite(rep["device"]["copy_gbps"])
    assert set(rep["versions"]) >= {"python", "torch", "triton"}
    assert rep["versions"]["torch"] == torch.__version__
    assert "git_commit" in rep
    datetime.datetime.fromisoformat(rep["date"])
    assert rep["dtypes"] == ["float32"]
    assert rep["shapes"] == [{"N": 8, "d": 32, "V": 2000, "L": 20, "ndcg_k": 1000}]
    (case,) = rep["cases"]
    assert case["reference"]["dtype"] == "float64" and case["reference"]["rows"] == 8
    assert case["bytes_read"] == 2000 * 32 * 4
    assert case["other_cpu_fraction"] is None or 0 <= case["other_cpu_fraction"] <= 1


def test_json_results_per_implementation(smoke):
    (case,) = smoke["report"]["cases"]
    results = {r["impl"]: r for r in case["results"]}
    assert sorted(results) == sorted(MEASURED + CUDA_ONLY)
    for name in CUDA_ONLY:
        assert results[name]["skipped"] == "n/a (needs CUDA)"
    for name in MEASURED:
        r = results[name]
        assert "failed" not in r, r.get("failed")
        t = r["time_ms"]  # the statistics' order, never a time: no test asserts a speed
        assert all(map(math.isfinite, t.values()))
        assert t["min"] <= t["p20"] <= t["median"] <= t["p80"] <= t["max"]
        assert t["n"] >= harness.MIN_REPEATS
        mem = r["memory"]
        assert mem["peak_mib"] > 0 and mem["added_mib"] >= 0
        assert "subprocess" in mem["method"]
        # fp32 inputs: every compared field (lse, target score, R_c, NDCG, log p, grad) within
        # the DESIGN §3 tolerance of the float64 reference
        assert set(r["errors"]) and max(r["errors"].values()) == r["max_error"]
        assert math.isfinite(r["max_error"]) and r["max_error"] <= TOLERANCE[torch.float32], r
        assert math.isfinite(r["gbps"]) and math.isfinite(r["tflops"])
    assert set(results["plain rewards"]["errors"]) == {"rc", "ndcg"}
    assert set(results["torch rewards"]["errors"]) == {"lse", "target_score", "rc", "ndcg"}
    assert set(results["torch fwd+bwd"]["errors"]) == {"logp", "grad_user"}
    assert math.isfinite(results["torch rewards"]["speedup"])
    assert "speedup" not in results["plain rewards"]
    assert results["torch fwd+bwd"]["baseline"] == "plain fwd+bwd"


def test_summary_regenerated_next_to_the_report(smoke):
    summary = (smoke["path"].parent / "SUMMARY.md").read_text()
    assert smoke["path"].name in summary
    assert "| N=8 d=32 V=2000 L=20 float32 | torch rewards |" in summary


def test_peak_rss_sees_an_allocation():
    """The peak rises by a touched allocation, whether or not this kernel honours the peak
    reset: the block is sized past the gap between the peak and the current RSS."""
    reset = harness._reset_peak_rss()
    now = harness._status_mib("VmHWM", "VmRSS")
    assert set(now) == {"VmHWM", "VmRSS"}, now
    gap = now["VmHWM"] - now["VmRSS"]
    # the reset's report is true: it says True only when the peak came down to the RSS
    assert reset == (gap <= harness.RESET_SLACK_MIB), (reset, now)
    block_mib = 64 + max(0, int(gap))
    # fresh pages, written: a tensor could reuse memory this process already holds resident
    # (seen in CI: the peak did not move after a 64 MiB torch.ones late in the suite)
    block = mmap.mmap(-1, block_mib * harness.MIB)
    block.write(b"\x01" * (block_mib * harness.MIB))
    assert harness._peak_rss_mib() >= now["VmRSS"] + block_mib - harness.RESET_SLACK_MIB
    if reset:
        assert harness._peak_rss_mib() - now["VmHWM"] >= 60
    block.close()


def test_peak_reset_ignored_is_reported(monkeypatch):
    """A sandbox that takes the write to clear_refs but leaves the peak where it was."""
    monkeypatch.setattr(harness, "_status_mib", lambda *f: {"VmHWM": 900.0, "VmRSS": 500.0})
    assert not harness._reset_peak_rss()


def test_failures_and_skips_are_reported_not_raised():
    case = {"key": "N=1", "reference": {"note": "x"}, "results": [
        {"impl": "broken", "failed": "RuntimeError: boom"},
        {"impl": "gpu only", "skipped": "n/a (needs CUDA)"}]}
    text = report.format_case("op", case, {"name": "cpu", "copy_gbps": 1.0})
    assert "broken: FAILED RuntimeError: boom" in text and "gpu only: n/a (needs CUDA)" in text


def test_cli_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0 and "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_bare_benchmarks_import_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # cwd on sys.path
    proc = subprocess.run([sys.executable, "-c", "import benchmarks"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "r2ec_fast.benchmarks" in proc.stderr


def run_smoke(op: str, tmp_path) -> dict:
    """`r2ec-fast bench --op OP --smoke` on CPU without the memory subprocesses: its one case
    from the JSON report."""
    path = tmp_path / f"{op}-smoke.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["bench", "--op", op, "--smoke", "--device", "cpu", "--no-memory",
                       "--json", str(path)])
    assert status == 0, stdout.getvalue()
    (case,) = json.loads(path.read_text())["cases"]
    return case


def test_token_logp_smoke(tmp_path):
    """The token log-prob benchmark end to end: every column present, ours within fp32
    tolerance of float64 (timings only; --no-memory keeps it short)."""
    case = run_smoke("token_logp", tmp_path)
    rows = {r["impl"]: r for r in case["results"]}
    assert {"plain fwd", "torch fwd", "plain fwd+bwd", "torch fwd+bwd"} <= set(rows)
    for name in ("torch fwd", "torch fwd+bwd"):
        assert rows[name]["max_error"] <= TOLERANCE[torch.float32], rows[name]
        assert math.isfinite(rows[name]["time_ms"]["median"])
        assert math.isfinite(rows[name]["speedup"])
    assert set(rows["torch fwd+bwd"]["errors"]) == {"logp", "grad_hidden", "grad_weight"}


def test_rollout_smoke(tmp_path):
    """The rollout benchmark end to end: both HF rows and the engine timed, the engine's
    log-probs within fp32 tolerance of float64, the prompt-sharing check passed."""
    case = run_smoke("rollout", tmp_path)
    rows = {r["impl"]: r for r in case["results"]}
    assert set(rows) == {"hf_generate", "hf_generate_per_prompt", "engine"}
    assert all(math.isfinite(r["time_ms"]["median"]) for r in rows.values())
    assert rows["engine"]["max_error"] <= TOLERANCE[torch.float32], rows["engine"]
    checks = {c["name"]: c for c in case["checks"]}
    speed = next(c for name, c in checks.items() if name.startswith("engine vs HF generate "))
    assert "tokens/s =" in speed["value"], speed  # measured (smoke: no target)
    sharing = next(c for name, c in checks.items() if name.startswith("prompt KV held once"))
    assert sharing["passed"] is True, sharing


def test_profile_rollout_tool(capsys):
    """`python -m r2ec_fast.benchmarks.profile_rollout` on CPU (tiny Gemma-2, two cheap
    configurations, 2, 3 and 4 new tokens twice): a decode-step line per configuration and for
    HF (a step, or "not measurable" when this busy machine's noise swamps a 1-token difference:
    either is a correct report, so the test checks the form, never the time), the speed-up lines,
    greedy agreement; bad arguments are refused."""
    from r2ec_fast.benchmarks import profile_rollout

    assert profile_rollout.main(["--device", "cpu", "--configs", "eager,graphs",
                                 "--steps", "2,3,4", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("eager", "graphs", "hf_generate"):
        assert re.search(rf"^{name} +warmup .* 3 lengths x 2, N=2..4 \| decode step +"
                         r"([0-9.]+ ms \+- [0-9.]+ \| prefill|not measurable: )", out, re.M), out
    assert re.search(r"^decode step speed-up graphs vs HF generate: ([0-9.]+x|not measurable)",
                     out, re.M), out
    assert "greedy graphs: 8/8 samples equal to eager's" in out
    for bad in (["--configs", "nope"], ["--steps", "4,2"], ["--steps", "x"], ["--steps", "4"],
                ["--steps", "2,4", "--repeats", "1"], ["--configs", "eager", "--kernels", "all"]):
        with pytest.raises(SystemExit):
            profile_rollout.main(["--device", "cpu", *bad])


def test_decode_step_fit():
    """The least-squares decode step: exact on a line, with its standard error on noisy calls,
    and "not measurable" (with the reason) for a negative slope, for noise larger than the
    step, and for two points (no degrees of freedom left)."""
    from r2ec_fast.benchmarks.profile_rollout import fit_decode_step

    line = fit_decode_step([8, 16, 24, 8, 16, 24], [0.1 + 0.002 * n for n in [8, 16, 24] * 2])
    assert line.step == pytest.approx(0.002, rel=1e-9)
    assert line.intercept == pytest.approx(0.1, rel=1e-9)
    assert line.stderr < 1e-9 and line.measurable
    noisy = fit_decode_step([8, 16, 24] * 3, [0.1 + 0.002 * n + e for n, e in zip(
        [8, 16, 24] * 3, [1e-3, -2e-3, 5e-4, -1e-3, 2e-3, 0.0, 5e-4, -5e-4, 1e-3])])
    assert noisy.measurable and abs(noisy.step - 0.002) < 3 * noisy.stderr
    negative = fit_decode_step([2, 4, 2, 4], [0.5, 0.4, 0.52, 0.41])  # the flake of issue 13
    assert negative.step < 0 and not negative.measurable
    assert "not positive" in negative.why_not()
    swamped = fit_decode_step([2, 3, 4] * 2, [0.50, 0.40, 0.56, 0.42, 0.55, 0.45])
    assert swamped.step > 0 and not swamped.measurable and "standard error" in swamped.why_not()
    two = fit_decode_step([2, 4], [0.1, 0.2])
    assert two.stderr == math.inf and not two.measurable
    with pytest.raises(ValueError, match="two or more distinct lengths"):
        fit_decode_step([4, 4, 4], [0.1, 0.2, 0.3])


def test_rms_norm_smoke(tmp_path):
    """The RMSNorm benchmark end to end: HF's module and the op's torch path timed, both at
    fp32 rounding of float64, the triton row marked as needing CUDA."""
    case = run_smoke("rms_norm", tmp_path)
    rows = {r["impl"]: r for r in case["results"]}
    assert set(rows) == {"hf", "torch", "triton"} and "skipped" in rows["triton"]
    for name in ("hf", "torch"):
        assert rows[name]["max_error"] <= 1e-6
        assert math.isfinite(rows[name]["time_ms"]["median"])


def test_acceptance_verdicts():
    """The acceptance checks of both benchmarks pass, fail and say 'not measured' as they should."""
    from r2ec_fast.benchmarks import bench_catalog, bench_token_logp

    def res(ms, mib):
        return {"time_ms": {"median": ms}, "memory": {"added_mib": mib}}

    ok = bench_catalog._acceptance({"torch rewards": res(10.0, 5.0),
                                    "plain rewards": res(20.0, 900.0)})
    assert [c["passed"] for c in ok] == [True, True]
    slow = bench_token_logp._acceptance({"torch fwd+bwd": res(31.0, 200.0),
                                         "plain fwd+bwd": res(20.0, 900.0)})
    assert [c["passed"] for c in slow] == [False, False]
    assert "1.55" in slow[1]["value"]
    assert all(c["passed"] is None for c in bench_token_logp._acceptance({}))


def test_step_bench_times_every_phase_of_both_styles(monkeypatch):
    """`bench --op step --smoke`: a whole training step in both styles, every phase timed;
    the reference-style row really runs the materialising references and ours does not."""
    from r2ec_fast.benchmarks import bench_step
    from r2ec_fast.ops import token_logp

    calls = {"ours": 0, "reference-style": 0}
    running = []  # the style of the step in progress
    real_ref = token_logp.linear_log_probs_reference

    def spy(*args, **kwargs):
        calls[running[-1]] += 1
        return real_ref(*args, **kwargs)

    real_step = bench_step._step

    def step(x, style):
        running.append(style)
        return real_step(x, style)

    monkeypatch.setattr(token_logp, "linear_log_probs_reference", spy)
    monkeypatch.setattr(bench_step, "_step", step)
    opts = harness.Options(memory=False, out=io.StringIO())
    (case,) = harness.run_op("step", "cpu", "smoke", opts)["cases"]
    results = {r["impl"]: r for r in case["results"]}
    assert set(results) == {"ours", "reference-style"}
    for r in results.values():
        assert "failed" not in r, r.get("failed")
        assert all(map(math.isfinite, r["time_ms"].values()))
    assert results["ours"]["baseline"] == "reference-style"
    checks = {c["name"].split(" ")[0]: c["value"] for c in case["checks"] if "phase" in c["name"]}
    assert set(checks) == {"ours", "reference-style"}
    for value in checks.values():
        for phase in bench_step.PHASES:
            assert re.search(rf"{phase} \d+\.\d{{3}}", value), (phase, value)
    assert calls["reference-style"] > 0 and calls["ours"] == 0, calls


def test_step_bench_sampled_refresh(monkeypatch):
    """The GPU shape's set-up and refresh on the tiny model: a random table at set-up instead
    of encoding the catalog, then REFRESH_SAMPLE items re-encoded per call, the time scaled
    to the whole catalog."""
    from r2ec_fast.benchmarks import bench_step

    monkeypatch.setattr(bench_step, "SAMPLED_REFRESH", True)
    monkeypatch.setattr(bench_step, "REFRESH_SAMPLE", 30)
    spec = bench_step.Spec("tiny", 300, 2, 2, 4)
    sink = {}
    x = bench_step._make_inputs(spec, 0, torch.device("cpu"), sink)
    trainer = x["trainers"]["ours"]
    before = trainer.model.item_table.weight.clone()
    assert before.shape[0] == 301  # random rows for the whole catalog (and the padding row)
    bench_step._step(x, "ours")
    after = trainer.model.item_table.weight
    changed = set((after != before).any(1).nonzero().flatten().tolist())
    # the sample, re-encoded; besides it only the step's own targets (DESIGN §5 step 8)
    assert changed >= set(range(1, 31)) and len(changed - set(range(1, 31))) <= spec.users
    (run,) = sink["ours"]
    assert run["times"]["encode_items"] > 0 and run["reasoning_len"] <= 4

"""The metrics log (strict JSON, resume truncation), phase timers, peak memory, and the plot
command."""
import argparse
import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch

from r2ec_fast.commands.plot import add_plot, collect_series, moving_average
from r2ec_fast.train.metrics import MetricsLogger, PhaseTimer, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_log_converts_values_and_writes_strict_json(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        written = logger.log(1, loss=torch.tensor(0.5), lr=1e-5,
                             grad_norm=torch.tensor(float("nan")), ratio=np.float32(2.0),
                             top=torch.tensor([1, 2]), tokens=np.int64(7), peak=float("inf"),
                             low=-math.inf, finite=True, tag="rollout")
        logger.log(2, loss=torch.tensor(0.25, dtype=torch.bfloat16, requires_grad=True))
    assert written == {"step": 1, "loss": 0.5, "lr": 1e-5, "grad_norm": "nan", "ratio": 2.0,
                       "top": [1, 2], "tokens": 7, "peak": "inf", "low": "-inf",
                       "finite": True, "tag": "rollout"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:  # a strict reader: NaN/Infinity literals would raise here
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    records = read_metrics(tmp_path)  # a run folder reads its metrics.jsonl
    assert math.isnan(records[0]["grad_norm"]) and records[0]["peak"] == math.inf
    assert records[0]["low"] == -math.inf and records[1] == {"step": 2, "loss": 0.25}


def test_log_is_flushed_per_line(tmp_path):
    logger = MetricsLogger(tmp_path, filename="train.jsonl")
    logger.log(3, loss=1.0)
    assert read_metrics(tmp_path / "train.jsonl") == [{"step": 3, "loss": 1.0}]  # still open
    logger.close()


def test_log_rejects_unloggable(tmp_path):
    logger = MetricsLogger(tmp_path)
    with pytest.raises(TypeError, match="'cfg'"):
        logger.log(1, cfg=object())
    with pytest.raises(TypeError, match="step"):
        logger.log(1.0, loss=1.0)


def test_truncate_after_resume(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 8):
        logger.log(step, loss=float(step))
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # a crash mid-line
    resumed = MetricsLogger(tmp_path)
    assert resumed.truncate_after(4) == 4  # later and broken lines are gone
    resumed.log(5, loss=50.0)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    assert not list(tmp_path.glob(".tmp-*"))
    assert MetricsLogger(tmp_path / "new").truncate_after(3) == 0  # nothing logged yet


def test_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # a crash mid-line
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
    with MetricsLogger(tmp_path) as logger:  # resumed without truncating: a fresh line
        logger.log(3, loss=3.0)
    with pytest.warns(UserWarning, match=r"1 broken line\(s\) \(first: line 2\)"):
        assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 3.0}]
    path.write_text('{"step": 1}\n{"step": 2, "lo{"step": 3}\n[5]\n{"step": 4}\n')
    with pytest.warns(UserWarning, match="2 broken line"):
        assert read_metrics(path) == [{"step": 1}, {"step": 4}]
    assert MetricsLogger(tmp_path).truncate_after(10) == 2  # repairs the file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_metrics(path) == [{"step": 1}, {"step": 4}]
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing.jsonl")


def test_phase_timer():
    """Phases accumulate, nest and are charged when they fail; read off a fake clock (a test
    never asserts a real time)."""
    ticks = iter(range(100))
    timer = PhaseTimer(clock=lambda: float(next(ticks)))
    for _ in range(2):
        with timer("rollout"):  # 1 tick each
            pass
    with pytest.raises(RuntimeError):
        with timer("update"):
            with timer("loss"):  # nested phases
                raise RuntimeError("a failing phase is still charged")
    out = timer.pop()
    assert out == {"time_rollout": 2.0, "time_update": 3.0, "time_loss": 1.0}
    wall = PhaseTimer()  # the default clock: wall time, a float per phase
    with wall("real"):
        pass
    assert list(wall.pop()) == ["time_real"]
    assert timer.pop() == {}


def test_peak_memory_grows_with_an_allocation():
    """In a fresh process: the peak of this one may already be far above 64 MiB of growth
    (an earlier test's allocation), which would hide the step."""
    import subprocess
    import sys

    code = ("import numpy as np; from r2ec_fast.train.metrics import peak_memory_mib as p; "
            "a = p(); b = np.ones(64 * 2**20 // 8); c = p(); print(a, c)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    before, after = map(float, out.stdout.split())
    assert before > 0 and after >= before + 32


# ----------------------------------------------------------------------------- plot

def test_collect_series_and_smoothing():
    records = [{"step": 1, "loss": 1.0, "tag": "x", "ok": True},
               {"step": 3, "loss": float("nan")},
               {"step": 2, "loss": 2.0, "lr": 0.1},
               {"step": 2, "loss": 4.0}]  # a repeated step keeps its last value
    assert collect_series(records) == {"loss": ([1, 2], [1.0, 4.0]), "lr": ([2], [0.1])}
    assert collect_series([{"step": 1, "ndcg@10": 0.3}], prefix="eval/") == \
        {"eval/ndcg@10": ([1], [0.3])}
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def run_plot(*argv) -> int:
    parser = argparse.ArgumentParser()
    add_plot(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plot", *map(str, argv)])
    return args.func(args)


@pytest.fixture
def run_dir(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 31):
            logger.log(step, loss=1.0 / step, reward_mean=torch.tensor(step / 30),
                       grad_norm=float("nan") if step == 7 else 0.5, phase="train")
    with MetricsLogger(tmp_path, "eval.jsonl") as logger:
        for step in (10, 20, 30):
            logger.log(step, **{"ndcg@10": step / 100, "hit@10": step / 50})
    return tmp_path


def test_plot_writes_pngs(run_dir, capsys):
    pytest.importorskip("matplotlib")
    assert run_plot(run_dir, "--smooth", 5) == 0
    pngs = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert pngs == ["curves.png", "eval_hit@10.png", "eval_ndcg@10.png", "grad_norm.png",
                    "loss.png", "reward_mean.png"]
    for name in pngs:
        assert (run_dir / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    assert "wrote 6 plots" in capsys.readouterr().out

    out = run_dir / "chosen"
    assert run_plot(run_dir, "--out", out, "--keys", "loss,ndcg@10") == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "eval_ndcg@10.png",
                                                     "loss.png"]


def test_plot_errors(run_dir, tmp_path_factory, monkeypatch, capsys):
    assert run_plot(run_dir, "--keys", "loss,phase") == 2
    assert "no numeric metric 'phase'" in capsys.readouterr().err
    assert run_plot(tmp_path_factory.mktemp("empty")) == 2
    assert "neither metrics.jsonl nor eval.jsonl" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert run_plot(run_dir) == 2
    assert "pip install matplotlib" in capsys.readouterr().err

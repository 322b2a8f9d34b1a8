"""Crash safety under SIGKILL: a training process killed at random moments of a checkpoint save
always leaves `latest_checkpoint` on the newest checkpoint whose save got through, and
`r2ec-fast train --resume` from there ends with the losses of a run that was never killed.

One run folder, a chain of child processes (`crash_child.py`: the real `r2ec-fast train
--resume` CLI with every file operation of `save_checkpoint` reported on a pipe). Each trial
starts a child from the folder as the previous one left it and kills it (SIGKILL) inside its
first or second save, after a chosen file operation. Half of the trials stop the child exactly
there before the kill ("exact", in rounds of one trial per phase: every phase of a save is hit
for certain); the other half kill it as soon as the parent reads that report, or 0-3 ms later,
while the child runs on ("timed": the kill lands wherever the child got to, at times inside a
write or an fsync). A kill that landed after the save had
finished is not counted; trials go on until KILLS kills landed inside a save.

After each kill the folder is checked against an oracle built from the child's reports alone
(which step folders were renamed into place or aside, where `latest` was pointed; the one
atomic rename that may have been in flight at the kill is settled by looking whether its
source is still there): latest_checkpoint must return exactly what the documented rule gives
(the folder `latest` names when complete, else the complete step folder with the largest step),
never older than the child's last finished save, and every step-* folder on disk must be
complete and load. At the end an uninterrupted child trains to the end and metrics.jsonl (one
line per step), eval.jsonl and the final weights, item table and optimizer state must equal a
reference run's exactly (CPU, one thread: bit-identical).

`test_a_crash_before_any_file_operation` is the exhaustive, in-process complement: a save
that dies before each one of its file operations in turn (a next step, and a step saved again).

Reproduce a failure with the seed and trial printed in the assertion message (the plan is a
function of SEED; the timed trials' landing points also depend on the machine's timing).
"""
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from r2ec_fast.train.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from r2ec_fast.train.config import TrainConfig  # noqa: E402
from r2ec_fast.train.metrics import read_metrics  # noqa: E402

CHILD = Path(__file__).with_name("crash_child.py")
SEED = 13
MAX_STEPS = 48  # the chain advances about one step per trial; the final child trains the rest
KILLS = 20  # kills that must land inside a save
MAX_TRIALS = 60
CHILD_TIMEOUT = 300.0  # seconds for one child (a hang fails the test instead of blocking CI)
# the phases of a save, in order; a kill's phase is the last one its save reached
PHASES = ("before-files", "files", "complete-not-renamed", "renamed-not-pointed", "pointed",
          "pruning", "cleanup")
REQUIRED = set(PHASES) - {"cleanup"}  # cleanup: one tiny _remove of nothing, rarely timed
WRITES = {"save_file", "item_table_save", "_write_torch", "_write_bytes"}  # in the step folder
TIME_KEYS = re.compile(r"time_.*|peak_memory_mib")
STEP_DIR = re.compile(r"step-(\d{8})")


def crash_config(root: Path) -> TrainConfig:
    """A few contrastive warm-start steps, then RecPO with 2 rollouts of 3 reasoning tokens
    (so the sampling RNG state matters), a checkpoint every step, an evaluation and a catalog
    refresh now and then."""
    return TrainConfig.from_dict({
        "max_steps": MAX_STEPS, "warm_start_steps": 4, "save_every": 1, "keep_checkpoints": 2,
        "item_refresh_steps": 5, "eval_every": 10,
        "data": {"path": str(root / "data"), "synth_items": 60, "synth_users": 30,
                 "synth_genres": 4, "synth_attributes": 4, "synth_history_max": 6,
                 "eval_users": 4},
        "model": {"path": str(root / "model"), "tiny_arch": "gemma2"},
        "rollout": {"group_size": 2, "max_new_tokens": 3, "eval_max_new_tokens": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "users_per_step": 4},
    })


# ----------------------------------------------------------------------------- the child

def normalise(label: str) -> str:
    return re.sub(r"\d{8}", "#", label)


class Event:
    """One line of crash_child.py's report."""

    def __init__(self, line: str):
        save, index, micros, self.phase, self.name, self.label = line.split(" ")
        self.save, self.index, self.micros = int(save), int(index), int(micros)
        self.key = f"{self.phase} {self.name} {normalise(self.label)}"

    def __repr__(self):
        return f"{self.save}:{self.index} {self.phase} {self.name} {self.label}"


class Child:
    """`crash_child.py train ... --resume` on the run folder, its reports read from a pipe."""

    def __init__(self, root: Path, run_dir: Path, log_name: str, stop: str | None = None):
        read_fd, write_fd = os.pipe()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "CRASH_EVENTS_FD": str(write_fd)}
        env.pop("CRASH_STOP", None)
        if stop:
            env["CRASH_STOP"] = stop
        self.log_path = root / log_name
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), "train", "--config", str(root / "config.json"),
                 "--out", str(run_dir), "--resume", "--no-eval", "--no-progress"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                pass_fds=(write_fd,), env=env)
        os.close(write_fd)  # EOF on read_fd once the child is gone
        self.fd, self.buffer, self.events = read_fd, b"", []
        self.deadline = time.monotonic() + CHILD_TIMEOUT

    def next_event(self) -> Event | None:
        """The next report, or None at EOF (the child is gone)."""
        while b"\n" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                self.proc.kill()
                pytest.fail(f"crash child hung (no report for {CHILD_TIMEOUT:.0f} s); "
                            f"log:\n{self.log_tail()}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        event = Event(line.decode())
        self.events.append(event)
        return event

    def finish(self) -> int:
        """Read every remaining report, close the pipe, reap the child; its exit code."""
        while self.next_event() is not None:
            pass
        os.close(self.fd)
        return self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def run_uninterrupted(root: Path, run_dir: Path, log_name: str) -> list[Event]:
    child = Child(root, run_dir, log_name)
    rc = child.finish()
    assert rc == 0, f"uninterrupted child exited {rc}; log:\n{child.log_tail()}"
    return child.events


# ----------------------------------------------------------------------------- phases

def phase_of(save_events: list[Event]) -> str:
    """The phase a save was in after its last reported event (events of one save, in order)."""
    keys = [e.key for e in save_events]
    ended = set(keys)
    if "end save step-#" in ended:
        return "after-save"
    if "begin save_file model.safetensors" not in ended:
        return "before-files"
    if "end _write_bytes COMPLETE" not in ended:
        return "files"
    if not ended & {"end replace .tmp-step-#>step-#", "end _exchange .tmp-step-#>step-#"}:
        return "complete-not-renamed"
    if "end replace .tmp-latest>latest" not in ended:
        return "renamed-not-pointed"
    discards = [k for k in keys if k.endswith(" _discard step-#")]
    if not discards:
        return "pointed"
    return "pruning" if discards[-1].startswith("begin") else "cleanup"


def where(events: list[Event]) -> str:
    """'in X' (begun, not ended) or 'after X' for the last event."""
    last = events[-1]
    return f"{'in' if last.phase == 'begin' else 'after'} {last.name} {last.label}"


class Oracle:
    """The checkpoint folder's state as the child's reports say, across the whole chain: the
    complete step folders and the step `latest` names (the reports tell renames, and a
    step-* folder exists only by a rename)."""

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir, self.complete, self.pointer = ckpt_dir, set(), None

    def apply(self, events: list[Event]) -> None:
        saving = None
        for n, e in enumerate(events):
            if e.name == "save":
                saving = int(STEP_DIR.fullmatch(e.label).group(1))
            if e.name != "replace":
                continue
            if e.phase == "begin":
                if n + 1 < len(events) or (self.ckpt_dir / e.label.split(">")[0]).exists():
                    continue  # its "end" follows; or killed before the rename happened
            src, dst = e.label.split(">")
            if dst == "latest":
                self.pointer = saving
            elif STEP_DIR.fullmatch(dst):
                self.complete.add(int(STEP_DIR.fullmatch(dst).group(1)))
            elif STEP_DIR.fullmatch(src):  # set aside to be deleted
                self.complete.discard(int(STEP_DIR.fullmatch(src).group(1)))

    def expected(self) -> int | None:
        if self.pointer in self.complete:
            return self.pointer
        return max(self.complete, default=None)


def listing(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []  # none before the first save


def step_of(path: Path | None) -> int | None:
    return None if path is None else int(STEP_DIR.fullmatch(path.name).group(1))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, the tiny model and an uninterrupted reference run (all in subprocesses' format);
    a model, optimizer and scheduler here to load checkpoints into."""
    from r2ec_fast.train.trainer import ensure_data, ensure_model

    root = tmp_path_factory.mktemp("crash")
    config = crash_config(root)
    config.save(root / "config.json")
    data = ensure_data(config.data)  # built here once, so that every child finds them
    model = ensure_model(config.model, data, torch.device("cpu"), config.seed).lm
    events = run_uninterrupted(root, root / "reference", "reference.log")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return {"root": root, "events": events, "model": model, "optimizer": optimizer,
            "scheduler": scheduler}


def full_size(setup, filename: str) -> int | None:
    """The size of a file of the reference run's last checkpoint (of `latest` for .tmp-latest)."""
    folder = latest_checkpoint(setup["root"] / "reference")
    path = folder.parent / "latest" if filename == ".tmp-latest" else folder / filename
    return path.stat().st_size if path.is_file() else None


def load(setup, path: Path) -> dict:
    return load_checkpoint(path, model=setup["model"], optimizer=setup["optimizer"],
                           scheduler=setup["scheduler"])


def targets_by_phase(events: list[Event]) -> dict[str, list[str]]:
    """For each phase, the report keys after which a kill is in that phase, from a typical
    save of the reference run (one that prunes an older checkpoint)."""
    saves = {}
    for e in events:
        saves.setdefault(e.save, []).append(e)
    typical = next(s for s in saves.values() if any(e.name == "_discard" for e in s))
    count = Counter(e.key for e in typical)
    out = {}
    for n in range(len(typical) - 1):  # the last event is "end save": after the save
        if count[typical[n].key] == 1:  # a repeated key would stop at its first occurrence
            out.setdefault(phase_of(typical[:n + 1]), []).append(typical[n].key)
    return out


# ----------------------------------------------------------------------------- every operation

class Crash(Exception):
    pass


def _crash_before(monkeypatch, number: int | None) -> list[str]:
    """Wrap every file operation of `save_checkpoint` (nested ones included) to raise Crash
    before operation `number` (None: never); returns the names of the operations that ran."""
    from r2ec_fast.train import checkpoint as ckpt

    ran = []

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            if number is not None and len(ran) == number:
                raise Crash(f"before operation {number}, {name}{tuple(map(str, args))}")
            paths = [Path(a).name for a in args if isinstance(a, (str, os.PathLike))]
            ran.append(f"{name} {'>'.join(paths)}")
            return fn(*args, **kwargs)
        return wrapper

    for name in ("save_file", "_write_torch", "_write_bytes", "_fsync", "_remove", "_discard",
                 "_exchange"):
        monkeypatch.setattr(ckpt, name, wrap(name, getattr(ckpt, name)))

    class Os:
        replace = staticmethod(wrap("replace", os.replace))

        def __getattr__(self, name):
            return getattr(os, name)

    monkeypatch.setattr(ckpt, "os", Os())
    return ran


@pytest.mark.parametrize("exchange", ["native", "unavailable"])
@pytest.mark.parametrize("keep_last", [1, 2])
@pytest.mark.parametrize("what", ["next step", "same step again"])
def test_a_crash_before_any_file_operation(tmp_path, monkeypatch, what, keep_last, exchange):
    """Checkpoints of steps 1 and 2, then a save of step 3 (or of step 2 again, as a resumed
    run saving its last step again does) that dies before its k-th file operation, for every
    k: latest_checkpoint gives step 2 until `latest` was replaced (then 3), every step folder
    on disk loads, and a re-saved step has its old weights until the atomic exchange (then the
    new ones). Without an exchange (other platforms, `_exchange` returns False) a crash between
    setting the old copy aside and renaming the new one in leaves only the older checkpoints:
    the documented limit."""
    from r2ec_fast.train import checkpoint as ckpt

    probe = tmp_path / "probe"
    (probe / "a").mkdir(parents=True)
    (probe / "b").mkdir()
    if exchange == "native" and not ckpt._exchange(probe / "a", probe / "b"):
        pytest.skip("no atomic exchange (renameat2) on this platform or filesystem")
    if exchange == "unavailable":
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    step = 3 if what == "next step" else 2

    def model_with(value: float) -> torch.nn.Module:
        model = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(model.weight, value)
        return model

    def save(run, at, value, crash=None):
        with monkeypatch.context() as m:
            ran = _crash_before(m, crash)
            ckpt.save_checkpoint(run, at, model=model_with(value), optimizer=None,
                                 trainer_state={"value": value}, keep_last=keep_last)
        return ran

    name = f"step-{step:08d}"
    save(tmp_path / "full", 1, 1.0)
    save(tmp_path / "full", 2, 2.0)
    ops = save(tmp_path / "full", step, 9.0)  # the operations of an uncrashed save
    pointed = ops.index("replace .tmp-latest>latest")  # the new checkpoint counts after this
    # the rename or exchange that puts the new folder in place (the last: an exchange that
    # could not be done comes before the rename)
    swap = max(n for n, op in enumerate(ops) if op.endswith(f" .tmp-{name}>{name}"))
    aside = [n for n, op in enumerate(ops) if op == f"replace {name}>.tmp-old-{name}"]
    assert bool(aside) == (what != "next step" and exchange == "unavailable"), ops
    for k in range(len(ops) + 1):
        run = tmp_path / f"crash-{k:02d}"
        save(run, 1, 1.0)
        save(run, 2, 2.0)
        if k < len(ops):
            with pytest.raises(Crash):
                save(run, step, 9.0, crash=k)
        else:
            save(run, step, 9.0)
        where = f"crash before {ops[k] if k < len(ops) else 'nothing'} (operation {k})"
        found = latest_checkpoint(run)
        if aside and aside[0] < k <= swap:  # without exchange: the step folder is aside
            assert step_of(found) == (1 if keep_last > 1 else None), where  # the limit
        else:
            assert step_of(found) == (step if k > pointed else 2), where
        for folder in (run / "checkpoints").glob("step-*"):
            out = load_checkpoint(folder, model=model_with(0.0))
            assert out["step"] == step_of(folder), where
        if found is not None:
            model = model_with(0.0)
            value = load_checkpoint(found, model=model)["trainer_state"]["value"]
            assert torch.equal(model.weight, torch.full((2, 3), value)), where
            if step_of(found) == step:
                assert value == (9.0 if k > swap else 2.0), where
        kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))[-1:]
        save(run, 4, 4.0)  # the next save cleans up (no .tmp-* left) and prunes as usual
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
            ["latest", "step-00000004"] + (kept if keep_last > 1 else [])), where


# ----------------------------------------------------------------------------- the test

def test_sigkill_mid_save_then_resume_matches_uninterrupted(setup):
    root, plan = setup["root"], random.Random(SEED)
    run_dir = root / "chain"
    ckpt_dir = run_dir / "checkpoints"
    targets = targets_by_phase(setup["events"])
    assert set(targets) == set(PHASES), sorted(targets)
    oracle = Oracle(ckpt_dir)
    counted, phases, landed, trials, mid_write = 0, Counter(), Counter(), [], []
    for trial in range(MAX_TRIALS):
        if counted >= KILLS and REQUIRED <= set(phases):
            break
        start = oracle.expected() or 0
        assert start <= MAX_STEPS - 2, f"the chain reached step {start}: raise MAX_STEPS"
        phase = PHASES[trial % len(PHASES)]
        exact = (trial // len(PHASES)) % 2 == 0  # the first round is exact: every phase
        nth_save = 1 if trial == 0 else plan.choice((1, 2))  # trial 0: a run's first save
        nth_save = min(nth_save, MAX_STEPS - 1 - start)  # never the run's last save
        key = plan.choice(targets[phase])
        # timed: half at once (as soon as the report is read), half 0-3 ms later
        delay = 0.0 if exact or plan.random() < 0.5 else plan.uniform(0.0, 0.003)
        what = (f"seed {SEED} trial {trial}: from step {start}, kill in save {nth_save} "
                f"{'at' if exact else f'{delay * 1e3:.2f} ms after reading'} {key!r}")
        child = Child(root, run_dir, f"trial-{trial:02d}.log",
                      stop=f"{nth_save} {key}" if exact else None)
        while True:
            event = child.next_event()
            if event is None:
                break  # the child is gone before its target: judged below by its exit code
            if event.save >= nth_save and event.key == key:
                if delay:
                    time.sleep(delay)
                child.proc.send_signal(signal.SIGKILL)  # no-op once the child was reaped
                break
        rc = child.finish()
        assert rc == -signal.SIGKILL, f"{what}: the child exited {rc}; log:\n{child.log_tail()}"
        events = child.events
        assert events, f"{what}: no report"
        last_save = [e for e in events if e.save == events[-1].save]
        got = phase_of(last_save)
        finished = [int(STEP_DIR.fullmatch(e.label).group(1)) for e in events
                    if e.key == "end save step-#"]
        oracle.apply(events)
        what += f" -> landed {where(events)} ({got}), finished saves {finished}"
        trials.append(what)

        found = latest_checkpoint(run_dir)
        assert step_of(found) == oracle.expected(), (
            f"{what}: latest_checkpoint gave {found}, the reports say step "
            f"{oracle.expected()} (complete {sorted(oracle.complete)}, latest -> "
            f"{oracle.pointer}); on disk: {sorted(p.name for p in listing(ckpt_dir))}")
        if finished:
            assert step_of(found) >= finished[-1], f"{what}: a finished save was lost"
        on_disk = sorted(p for p in listing(ckpt_dir) if STEP_DIR.fullmatch(p.name))
        assert {step_of(p) for p in on_disk} == oracle.complete, f"{what}: {on_disk}"
        for folder in on_disk:  # never a half-written or half-deleted step folder
            assert load(setup, folder)["step"] == step_of(folder), f"{what}: {folder}"
        steps = [m["step"] for m in read_metrics(run_dir)]  # a line cut by the kill is skipped
        assert steps == list(range(1, len(steps) + 1)), (
            f"{what}: metrics.jsonl after this child's --resume from step {start} holds steps "
            f"{steps}; each step once is expected (the resume truncates the log to the "
            f"checkpoint's step{', and to nothing without a checkpoint' if not start else ''})")

        landed[got] += 1
        if got != "after-save":
            counted += 1
            phases[got] += 1
        last = events[-1]
        if not exact and last.phase == "begin" and last.name in WRITES:  # killed inside it
            folder = ckpt_dir if last.label == ".tmp-latest" else \
                ckpt_dir / f".tmp-{last_save[0].label}"
            size = (folder / last.label).stat().st_size if (folder / last.label).is_file() else 0
            mid_write.append(f"{last.label}: {size} of {full_size(setup, last.label)} bytes")

    summary = (f"{counted} kills inside a save in {len(trials)} trials; phases "
               f"{dict(phases)}; all landings {dict(landed)}; inside a write: {mid_write}")
    print("\n" + summary + "\n" + "\n".join(trials))
    assert counted >= KILLS, summary
    assert REQUIRED <= set(phases), summary

    run_uninterrupted(root, run_dir, "final.log")
    reference = read_metrics(root / "reference")
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, MAX_STEPS + 1)), (
        f"metrics.jsonl must hold each step once: {[m['step'] for m in resumed]}")
    assert [m["step"] for m in reference] == list(range(1, MAX_STEPS + 1))
    for ref, res in zip(reference, resumed):
        keys = {k for k in ref if not TIME_KEYS.fullmatch(k)}
        assert keys == {k for k in res if not TIME_KEYS.fullmatch(k)}
        assert {"loss", "token_loss", "item_loss", "reward_mean", "grad_norm"} <= keys
        differ = {k: (ref[k], res[k]) for k in sorted(keys) if ref[k] != res[k]}
        assert not differ, f"step {ref['step']}: resumed != uninterrupted: {differ}\n{summary}"
    evals = [[{k: v for k, v in json.loads(line).items() if not TIME_KEYS.fullmatch(k)}
              for line in (folder / "eval.jsonl").read_text().splitlines()]
             for folder in (root / "reference", run_dir)]
    assert [e["step"] for e in evals[0]] == list(range(10, MAX_STEPS + 1, 10))
    assert evals[1] == evals[0]

    final = [latest_checkpoint(folder) for folder in (root / "reference", run_dir)]
    assert [step_of(p) for p in final] == [MAX_STEPS, MAX_STEPS]
    states = []
    for path in final:
        out = load(setup, path)
        states.append(({k: v.clone() for k, v in setup["model"].state_dict().items()},
                       out["item_table"].weight.clone(),
                       [t.clone() for s in setup["optimizer"].state.values()
                        for t in s.values()]))
    (w0, t0, o0), (w1, t1, o1) = states
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert torch.equal(t0, t1)
    assert len(o0) == len(o1) and all(torch.equal(a, b) for a, b in zip(o0, o1))

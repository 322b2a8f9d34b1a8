"""Out of memory inside a training step (issue 13 item 2): retried at half the piece size,
the same gradients accumulated, nothing skipped, the event in metrics.jsonl.

Each test injects `torch.OutOfMemoryError` at one point of a step of a tiny RecPO run (one
contrastive warm-start step, then RecPO steps: 4 users x G = 2) and compares the run with an
uninterrupted one: the same steps, the same losses and rewards, the same gradients at every
optimizer step (up to float summation order), the same trajectories. Points injected:
rollout (the trainer's call of the engine), the engine's KV-cache allocation, the answer-state
forward, scoring, the in-batch target encoding, the loss forward and the backward, each with
one logical micro-batch and with two (`optim.micro_batch_users`); then the floor (one
trajectory per piece still out of memory: a clear error) and torchrun's refusal.
"""
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from r2ec_fast.train.config import TrainConfig  # noqa: E402
from r2ec_fast.testing import rel_error  # noqa: E402
from r2ec_fast.train.metrics import read_metrics  # noqa: E402

STEPS = 3  # one warm-start step, two RecPO steps
COMPARED = ("loss", "token_loss", "item_loss", "reward_mean", "ndcg", "rc", "advantage_abs",
            "grad_norm", "clip_frac", "reasoning_len")


def config(root, micro_users: int = 0) -> TrainConfig:
    return TrainConfig.from_dict({
        "max_steps": STEPS, "save_every": 0, "item_refresh_steps": 0, "eval_every": 0,
        "warm_start_steps": 1,
        "data": {"path": str(root / "data"), "synth_items": 200, "synth_users": 40},
        "model": {"path": str(root / "model"), "tiny_arch": "gemma2"},
        "rollout": {"group_size": 2, "max_new_tokens": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "users_per_step": 4,
                  "micro_batch_users": micro_users},
    })


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from r2ec_fast.train.trainer import Trainer

    root = tmp_path_factory.mktemp("oom")
    Trainer(config(root), root / "build", progress=False)  # data and model, built once
    return root


def run(root, name: str, micro_users: int = 0, inject=None):
    """Train STEPS steps; `inject(trainer, monkeypatch-like patcher)` installs the fault.
    Returns (metrics, gradients at each optimizer step, trajectories' tokens, trainer)."""
    from r2ec_fast.train.trainer import Trainer

    trainer = Trainer(config(root, micro_users), root / name, progress=False)
    grads, tokens = [], []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
        {n: p.grad.clone() for n, p in trainer.model.lm.named_parameters()
         if p.grad is not None}))
    sample = trainer.rollout.sample

    def recording_sample(prompts, seeds, group_size):
        out = sample(prompts, seeds, group_size)
        tokens.extend(t.tokens for t in out)
        return out

    trainer.rollout.sample = recording_sample
    with pytest.MonkeyPatch.context() as patch:
        if inject is not None:
            inject(trainer, patch)
        trainer.fit(STEPS)
    return read_metrics(root / name / "metrics.jsonl"), grads, tokens, trainer


def oom(what: str):
    return torch.OutOfMemoryError(f"CUDA out of memory (injected: {what})")


class Budget:
    """Raise out-of-memory while the work is larger than `limit` (rows, users...), at most
    `times` times; counts what it raised."""

    def __init__(self, limit: int, times: int = 10):
        self.limit, self.times, self.raised = limit, times, 0

    def check(self, size: int, what: str) -> None:
        if size > self.limit and self.raised < self.times:
            self.raised += 1
            raise oom(what)


def inject_rollout(budget):
    def install(trainer, patch):
        inner = trainer.rollout.sample

        def sample(prompts, seeds, group_size):
            budget.check(len(prompts), "rollout")
            return inner(prompts, seeds, group_size)

        patch.setattr(trainer.rollout, "sample", sample)
    return install


def inject_kv_cache(budget):
    def install(trainer, patch):
        from r2ec_fast.rollout.model_runner import ModelRunner

        inner = ModelRunner.allocate

        def allocate(self):
            budget.check(self.num_blocks, "KV cache")
            return inner(self)

        patch.setattr(ModelRunner, "allocate", allocate)
    return install


def inject_step_function(name: str, budget, grad_only: bool = False):
    """A function of r2ec_fast.train.step raising on inputs of more than `limit` rows."""
    def install(trainer, patch):
        from r2ec_fast.train import step

        inner = getattr(step, name)

        def wrapped(*args, **kwargs):
            rows = args[1].input_ids.shape[0] if name == "policy_forward" else args[0].shape[0]
            if not grad_only or torch.is_grad_enabled():
                budget.check(rows, name)
            return inner(*args, **kwargs)

        patch.setattr(step, name, wrapped)
    return install


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, budget, rows):
        ctx.budget, ctx.rows = budget, rows
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.budget.check(ctx.rows, "backward")
        return grad, None, None


def inject_backward(budget):
    """The loss of a piece of more than `limit` trajectories fails in its backward (with two
    micro-batches, after the first one's gradients reached the weights)."""
    def install(trainer, patch):
        from r2ec_fast.train import step

        inner = step.step_losses

        def wrapped(*args, **kwargs):
            out = inner(*args, **kwargs)
            out.loss = _FailingBackward.apply(out.loss, budget, args[1].shape[0])
            return out

        patch.setattr(step, "step_losses", wrapped)
    return install


def inject_item_encoding(budget):
    """The in-batch targets' encoding fails for more than `limit` items (also during the
    backward's recompute, once pieces are checkpointed), after earlier pieces' gradients have
    reached the weights."""
    def install(trainer, patch):
        inner = trainer._items_hidden

        def items_hidden(item_ids, piece=None):
            if torch.is_grad_enabled() and (piece is None or piece >= len(item_ids)):
                budget.check(len(item_ids), "item encoding")
            return inner(item_ids, piece)

        patch.setattr(trainer, "_items_hidden", items_hidden)
    return install


@pytest.fixture(scope="module")
def straight(root):
    """The uninterrupted runs, one per micro-batch setting."""
    return {micro: run(root, f"straight-{micro}", micro) for micro in (0, 2)}


def assert_same_run(a, b, what: str):
    """The same steps, trajectories, metrics and gradients. Tolerance 1e-4 relative: the
    pieces' sums run in another float order (padding to another width too), and two Adam
    updates compound it (measured: up to 1.3e-5 at the third step, ~1e-7 at the first); a
    skipped or doubled piece moves these by tens of percent."""
    (ma, ga, ta, _), (mb, gb, tb, _) = a, b
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1)), f"{what}: steps skipped"
    assert ta == tb, f"{what}: other trajectories"
    for x, y in zip(ma, mb):
        for key in COMPARED:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), (what, x["step"], key)
    assert len(ga) == len(gb) == STEPS, f"{what}: optimizer steps"
    for step, (x, y) in enumerate(zip(ga, gb)):
        assert x.keys() == y.keys()
        errors = {name: rel_error(y[name], x[name]) for name in x}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-4, (what, step, worst, errors[worst])


POINTS = {  # name: (installer factory, limit, phase in the log)
    "rollout": (inject_rollout, 1, "rollout"),
    "forward": (lambda b: inject_step_function("policy_forward", b, grad_only=True), 2,
                "forward"),
    "scoring": (lambda b: inject_step_function("rewards", b), 2, "scoring"),
    "backward": (inject_backward, 1, "backward"),
    "item_encoding": (inject_item_encoding, 1, "item encoding"),
}


@pytest.mark.parametrize("micro", [0, 2])
@pytest.mark.parametrize("point", sorted(POINTS))
def test_out_of_memory_is_retried_with_the_same_result(root, straight, point, micro):
    factory, limit, phase = POINTS[point]
    budget = Budget(limit)
    result = run(root, f"{point}-{micro}", micro, factory(budget))
    assert budget.raised > 0, "the fault was never injected"
    assert_same_run(straight[micro], result, point)
    metrics, trainer = result[0], result[3]
    logged = [m for m in metrics if m["oom_retries"]]
    assert sum(m["oom_retries"] for m in metrics) == budget.raised
    assert logged and all(phase in m["oom_phases"] for m in logged), logged
    size_key = "rollout_users_per_call" if point == "rollout" else "trajectories_per_piece"
    assert metrics[-1][size_key] <= limit  # the halved size is kept for the later steps
    assert (trainer.max_rollout_users if point == "rollout"
            else trainer.max_trajectories) <= limit


def test_kv_cache_allocation_shrinks_and_preempts(root, straight):
    """The engine's cache allocation runs out of memory above half of what the uninterrupted
    run allocated: the cache is halved (never below one group's worst case), the scheduler
    admits and preempts within it, and the trajectories and the step are the same."""
    full = straight[0][3].rollout.engine.stats.num_blocks
    budget = Budget(limit=full // 2)
    result = run(root, "kv", 0, inject_kv_cache(budget))
    assert budget.raised > 0
    assert_same_run(straight[0], result, "kv cache")
    stats = result[3].rollout.engine.stats
    assert stats.cache_shrinks > 0 and stats.num_blocks <= full // 2
    before = straight[0][3].rollout.engine.stats
    # the smaller cache held fewer groups at once: they waited (more prefills) or were preempted
    assert stats.peak_blocks <= stats.num_blocks
    assert stats.preemptions > 0 or stats.prefill_steps > before.prefill_steps, (stats, before)
    assert all(m["oom_retries"] == 0 for m in result[0])  # the engine absorbed it


def test_down_to_one_trajectory_then_a_clear_error(root):
    """Pieces halve down to one trajectory (which still works), and out of memory at one
    trajectory is an error that says so, not a skipped step."""
    from r2ec_fast.train.oom import OutOfMemoryInStep

    budget = Budget(limit=1)
    metrics = run(root, "floor", 0, inject_step_function("rewards", budget))[0]
    assert metrics[-1]["trajectories_per_piece"] == 1 and budget.raised >= 2
    with pytest.raises(OutOfMemoryInStep, match="out of memory in the scoring at 1 "
                                                "trajectory.*nothing left to split"):
        run(root, "floor-fail", 0, inject_step_function("rewards", Budget(limit=0)))


def test_torchrun_job_stops_with_what_to_lower(root):
    from r2ec_fast.train.oom import OutOfMemoryInStep
    from r2ec_fast.train.trainer import Trainer

    trainer = Trainer(config(root), root / "dist", progress=False)
    trainer.dist = SimpleNamespace(enabled=True, rank=1)
    with pytest.raises(OutOfMemoryInStep, match="rank 1.*torchrun.*micro_batch_users"):
        trainer._out_of_memory(oom("test"), "forward", 8, "trajectory")


def test_out_of_memory_is_recognised():
    from r2ec_fast.memory import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you "
                                         "tried to allocate 1000 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only runtime errors

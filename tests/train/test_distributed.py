"""Data-parallel RecPO: `r2ec-fast train` under torchrun (2 CPU processes, FSDP2 over gloo)
against one process on the same global batch (4 users: 2 per process), and a 2-process
checkpoint resumed in 1 process and in 2."""
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from r2ec_fast.train.checkpoint import CHECKPOINTS_DIR  # noqa: E402
from r2ec_fast.train.distributed import (  # noqa: E402
    DistContext, optimizer_state_by_index, optimizer_state_by_name, weighted_means,
)
from r2ec_fast.train.metrics import read_metrics  # noqa: E402

from test_trainer import tiny_config  # noqa: E402  (tests/train is on sys.path)

STEPS = 2
# the losses are sums of float32 terms taken in another order (and over another padding
# width) on two processes: equal to float32 rounding, not bitwise
RTOL, ATOL = 1e-4, 1e-6
COMPARED = ("loss", "token_loss", "item_loss", "reward_mean", "reward_std", "ndcg", "rc",
            "advantage_abs", "grad_norm", "clip_frac")


def config(root):
    # save every step, so that step 1 of the 2-process run can be resumed; 8 users to
    # evaluate before and after (the "after" evaluation re-encodes the catalog: the sharded
    # encoder on trained weights)
    return tiny_config(root, max_steps=STEPS, save_every=1, item_refresh_steps=0)


def launch(*args: str, processes: int = 1) -> str:
    """`python ARGS` as a fresh process, or under `torchrun --nproc_per_node N --standalone`
    (gloo, a free port); its stdout. Separate processes keep this one's memory small."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else []
    # this folder on the path explicitly: under PYTHONSAFEPATH (the test command) a script's
    # own folder is not (the worker imports test_trainer)
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def train(root, out, processes: int, *args: str) -> str:
    """`r2ec-fast train` in one process or under torchrun; its stdout."""
    return launch("-m", "r2ec_fast.cli", "train", "--config", str(root / "config.json"),
                  "--out", str(out), "--no-progress", *args, processes=processes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same steps from the same data and model in one process and in two."""
    root = tmp_path_factory.mktemp("dist")
    config(root).save(root / "config.json")
    train(root, root / "one", 1)  # builds the data and the model first
    return root, train(root, root / "two", 2)


def assert_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """Equal to float32 rounding: within RTOL, or within RTOL of the tensor's scale (a sum
    of terms of mixed sign carries the rounding of its largest terms)."""
    atol = RTOL * reference.abs().max().item() + ATOL
    close = torch.isclose(ours, reference, rtol=RTOL, atol=atol)
    assert bool(close.all()), (what, f"{int((~close).sum())} of {close.numel()} differ, the "
                               f"largest by {(ours - reference).abs().max().item():.3g}")


def assert_weights_close(ours: torch.Tensor, reference: torch.Tensor, steps: int, lr: float,
                         what: str) -> None:
    """After `steps` AdamW steps: AdamW moves each weight by about lr x g / |g|, so where a
    gradient is at float32-noise level (|g| near 0) the two runs may move it differently, by
    at most about 2 lr per step; those must stay rare (under 0.5%: measured up to 14 of 8,192,
    by at most 2.2e-5, with the paged engine's samples; 0.1% held with HF generate's), and
    everything else float32-equal."""
    close = torch.isclose(ours, reference, rtol=RTOL, atol=ATOL)
    assert int((~close).sum()) <= max(2, close.numel() // 200), (what, int((~close).sum()))
    assert (ours - reference).abs().max().item() <= 2 * lr * steps, what


def assert_close_metrics(ours: dict, reference: dict, where: str) -> None:
    for key in COMPARED:
        assert ours[key] == pytest.approx(reference[key], rel=RTOL, abs=ATOL), (where, key)
    # the sampled tokens are the same: seeded per (step, user), whatever the rank
    assert ours["reasoning_len"] == reference["reasoning_len"], where


def test_two_processes_equal_one(runs):
    root, stdout = runs
    lr = config(root).optim.lr
    one, two = read_metrics(root / "one"), read_metrics(root / "two")
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))  # rank 0 alone logs
    for a, b in zip(one, two):
        assert_close_metrics(b, a, f"step {a['step']}")
    assert stdout.count("run folder:") == 1  # rank 0 alone prints
    # evaluation before and after: 8 users, 4 per process, the means combined
    evals = [read_metrics(root / run / "eval.jsonl") for run in ("one", "two")]
    assert [e["step"] for e in evals[1]] == [0, STEPS] and evals[1][0]["users"] == 8
    for a, b in zip(*evals):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == (value if isinstance(value, str) else
                              pytest.approx(value, rel=RTOL, abs=ATOL)), (a["step"], key)
    # checkpoints: the one-process format, full tensors, the same values
    for step in range(1, STEPS + 1):
        name = f"step-{step:08d}"
        a, b = root / "one" / CHECKPOINTS_DIR / name, root / "two" / CHECKPOINTS_DIR / name
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert json.loads((a / "trainer_state.json").read_text()) == \
            json.loads((b / "trainer_state.json").read_text())
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys()  # tied lm_head stored as an alias, as in one process
        for key in wa:
            assert_weights_close(wb[key], wa[key], step, lr, f"{name} {key}")
        ta, tb = (load_file(p / "item_table.safetensors")["weight"] for p in (a, b))
        assert_close(tb, ta, f"{name} item table")
        oa, ob = (torch.load(p / "optimizer.pt", weights_only=True) for p in (a, b))
        assert oa["param_groups"] == ob["param_groups"]
        assert oa["state"].keys() == ob["state"].keys()
        for index, state in oa["state"].items():
            for key, value in state.items():
                assert_close(ob["state"][index][key], value, f"{name} optimizer {index} {key}")
        assert (torch.load(a / "scheduler.pt", weights_only=True)
                == torch.load(b / "scheduler.pt", weights_only=True))


def test_two_process_checkpoint_resumes_in_one(runs):
    """Step 1 of the 2-process run, resumed by a plain `r2ec-fast train --resume`, trains
    step 2 as the 1-process run did."""
    root, _ = runs
    out = root / "resumed"
    shutil.copytree(root / "two" / CHECKPOINTS_DIR / "step-00000001",
                    out / CHECKPOINTS_DIR / "step-00000001")
    train(root, out, 1, "--resume", "--no-eval")
    (metrics,) = read_metrics(out)
    assert metrics["step"] == STEPS
    assert_close_metrics(metrics, read_metrics(root / "one")[1], "resumed in 1 process")


def test_sharded_resume_and_rollout(runs, tmp_path):
    """In 2 processes (see `sharded_worker`): a checkpoint loads into the sharded model and
    optimizer and gathers back bit for bit; then each rank samples its own users with the
    parameters all-gathered once for the whole rollout (not once per decode step; no
    collective while generating, so ranks may stop at different lengths), and the samples
    are those of an unsharded model loaded from the same checkpoint."""
    root, _ = runs
    out = tmp_path / "sharded.json"
    launch(__file__, config(root).model.path,
           str(root / "two" / CHECKPOINTS_DIR / "step-00000001"), str(out), processes=2)
    result = json.loads(out.read_text())
    assert result["same_weights"] and result["same_optimizer"]
    assert result["same_samples"]
    assert 1 <= result["all_gathers"] <= result["fsdp_groups"] < result["decode_steps"] * 2


def test_rank_shares_cover_the_batch_once():
    for n in (0, 1, 4, 7, 8):
        for world in (1, 2, 3):
            parts = [list(range(n))[DistContext(rank=r, world_size=world).split(n)]
                     for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_optimizer_state_numbering_round_trips():
    names = ["a.weight", "b.weight", "c.bias"]
    numbered = {"state": {0: {"step": 1}, 2: {"step": 3}},
                "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2, "params": [2]}]}
    named = optimizer_state_by_name(numbered, names)
    assert named["state"] == {"a.weight": {"step": 1}, "c.bias": {"step": 3}}
    assert named["param_groups"][1] == {"lr": 0.2, "params": ["c.bias"]}
    assert optimizer_state_by_index(named, names) == numbered


def test_one_process_results_pass_through_unchanged():
    out = {"hit@5": 0.1, "users": 3, "reasoning_len": 2.5}
    assert weighted_means(out, 3, DistContext.single("cpu")) is out


# ----------------------------------------------------------------------------- the worker

def same(a, b) -> bool:
    """Nested dicts / lists / tensors equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def sharded_worker(model_path: str, checkpoint: str, out_path: str) -> None:
    """Run under torchrun by test_sharded_resume_and_rollout: 4 users, 2 per rank, G = 2. The
    process group is closed after `sharded_check` has returned, so that its sharded model is
    gone first (see close_distributed), as `r2ec-fast train` does."""
    from r2ec_fast.train.distributed import close_distributed, init_distributed

    ctx = init_distributed("cpu")
    finished = False
    try:
        sharded_check(ctx, model_path, checkpoint, out_path)
        finished = True
    finally:
        close_distributed(ctx, wait=finished)


def sharded_check(ctx, model_path: str, checkpoint: str, out_path: str) -> None:
    import torch.distributed as dist

    from r2ec_fast.data.prompts import PromptConfig
    from r2ec_fast.model import DualHeadModel
    from r2ec_fast.rollout.hf import HFRollout
    from r2ec_fast.train.checkpoint import load_checkpoint
    from r2ec_fast.train.distributed import full_state, parallelize, sharded_loaders

    def rollout(model):
        answer = model.tokenizer.convert_tokens_to_ids(PromptConfig().answer_start)
        return HFRollout(model, answer, temperature=2.0, top_k=50, max_new_tokens=6)

    model = DualHeadModel.from_pretrained(model_path, device="cpu")
    plan = parallelize(model, ctx)
    optimizer = torch.optim.AdamW(model.lm.parameters())  # hyperparameters: loaded
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # adds initial_lr as saved
    load_checkpoint(checkpoint, **dict(zip(("model", "optimizer"),
                                           sharded_loaders(model.lm, optimizer, ctx))))
    weights, optimizer_state = full_state(model.lm, optimizer, ctx)

    prompts = [model.tokenizer(f"user {u} liked item {3 * u}")["input_ids"] for u in range(4)]
    seeds = [1000 + u for u in range(4)]
    mine = ctx.split(4)
    all_gather = dist.all_gather_single  # what FSDP2 all-gathers parameters with
    calls = []
    dist.all_gather_single = lambda *a, **k: calls.append(1) or all_gather(*a, **k)
    with plan.gathered():
        samples = [t.completion for t in rollout(model).sample(prompts[mine], seeds[mine], 2)]
    dist.all_gather_single = all_gather
    every = [None] * ctx.world_size
    dist.all_gather_object(every, samples)
    if ctx.is_main:
        saved = load_file(f"{checkpoint}/model.safetensors")
        plain = DualHeadModel.from_pretrained(model_path, device="cpu")
        load_checkpoint(checkpoint, model=plain.lm)
        reference = [t.completion for t in rollout(plain).sample(prompts, seeds, 2)]
        result = {
            "same_weights": same({k: weights.state_dict()[k] for k in saved}, saved),
            "same_optimizer": same(optimizer_state.state_dict(),
                                   torch.load(f"{checkpoint}/optimizer.pt", weights_only=True)),
            "same_samples": sum(every, []) == reference, "all_gathers": len(calls),
            "fsdp_groups": len(plan.modules), "decode_steps": max(map(len, reference))}
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    sharded_worker(*sys.argv[1:])

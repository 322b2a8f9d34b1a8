"""The RecPO loop on a tiny model: a full step, the loss pieces against float64, resume."""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from r2ec_fast.ops import linear_log_probs_reference  # noqa: E402
from r2ec_fast.train.config import TrainConfig  # noqa: E402
from r2ec_fast.train.metrics import read_metrics  # noqa: E402
from r2ec_fast.testing import train_config  # noqa: E402


def tiny_config(root, **overrides) -> TrainConfig:
    values = {
        "max_steps": 4, "save_every": 2, "item_refresh_steps": 3, "eval_every": 0,
        "data": {"path": str(root / "data"), "synth_items": 200, "synth_users": 40,
                 "eval_users": 8},
        "model": {"path": str(root / "model"), "tiny_arch": "gemma2"},
        "rollout": {"group_size": 2, "max_new_tokens": 4, "eval_max_new_tokens": 3},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "users_per_step": 4},
    }
    return train_config(values, **overrides)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Synthetic data and a tiny Gemma-2 built once (the first Trainer makes them)."""
    from r2ec_fast.train.trainer import Trainer

    root = tmp_path_factory.mktemp("tiny")
    Trainer(tiny_config(root), root / "warmup", progress=False)
    return root


@pytest.mark.parametrize("engine", ["paged", "hf"])
def test_one_full_step(root, engine):
    from r2ec_fast.rollout.engine import EngineRollout
    from r2ec_fast.rollout.hf import HFRollout
    from r2ec_fast.train.trainer import Trainer

    trainer = Trainer(tiny_config(root, **{"rollout.engine": engine}), root / f"one-{engine}",
                      progress=False)
    assert isinstance(trainer.rollout, EngineRollout if engine == "paged" else HFRollout)
    if engine == "paged":  # the CUDA options left to the engine (on where the model is on CUDA)
        e = trainer.rollout.engine
        assert (e.decode_graphs, e.fuse_norms, e.cascade) == (None, None, None)
        assert e.compile_decode is False
    before = {n: p.detach().clone() for n, p in trainer.model.lm.named_parameters()}
    table_before = trainer.model.item_table.weight.clone()
    metrics = trainer.train_step()
    for key in ("loss", "token_loss", "item_loss", "reward_mean", "reward_std", "ndcg", "rc",
                "advantage_abs", "clip_frac", "reasoning_len", "grad_norm"):
        assert math.isfinite(metrics[key]), key
    assert metrics["reasoning_len"] > 0 and metrics["grad_norm"] > 0
    changed = [n for n, p in trainer.model.lm.named_parameters()
               if not torch.equal(p.detach(), before[n])]
    assert changed  # the optimizer moved the weights
    # the step's own target encodings (taken before its update) went into the table: equal
    # to the initial rows for step 1, fresh ones (moved weights) for step 2's targets only
    assert torch.equal(trainer.model.item_table.weight, table_before)
    position = trainer.position
    trainer.train_step()
    rows = trainer._order()[position:position + 4]
    targets = set(trainer.data["train"].item_id[rows].tolist())
    moved = (trainer.model.item_table.weight != table_before).any(1).nonzero().flatten()
    assert set(moved.tolist()) == targets
    assert trainer.step == 2


def test_loss_pieces_equal_a_float64_restatement(root):
    """step_losses on real tensors of one step vs DESIGN §5 written out in float64."""
    from r2ec_fast.train.config import RecPOConfig
    from r2ec_fast.train.recpo import relabel_item_advantages
    from r2ec_fast.train.step import policy_forward, step_losses, trajectory_batch
    from r2ec_fast.train.trainer import Trainer, user_seed

    trainer = Trainer(tiny_config(root), root / "pieces", progress=False)
    rows = trainer.next_users()
    G, B = 2, len(rows)
    trajs = trainer.rollout.sample(trainer.user_prompt_ids("train", rows),
                                   [user_seed(0, 0, r) for r in rows], G)
    batch = trajectory_batch(trajs, trainer.model.tokenizer.pad_token_id, trainer.device)
    with torch.no_grad():
        h, token_hidden = policy_forward(trainer.model, batch)
        targets = trainer.data["train"].item_id[rows].tolist()
        item_h = trainer._items_hidden(targets)
    adv = torch.tensor([0.7, -0.7, 1.1, -1.1, -0.3, 0.3, 0.0, 0.0])
    recpo = RecPOConfig(relabel_topk=1)
    h32, th32, ih32 = (x.detach().float().clone().requires_grad_()
                       for x in (h, token_hidden, item_h))
    item_adv = relabel_item_advantages(adv, G, recpo.relabel_topk)
    labels = torch.arange(B).repeat_interleave(G)
    out = step_losses(trainer.model, h32, th32, batch, adv, item_adv, None, None, ih32, labels,
                      recpo, 2.0, 1.0, 1.0, B, B * G, batch.token_ids.numel())
    out.loss.backward()
    # float64: token loss = mean over sampled tokens of -A * r (r = 1, on-policy) with logp
    # under softcap 30 and temperature 2; item loss = mean over trajectories of -A_item * r
    # with the in-batch cosine softmax at 0.02; A_item keeps each group's top advantage
    h64, th64, ih64 = (x.detach().double().requires_grad_() for x in (h, token_hidden, item_h))
    w64 = trainer.model.lm_head_weight.detach().double()
    logp = linear_log_probs_reference(th64, w64, batch.token_ids, 30.0, 2.0)
    ratio = torch.exp(logp - logp.detach())
    token_loss = (-(adv.double()[batch.token_rows]) * ratio).mean()
    u = torch.nn.functional.normalize(h64, dim=-1)
    x = torch.nn.functional.normalize(ih64, dim=-1)
    item_logp = torch.log_softmax(u @ x.T / 0.02, 1)[torch.arange(B * G), torch.arange(B)
                                                       .repeat_interleave(G)]
    item_adv = torch.tensor([0.7, 0.0, 1.1, 0.0, 0.0, 0.3, 0.0, 0.0], dtype=torch.float64)
    item_loss = (-item_adv * torch.exp(item_logp - item_logp.detach())).mean()
    (token_loss + item_loss).backward()
    assert out.token_loss.item() == pytest.approx(token_loss.item(), rel=1e-5, abs=1e-7)
    assert out.item_loss.item() == pytest.approx(item_loss.item(), rel=1e-5, abs=1e-7)
    for ours, ref in ((h32, h64), (th32, th64), (ih32, ih64)):
        assert torch.allclose(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)


def test_resume_gives_the_same_losses(root):
    from r2ec_fast.train.trainer import Trainer

    config = tiny_config(root)
    straight = Trainer(config, root / "straight", progress=False)
    straight.fit(4)
    first = Trainer(config, root / "resumed", progress=False)
    first.fit(2)
    del first
    second = Trainer(config, root / "resumed", resume=True, progress=False)
    assert second.step == 2
    second.fit(4)
    a = read_metrics(root / "straight" / "metrics.jsonl")
    b = read_metrics(root / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "token_loss", "item_loss", "reward_mean", "grad_norm"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    saved = json.loads((root / "resumed" / "config.json").read_text())
    assert saved["rollout"]["group_size"] == 2


def test_contrastive_variant_trains(root):
    from r2ec_fast.train.trainer import Trainer

    trainer = Trainer(tiny_config(root, algo="contrastive"), root / "warm", progress=False)
    metrics = trainer.train_step()
    assert metrics["reasoning_len"] == 0 and metrics["token_loss"] == 0
    assert math.isfinite(metrics["item_loss"]) and metrics["item_loss"] > 0


def test_lora_adapter_trains_saves_and_resumes(root):
    """model.lora_r > 0: only the adapter trains and is checkpointed; a resume continues."""
    pytest.importorskip("peft")
    from r2ec_fast.train.trainer import Trainer

    config = tiny_config(root, **{"model.lora_r": 4, "max_steps": 2, "save_every": 1})
    trainer = Trainer(config, root / "lora", progress=False)
    trainable = {n for n, p in trainer.model.lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in trainer.model.lm.named_parameters()
              if not p.requires_grad}
    trainer.fit(1)
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.lm.named_parameters()
               if n in frozen)
    from safetensors import safe_open

    with safe_open(str(root / "lora" / "checkpoints" / "step-00000001" / "model.safetensors"),
                   "pt") as f:
        assert set(f.keys()) <= trainable and f.keys()
    resumed = Trainer(config, root / "lora", resume=True, progress=False)
    assert resumed.step == 1
    resumed.fit(2)
    assert [m["step"] for m in read_metrics(root / "lora" / "metrics.jsonl")] == [1, 2]


def test_described_warm_start_teaches_the_target_description(root):
    """warm_start_reasoning=target_description: the warm start's trajectories are the prompt,
    the first line of the target's description and the marker (all three teacher-forced); the
    token loss is the mean next-token loss over them (float64 restatement, softcap 30,
    temperature 1), beside the contrastive loss."""
    from r2ec_fast.train.step import policy_forward, trajectory_batch
    from r2ec_fast.train.trainer import Trainer

    config = tiny_config(root, warm_start_steps=2, warm_start_reasoning="target_description",
                         **{"rollout.max_new_tokens": 12})
    trainer = Trainer(config, root / "described", progress=False)
    tok, items = trainer.model.tokenizer, trainer.data.items
    state = (trainer.epoch, trainer.position)
    rows = trainer.next_users()
    trainer.epoch, trainer.position = state  # the step below takes the same users
    trajs = trainer._warm_trajectories(rows)
    for row, traj in zip(rows, trajs):
        target = int(trainer.data["train"].item_id[row])
        line = items.description[target].split("\n")[0]
        assert tok.decode(traj.completion[:-1]) == tok.decode(
            tok(line, add_special_tokens=False)["input_ids"][:11])
        assert traj.completion[-1] == trainer.answer_id and traj.sampled == len(traj.completion)
        assert len(traj.completion) <= 12 and line.startswith("A ")
    batch = trajectory_batch(trajs, tok.pad_token_id, trainer.device)
    with torch.no_grad():
        _, token_hidden = policy_forward(trainer.model, batch)
    logp = linear_log_probs_reference(token_hidden.double(),
                                      trainer.model.lm_head_weight.detach().double(),
                                      batch.token_ids, 30.0, 1.0)
    metrics = trainer.train_step()
    assert metrics["reasoning_len"] == pytest.approx(batch.token_ids.numel() / len(rows))
    assert metrics["token_loss"] == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert math.isfinite(metrics["item_loss"]) and metrics["item_loss"] > 0
    trainer.fit(3)  # step 3 is RecPO's: sampled chains again
    assert read_metrics(root / "described" / "metrics.jsonl")[-1]["clip_frac"] >= 0


def test_samples_are_printed_and_logged(root, capsys):
    """sample_every: one user's prompt, G chains (reward, target rank) and top-5 items, the
    ranks those of score_catalog on the chains' answer states."""
    from r2ec_fast.train.samples import SAMPLES_FILE
    from r2ec_fast.train.trainer import Trainer

    trainer = Trainer(tiny_config(root, sample_every=2, max_steps=2), root / "samples",
                      progress=False)
    trainer.fit(2)
    lines = (root / "samples" / SAMPLES_FILE).read_text().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["step"] == 2 and "A user bought" in report["prompt"]
    assert len(report["chains"]) == 2  # G
    n = trainer.data.items.num_items
    for chain in report["chains"]:
        assert len(chain["top5"]) == 5 and all(1 <= i <= n for i, _ in chain["top5"])
        assert 0 <= chain["target_rank"] < n and math.isfinite(chain["reward"])
        ids = [i for i, _ in chain["top5"]]
        assert (chain["target_rank"] < 5) == (report["target"][0] in ids)
        if chain["target_rank"] < 5:
            assert ids[chain["target_rank"]] == report["target"][0]
    out = capsys.readouterr().out
    assert "--- step 2" in out and "[chain 1]" in out and "    5. " in out


def test_anchor_adds_the_warm_start_loss_to_recpo(root):
    """recpo.anchor_weight = w: a RecPO step's gradient is RecPO's own plus w times the warm
    start's (teacher-forced description: next-token loss + contrastive loss at the marker) on
    the same users, and its anchor_loss is that warm-start loss."""
    from r2ec_fast.train.step import exclusion
    from r2ec_fast.train.trainer import Trainer

    w = 0.5
    config = tiny_config(root, warm_start_reasoning="target_description",
                         **{"recpo.anchor_weight": w, "rollout.max_new_tokens": 8})
    trainer = Trainer(config, root / "anchor", progress=False)
    G, rows = trainer.group_size, trainer.next_users()
    B, mine = len(rows), trainer.dist.split(len(rows))
    targets = torch.as_tensor(trainer.data["train"].item_id[rows])
    hist = exclusion(trainer.histories["train"][rows])
    trajs = trainer._rollout(trainer.rollout, rows, G)
    warm = trainer._warm_trajectories(rows)
    warm_tokens = sum(t.sampled for t in warm)
    assert warm_tokens > len(rows)  # descriptions, not only the markers

    def grads(*args):
        trainer.optimizer.zero_grad(set_to_none=True)
        sums = trainer._update(*args)[4]
        return {n: (torch.zeros_like(p) if p.grad is None else p.grad.double().clone())
                for n, p in trainer.model.lm.named_parameters() if p.requires_grad}, sums

    rl_args = (trajs, G, B, False, targets, mine, hist.repeat_interleave(G, 0),
               sum(t.sampled for t in trajs))
    g_rl, s_rl = grads(*rl_args)
    g_both, s_both = grads(*rl_args, (warm, warm_tokens))
    g_warm, s_warm = grads(warm, 1, B, True, targets, mine, hist, warm_tokens)
    assert s_both[:3] == pytest.approx(s_rl[:3], rel=1e-6) and s_rl[3] == 0
    assert s_both[3] == pytest.approx(s_warm[0] + s_warm[1], rel=1e-5)
    assert sum(g.abs().sum() for g in g_warm.values()) > 0
    for name, g in g_both.items():
        want = g_rl[name] + w * g_warm[name]
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6 * want.abs().max().item()), name
    # token and item weights 0: the anchor alone (the "anchor only" ablation)
    trainer.config.recpo.token_loss_weight = trainer.config.recpo.item_loss_weight = 0.0
    g_anchor, _ = grads(*rl_args, (warm, warm_tokens))
    for name, g in g_anchor.items():
        want = w * g_warm[name]
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6 * want.abs().max().item()), name
    trainer.config.recpo.token_loss_weight, trainer.config.recpo.item_loss_weight = 0.7, 1.0
    metrics = trainer.train_step()
    assert metrics["anchor_loss"] > 0
    assert metrics["loss"] == pytest.approx(0.7 * metrics["token_loss"] + metrics["item_loss"]
                                            + w * metrics["anchor_loss"], rel=1e-6)

"""Checkpoints: bit-exact resume, crash safety at every write, pruning, adapters, errors."""
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from r2ec_fast.ops.item_table import ItemTable
from r2ec_fast.train import checkpoint as ckpt
from r2ec_fast.train.checkpoint import (
    capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint,
)

VOCAB, DIM = 11, 6


class TiedLM(nn.Module):
    """Embedding tied to the output projection (as in Gemma-2 / Qwen-2), a hidden Linear and
    dropout, so that a training step draws from torch's RNG."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(DIM, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(self.drop(torch.tanh(self.hidden(self.embed(ids)))))


def make_run(seed: int):
    torch.manual_seed(seed)
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched


def train_step(model, opt, sched) -> float:
    """Data and noise from all three global generators."""
    ids = torch.randint(VOCAB, (5,))
    targets = (ids + random.randrange(VOCAB)) % VOCAB
    noise = float(np.random.standard_normal())
    loss = nn.functional.cross_entropy(model(ids), targets) + 1e-3 * noise
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save(run_dir, step, model, opt, sched=None, **kw):
    return save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched,
                           trainer_state={"position": step, "epoch": 0}, **kw)


def test_resume_is_bit_identical(tmp_path):
    seed_all(0)
    model, opt, sched = make_run(0)
    for _ in range(3):
        train_step(model, opt, sched)
    path = save(tmp_path, 3, model, opt, sched)
    expected = [train_step(model, opt, sched) for _ in range(3)]

    seed_all(99)
    model2, opt2, sched2 = make_run(1)  # different initial weights
    assert latest_checkpoint(tmp_path) == path
    out = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    restore_rng(out["rng"])
    assert out["step"] == 3 and out["trainer_state"] == {"position": 3, "epoch": 0}
    assert out["item_table"] is None
    assert model2.out.weight is model2.embed.weight  # the tie survives loading
    assert [train_step(model2, opt2, sched2) for _ in range(3)] == expected
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_tied_weights_are_stored_once(tmp_path):
    model, opt, _ = make_run(0)
    path = save(tmp_path, 1, model, opt)
    with safe_open(str(path / ckpt.MODEL_FILE), framework="pt") as f:
        names = set(f.keys())
        aliases = json.loads(f.metadata()["aliases"])
    assert len(names) + len(aliases) == len(model.state_dict())
    assert set(aliases.items()) in ({("out.weight", "embed.weight")},
                                    {("embed.weight", "out.weight")})


class SharedView(nn.Module):
    """A buffer that is a different view of a parameter's storage: cloned, not aliased."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("head", self.w.data[:2])


def test_overlapping_views_are_saved(tmp_path):
    torch.manual_seed(0)
    model = SharedView()
    path = save(tmp_path, 1, model, None)
    fresh = SharedView()
    load_checkpoint(path, model=fresh)
    assert torch.equal(fresh.w, model.w) and torch.equal(fresh.head, model.w[:2])


def test_rng_capture_restore():
    state = capture_rng()
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    restore_rng(state)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) \
        == first


def _raise_on(monkeypatch, target, attr, match):
    """Make `target.attr` raise when its path-like argument's name contains `match`."""
    real = getattr(target, attr)

    def failing(*args, **kwargs):
        names = [str(getattr(a, "name", a)) for a in args]
        if any(match in n for n in names):
            raise OSError(f"injected crash writing {match}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, failing)


CRASHES = {  # where a save of step 2 dies
    "model weights": (ckpt, "save_file", ckpt.MODEL_FILE),
    "optimizer.pt": (torch, "save", ckpt.OPTIMIZER_FILE),  # torch.save gets the open file
    "COMPLETE marker": (ckpt, "_write_bytes", ckpt.COMPLETE),
    "folder rename": (os, "replace", ".tmp-step-00000002"),
    "latest pointer": (os, "replace", ".tmp-latest"),
}


@pytest.mark.parametrize("where", list(CRASHES))
def test_crash_mid_save_keeps_previous(tmp_path, where, monkeypatch):
    model, opt, sched = make_run(0)
    seed_all(0)
    train_step(model, opt, sched)
    first = save(tmp_path, 1, model, opt, sched)
    weights_at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, sched)
    with monkeypatch.context() as m:
        _raise_on(m, *CRASHES[where])
        with pytest.raises(OSError, match="injected crash"):
            save(tmp_path, 2, model, opt, sched)
    assert latest_checkpoint(tmp_path) == first
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == first.name
    model2, opt2, sched2 = make_run(5)
    assert load_checkpoint(first, model=model2, optimizer=opt2, scheduler=sched2)["step"] == 1
    for k, v in model2.state_dict().items():
        assert torch.equal(v, weights_at_1[k]), k

    second = save(tmp_path, 2, model, opt, sched)  # the next save cleans up and succeeds
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000001", "step-00000002"]
    assert latest_checkpoint(tmp_path) == second


@pytest.mark.parametrize("pointer", [b"\xff\xfe garbage", b"step-00000009", b"../step-1",
                                     b""])
def test_bad_latest_pointer_falls_back_to_the_newest_complete(tmp_path, pointer):
    model, opt, _ = make_run(0)
    save(tmp_path, 1, model, opt)
    second = save(tmp_path, 2, model, opt)
    (tmp_path / "checkpoints" / "latest").write_bytes(pointer)
    assert latest_checkpoint(tmp_path) == second


def test_keep_last_prunes_oldest(tmp_path):
    model, opt, _ = make_run(0)
    for step in range(1, 6):
        save(tmp_path, step, model, opt, keep_last=2)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step-00000004",
                                                          "step-00000005"]
    assert latest_checkpoint(tmp_path) == ckpt_dir / "step-00000005"
    # resuming from an older checkpoint abandons the newer ones: they are removed on save
    save(tmp_path, 3, model, opt, keep_last=3)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step-00000003"]
    for step in (6, 7):
        save(tmp_path, step, model, opt, keep_last=None)
    assert len(list(ckpt_dir.glob("step-*"))) == 3
    save(tmp_path, 7, model, opt, keep_last=1)  # re-saving a step replaces it
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step-00000007"]
    with pytest.raises(ValueError, match="keep_last"):
        save(tmp_path, 8, model, opt, keep_last=0)


class Adapted(nn.Module):
    """A frozen base plus a small trainable adapter, the shape of LoRA training."""

    def __init__(self, adapter_rank: int = 2):
        super().__init__()
        self.base = nn.Linear(DIM, DIM)
        self.down = nn.Linear(DIM, adapter_rank, bias=False)
        self.up = nn.Linear(adapter_rank, DIM, bias=False)
        self.base.requires_grad_(False)


def test_adapter_only(tmp_path):
    torch.manual_seed(0)
    model = Adapted()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    path = save(tmp_path, 1, model, opt, adapter_only=True)
    with safe_open(str(path / ckpt.MODEL_FILE), framework="pt") as f:
        assert sorted(f.keys()) == ["down.weight", "up.weight"]

    fresh = Adapted()
    base_before = {k: v.clone() for k, v in fresh.base.state_dict().items()}
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    load_checkpoint(path, model=fresh, optimizer=opt2)
    assert torch.equal(fresh.down.weight, model.down.weight)
    assert torch.equal(fresh.up.weight, model.up.weight)
    for k, v in fresh.base.state_dict().items():
        assert torch.equal(v, base_before[k])  # the base is not in the file: untouched

    other = Adapted()
    other.base.requires_grad_(True)  # a different trainable set
    with pytest.raises(ValueError, match="missing from the checkpoint.*base.bias"):
        load_checkpoint(path, model=other)
    with pytest.raises(ValueError, match="shape.*down.weight"):
        load_checkpoint(path, model=Adapted(adapter_rank=3))
    with pytest.raises(ValueError, match="requires_grad"):
        save(tmp_path, 2, Adapted().requires_grad_(False), None, adapter_only=True)


def test_item_table_round_trip(tmp_path):
    model, opt, _ = make_run(0)
    table = ItemTable(torch.randn(7, 5), similarity="cosine", dtype=torch.bfloat16)
    path = save(tmp_path, 1, model, opt, item_table=table)
    loaded = load_checkpoint(path, model=TiedLM())["item_table"]
    assert loaded.similarity == "cosine" and loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.weight, table.weight)


def test_hf_tied_model_round_trip(tmp_path):
    """A real tied HF decoder inside DualHeadModel: lm_head stored once, tie kept on load."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r2ec_fast.model.dual_head import DualHeadModel

    config = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = DualHeadModel(Qwen2ForCausalLM(config), tokenizer=None)
    path = save(tmp_path, 1, model, None)
    torch.manual_seed(1)
    fresh = DualHeadModel(Qwen2ForCausalLM(config), tokenizer=None)
    load_checkpoint(path, model=fresh)
    assert fresh.lm_head_weight is fresh.lm.get_input_embeddings().weight
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_errors(tmp_path):
    model, opt, sched = make_run(0)
    with pytest.raises(ValueError, match="no checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere", model=model)
    assert latest_checkpoint(tmp_path) is None

    first = save(tmp_path, 1, model, opt)
    with pytest.raises(ValueError, match="run folder"):
        load_checkpoint(tmp_path, model=model)
    with pytest.raises(ValueError, match="no scheduler.pt"):
        load_checkpoint(first, model=model, scheduler=sched)
    second = save(tmp_path, 2, model, opt)
    (second / ckpt.COMPLETE).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint(second, model=model)
    assert latest_checkpoint(tmp_path) == first  # pointer names an incomplete folder

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM)
            self.proj = nn.Linear(DIM, DIM)

    with pytest.raises(ValueError, match=r"missing from the checkpoint \[proj.bias, "
                                         r"proj.weight\].*not in the model \[hidden.bias"):
        load_checkpoint(first, model=Renamed())
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 3, model=model, optimizer=opt,
                        trainer_state={"t": torch.zeros(1)})
    assert latest_checkpoint(tmp_path) == first  # the failed save touched nothing
    with pytest.raises(ValueError, match="step"):
        save(tmp_path, -1, model, opt)

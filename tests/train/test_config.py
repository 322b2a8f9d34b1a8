"""Configs: presets validate, overrides are typed, bad values name their key."""
import json

import pytest

from r2ec_fast.train.config import (
    ConfigError, TrainConfig, apply_overrides, get_preset, load_config,
)


@pytest.mark.parametrize("name", ["tiny", "gemma2-2b", "qwen2.5-3b"])
def test_presets_are_valid_and_round_trip(name, tmp_path):
    config = get_preset(name)
    config.save(tmp_path / "c.json")
    assert load_config(tmp_path / "c.json").to_dict() == config.to_dict()


def test_overrides_are_typed():
    config = apply_overrides(get_preset("tiny"), [
        "optim.lr=2e-4", "rollout.group_size=2", "model.gradient_checkpointing=true",
        "algo=contrastive", "recpo.item_loss=full_catalog", "rollout.cascade=false"])
    assert config.optim.lr == 2e-4 and config.rollout.group_size == 2
    assert config.rollout.cascade is False and config.rollout.decode_graphs is True
    assert config.model.gradient_checkpointing is True and config.algo == "contrastive"


@pytest.mark.parametrize("item,match", [
    ("rollout.group_size=0", r"rollout\.group_size must be >= 1, got 0"),
    ("optim.lr=-1", r"optim\.lr must be > 0"),
    ("optim.lr=fast", r"optim\.lr must be a number, got 'fast'"),
    ("recpo.advantage=ppo", r"recpo\.advantage must be grpo, rloo or reference_loo"),
    ("recpo.eps_low=1.5", r"recpo\.eps_low must be in \[0, 1\)"),
    ("optim.micro_batch_users=99", r"optim\.micro_batch_users must be in \[0, users_per_step"),
    ("rollout.temprature=1", r"unknown config key 'rollout\.temprature'"),
    ("rollout.engine=vllm", r"rollout\.engine must be 'paged' or 'hf', got 'vllm'"),
    ("rollout.kv_budget=lots", r"rollout\.kv_budget must be a size like '8GiB', a block count"),
    ("nonsense.key=1", r"unknown config key 'nonsense\.key'"),
    ("algo", r"expected key=value"),
    ("model.dtype=float8", r"model\.dtype must be auto"),
    ("max_steps=1.5", r"max_steps must be an integer"),
])
def test_bad_values_name_the_key(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_preset("tiny"), [item])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({"optim": {"learning_rate": 1}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rate'"):
        load_config(tmp_path / "typo.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="data must be a mapping"):
        TrainConfig.from_dict({"data": 3})

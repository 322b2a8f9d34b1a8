"""What a run needs before its first step: the data and the model (built or imported first
when the config says so and they are missing, LoRA adapters applied) and the optimizer."""
from __future__ import annotations

from pathlib import Path

import torch

from r2ec_fast.train.config import ConfigError


def ensure_data(cfg):
    from r2ec_fast.data.dataset import load_dataset, save_dataset

    path = Path(cfg.path)
    if not path.exists():
        if cfg.synth_items <= 0:
            raise ConfigError(f"data.path {path} does not exist (make it with r2ec-fast "
                              "synth-data or prepare-data, or set data.synth_items)")
        from r2ec_fast.data.synthetic import make_synthetic

        lo = min(5, cfg.synth_history_max)
        save_dataset(make_synthetic(cfg.synth_items, cfg.synth_users or cfg.synth_items,
                                    seed=cfg.synth_seed, num_genres=cfg.synth_genres,
                                    num_attributes=cfg.synth_attributes,
                                    history_len=(lo, cfg.synth_history_max)), path)
    return load_dataset(path)


def ensure_model(cfg, data, device, seed: int):
    """The model of `cfg` (built first when `tiny_arch` says so), with its LoRA adapters;
    activation checkpointing and sharding are `distributed.parallelize`'s."""
    from r2ec_fast.model import DualHeadModel

    path = Path(cfg.path)
    if not path.exists() and cfg.gguf:
        from r2ec_fast.model.gguf import import_gguf, smollm2_gguf

        import_gguf(smollm2_gguf() if cfg.gguf == "smollm2" else cfg.gguf, path)
    elif not path.exists():
        if not cfg.tiny_arch:
            raise ConfigError(f"model.path {path} does not exist (a local HF folder; or set "
                              "model.tiny_arch to build a tiny random model there, or "
                              "model.gguf to import a GGUF checkpoint)")
        from r2ec_fast.model.tiny import make_tiny_model, texts_for_tokenizer

        make_tiny_model(cfg.tiny_arch, texts_for_tokenizer(data), path, seed=seed)
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = DualHeadModel.from_pretrained(path, dtype=dtype, device=device,
                                          attn_implementation=cfg.attn_implementation or None,
                                          trust_remote_code=cfg.trust_remote_code)
    if cfg.lora_r:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise ConfigError("model.lora_r > 0 needs peft: pip install peft") from exc
        model.lm = get_peft_model(model.lm, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
            task_type="CAUSAL_LM"))
    return model


def _optimizer(params, cfg, device, sharded: bool = False):
    # bitsandbytes' 8-bit AdamW does not take FSDP2's DTensor parameters: torch's AdamW there
    if cfg.eight_bit_adam and device.type == "cuda" and not sharded:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

"""The RecPO training loop (DESIGN §5): set-up, steps, evaluation, checkpoints and resume.

Per step: B users from the shuffled train split -> G rollouts each (seeded per (step, user))
-> one decoder pass with gradient over the N = B x G trajectories -> rewards over the full
catalog (history excluded) -> group advantages -> token loss on the sampled reasoning tokens
(`linear_log_probs`, softcap and the sampling temperature applied) + item loss on the answer
state (in-batch as the reference, or the full catalog) -> AdamW with warmup and clipping ->
the batch's target rows of the item table refreshed with their fresh encodings.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from r2ec_fast.train.config import ConfigError, TrainConfig

EVAL_FILE = "eval.jsonl"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def user_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of one user's rollouts at one step (independent of batching)."""
    return (seed * 1_000_003 + step * 7_919 + row * 104_729) % (2**63 - 1)


def ensure_data(cfg):
    from r2ec_fast.data.dataset import load_dataset, save_dataset

    path = Path(cfg.path)
    if not path.exists():
        if cfg.synth_items <= 0:
            raise ConfigError(f"data.path {path} does not exist (make it with r2ec-fast "
                              "synth-data or prepare-data, or set data.synth_items)")
        from r2ec_fast.data.synthetic import make_synthetic

        save_dataset(make_synthetic(cfg.synth_items, cfg.synth_users or cfg.synth_items,
                                    seed=cfg.synth_seed), path)
    return load_dataset(path)


def ensure_model(cfg, data, device, seed: int):
    from r2ec_fast.model import DualHeadModel

    path = Path(cfg.path)
    if not path.exists():
        if not cfg.tiny_arch:
            raise ConfigError(f"model.path {path} does not exist (a local HF folder; or set "
                              "model.tiny_arch to build a tiny random model there)")
        from r2ec_fast.model.tiny import make_tiny_model, texts_for_tokenizer

        make_tiny_model(cfg.tiny_arch, texts_for_tokenizer(data), path, seed=seed)
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = DualHeadModel.from_pretrained(path, dtype=dtype, device=device,
                                          attn_implementation=cfg.attn_implementation or None)
    if cfg.lora_r:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise ConfigError("model.lora_r > 0 needs peft: pip install peft") from exc
        model.lm = get_peft_model(model.lm, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
            task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable()
    return model


def _optimizer(params, cfg, device):
    if cfg.eight_bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str | Path, resume: bool = False,
                 progress: bool = True, device: str | None = None):
        from r2ec_fast.data.prompts import PromptConfig
        from r2ec_fast.model.encode import item_texts, tokenize_texts
        from r2ec_fast.rollout.hf import HFRollout, NoReasoning
        from r2ec_fast.train.metrics import MetricsLogger, PhaseTimer

        self.config, self.progress = config, progress
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config.save(self.run_dir / "config.json")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        _seed_everything(config.seed)
        self.data = ensure_data(config.data)
        self.model = ensure_model(config.model, self.data, self.device, config.seed)
        tok = self.model.tokenizer
        self.prompt_config = PromptConfig(history_window=config.data.history_window)
        self.answer_id = tok.convert_tokens_to_ids(self.prompt_config.answer_start)
        if self.answer_id is None or self.answer_id == tok.unk_token_id:
            raise ConfigError(f"the tokenizer has no single token for the answer marker "
                              f"{self.prompt_config.answer_start!r}; add it as a special token")
        r = config.rollout
        self.group_size = r.group_size if config.algo == "recpo" else 1
        self.rollout = (HFRollout(self.model, self.answer_id, r.temperature, r.top_k, r.top_p,
                                  r.max_new_tokens, r.eval_max_new_tokens)
                        if config.algo == "recpo" else NoReasoning(self.answer_id))
        self.item_ids = tokenize_texts(tok, item_texts(tok, self.data.items,
                                                       self.data.category, self.prompt_config))
        self._user_ids: dict[str, list] = {}
        self.histories = {name: torch.from_numpy(s.padded_history(config.data.history_window))
                          for name, s in self.data.splits.items()}
        params = [p for p in self.model.lm.parameters() if p.requires_grad]
        self.optimizer = _optimizer(params, config.optim, self.device)
        warmup = config.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.step, self.epoch, self.position = 0, 0, 0
        self.logger = MetricsLogger(self.run_dir)
        self.eval_logger = MetricsLogger(self.run_dir, filename=EVAL_FILE)
        self.timer = PhaseTimer()
        self.phase_seconds: dict[str, float] = {}  # totals over this process's life
        if resume and self._resume():
            return
        self.refresh_table()

    # ------------------------------------------------------------------ data

    def user_prompt_ids(self, split: str, rows) -> list[list[int]]:
        from r2ec_fast.data.prompts import render_chat, user_prompt

        cache = self._user_ids.setdefault(split, [None] * len(self.data[split]))
        tok = self.model.tokenizer
        for r in rows:
            if cache[r] is None:
                text = render_chat(tok, user_prompt(self.data[split], r, self.data.items,
                                                    self.data.category, self.prompt_config))
                cache[r] = tok(text, add_special_tokens=False)["input_ids"]
        return [cache[r] for r in rows]

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, self.epoch])
        return rng.permutation(len(self.data["train"]))

    def next_users(self) -> list[int]:
        """The next B train rows of the shuffled order (a new shuffle each epoch)."""
        want, rows = self.config.optim.users_per_step, []
        while len(rows) < want:
            order = self._order()
            take = order[self.position:self.position + want - len(rows)].tolist()
            rows += take
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return rows

    def _items_hidden(self, item_ids: list[int]) -> torch.Tensor:
        """Encodings [b, d] of the given items' prompts, with gradient (one padded pass)."""
        seqs = [self.item_ids[i - 1] for i in item_ids]
        width = max(len(s) for s in seqs)
        pad = self.model.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for n, s in enumerate(seqs):
            ids[n, :len(s)], mask[n, :len(s)] = torch.tensor(s), 1
        return self.model.last_hidden(ids.to(self.device), mask.to(self.device))

    def refresh_table(self) -> None:
        with self.timer("encode_items"):
            self.model.encode_items(self.data.items, self.data.category, self.prompt_config,
                                    progress=self.progress)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict:
        from r2ec_fast.train.recpo import group_advantages
        from r2ec_fast.train.step import (
            contrastive_loss, exclusion, policy_forward, rewards, step_losses, trajectory_batch,
        )

        cfg, dev, G = self.config, self.device, self.group_size
        train = self.data["train"]
        rows = self.next_users()
        B = len(rows)
        targets_u = torch.as_tensor(train.item_id[rows], device=dev)  # [B]
        targets = targets_u.repeat_interleave(G)  # [N]
        exclude = exclusion(self.histories["train"][rows].to(dev)).repeat_interleave(G, 0)
        with self.timer("rollout"):
            trajs = self.rollout.sample(self.user_prompt_ids("train", rows),
                                        [user_seed(cfg.seed, self.step, r) for r in rows], G)
        pad = self.model.tokenizer.pad_token_id
        micro = cfg.optim.micro_batch_users or B
        chunks = [(lo, min(lo + micro, B)) for lo in range(0, B, micro)]
        tokens_total = sum(t.sampled for t in trajs)
        self.model.train()
        cached = None
        with self.timer("forward_backward"):
            if len(chunks) == 1:
                batch = trajectory_batch(trajs, pad, dev)
                cached = (batch, *policy_forward(self.model, batch))
                h_all = cached[1].detach()
            else:
                with torch.no_grad():
                    h_all = torch.cat([policy_forward(self.model, trajectory_batch(
                        trajs[lo * G:hi * G], pad, dev))[0] for lo, hi in chunks])
        with self.timer("scoring"):
            reward, ndcg, rc, _ = rewards(h_all.float(), self.model.item_table, targets, exclude,
                                          cfg.recpo.sim_temperature, cfg.recpo.ndcg_k,
                                          cfg.recpo.beta)
            adv = group_advantages(reward, G, cfg.recpo.advantage)
        stats = {"token_loss": 0.0, "item_loss": 0.0, "clip_frac": 0.0}
        fresh = []
        with self.timer("forward_backward"):
            for lo, hi in chunks:
                if cached is None:
                    batch = trajectory_batch(trajs[lo * G:hi * G], pad, dev)
                    h, token_hidden = policy_forward(self.model, batch)
                else:
                    batch, h, token_hidden = cached
                need_items = cfg.algo == "contrastive" or cfg.recpo.item_loss == "in_batch"
                item_h = self._items_hidden(targets_u[lo:hi].tolist()) if need_items else None
                if cfg.algo == "contrastive":
                    loss = contrastive_loss(h.float(), item_h.float(), B,
                                            cfg.recpo.sim_temperature)
                    stats["item_loss"] += loss.item()
                else:
                    parts = step_losses(
                        self.model, h.float(), token_hidden, batch, adv[lo * G:hi * G], G,
                        targets[lo * G:hi * G], exclude[lo * G:hi * G],
                        None if item_h is None else item_h.float(), cfg.recpo,
                        cfg.rollout.temperature, 1.0, cfg.recpo.item_loss_weight, B,
                        tokens_total)
                    loss = parts.loss
                    stats["token_loss"] += parts.token_loss.item()
                    stats["item_loss"] += parts.item_loss.item()
                    stats["clip_frac"] += parts.clip_frac.item() * (hi - lo) / B
                loss.backward()
                if item_h is not None:
                    fresh.append(item_h.detach())
        with self.timer("optimizer"):
            params = [p for p in self.model.lm.parameters() if p.requires_grad]
            clip = cfg.optim.grad_clip or math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
            total = stats["token_loss"] + cfg.recpo.item_loss_weight * stats["item_loss"]
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"step {self.step}: loss {total} or grad norm "
                                         f"{grad_norm} is not finite; lower optim.lr")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        with self.timer("scoring"):  # DESIGN §5 step 8: the batch's targets, re-encoded
            hidden = torch.cat(fresh) if fresh else self._encode_no_grad(targets_u.tolist())
            self.model.refresh_rows(targets_u, hidden.float())
        self.step += 1
        return {"loss": total, **stats, "reward_mean": reward.mean().item(),
                "reward_std": reward.std().item() if reward.numel() > 1 else 0.0,
                "ndcg": ndcg.mean().item(), "rc": rc.mean().item(),
                "advantage_abs": adv.abs().mean().item(), "grad_norm": grad_norm,
                "reasoning_len": tokens_total / len(trajs),
                "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def _encode_no_grad(self, item_ids: list[int]) -> torch.Tensor:
        return self._items_hidden(item_ids)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str | None = None, refresh: bool = True) -> dict:
        from r2ec_fast.eval.evaluate import evaluate

        split = split or self.config.data.eval_split
        data = self.data[split]
        rows = list(range(len(data)))
        if self.config.data.eval_users:
            rows = rows[:self.config.data.eval_users]
        if refresh:
            self.refresh_table()
        with self.timer("eval"):
            out = evaluate(self.model, self.rollout, self.user_prompt_ids(split, rows),
                           torch.as_tensor(data.item_id[rows]), self.histories[split][rows],
                           self.config.recpo.sim_temperature, progress=self.progress,
                           desc=f"eval {split}")
        self.eval_logger.log(self.step, split=split, **out)
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        from r2ec_fast.train.checkpoint import save_checkpoint

        with self.timer("checkpoint"):
            return save_checkpoint(
                self.run_dir, self.step, model=self.model.lm, optimizer=self.optimizer,
                scheduler=self.scheduler, item_table=self.model.item_table,
                trainer_state={"epoch": self.epoch, "position": self.position},
                keep_last=self.config.keep_checkpoints,
                adapter_only=bool(self.config.model.lora_r))

    def _resume(self) -> bool:
        from r2ec_fast.train.checkpoint import latest_checkpoint, load_checkpoint, restore_rng

        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        state = load_checkpoint(path, model=self.model.lm, optimizer=self.optimizer,
                                scheduler=self.scheduler, map_location=self.device)
        self.step = state["step"]
        self.epoch = state["trainer_state"]["epoch"]
        self.position = state["trainer_state"]["position"]
        self.model.item_table = state["item_table"].to(self.device)
        restore_rng(state["rng"])
        self.logger.truncate_after(self.step)
        self.eval_logger.truncate_after(self.step)
        return True

    # ------------------------------------------------------------------ the loop

    def pop_times(self) -> dict[str, float]:
        """Seconds per phase since the last call (also added to `phase_seconds`)."""
        times = self.timer.pop()
        for key, value in times.items():
            self.phase_seconds[key] = self.phase_seconds.get(key, 0.0) + value
        return times

    def fit(self, max_steps: int | None = None) -> list[dict]:
        """Train to `max_steps` (default: the config's), evaluating every `eval_every` steps,
        re-encoding the catalog every `item_refresh_steps`, checkpointing every `save_every`
        steps and at the end. Returns the per-step metrics of this call."""
        from r2ec_fast.train.metrics import peak_memory_mib

        cfg = self.config
        end = cfg.max_steps if max_steps is None else max_steps
        history = []
        bar = tqdm(total=end, initial=self.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        while self.step < end:
            metrics = self.train_step()
            metrics.update(self.pop_times(), peak_memory_mib=peak_memory_mib())
            self.logger.log(self.step, **metrics)
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", ndcg=f"{metrics['ndcg']:.3f}")
            if cfg.item_refresh_steps and self.step % cfg.item_refresh_steps == 0:
                self.refresh_table()
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
        bar.close()
        if not (cfg.save_every and self.step % cfg.save_every == 0):
            self.save()
        return history

"""The RecPO training loop (DESIGN §5): set-up, steps, evaluation, checkpoints and resume.

Per step: B users from the shuffled train split -> G rollouts each (seeded per (step, user))
-> one decoder pass with gradient over the N = B x G trajectories -> rewards over the full
catalog (history excluded) -> group advantages -> token loss on the sampled reasoning tokens
(`linear_log_probs`, softcap and the sampling temperature applied) + item loss on the answer
state (in-batch as the reference, or the full catalog) -> AdamW with warmup and clipping ->
the batch's target rows of the item table refreshed with their fresh encodings.

Under `torchrun` the same loop runs data-parallel (`distributed.py`): the B users of a step are
the same shuffled slice on every rank and rank r takes its contiguous share of them, so N
ranks x B/N users are the one-process step on B users: rollouts are seeded per (step, user),
the losses are normalised by the global token and trajectory counts, the in-batch item softmax
runs over every rank's targets, FSDP2 sums the gradients, and the refreshed table rows are
gathered so that every rank holds the same table. Rank 0 alone writes logs and checkpoints.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from r2ec_fast.train.config import ConfigError, TrainConfig
from r2ec_fast.train.oom import OutOfMemoryInStep, free_memory, halved, is_out_of_memory, pieces
from r2ec_fast.train.run_dir import check_run_dir, write_run_config
from r2ec_fast.train.setup import _optimizer, ensure_data, ensure_model  # noqa: F401
from r2ec_fast.train.distributed import (
    DistContext, clip_grad_norm_, encode_items_sharded, full_state, init_distributed,
    parallelize, sharded_loaders, weighted_means,
)

EVAL_FILE = "eval.jsonl"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def user_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of one user's rollouts at one step (independent of batching)."""
    return (seed * 1_000_003 + step * 7_919 + row * 104_729) % (2**63 - 1)


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str | Path, resume: bool = False,
                 progress: bool = True, device: str | None = None,
                 dist: DistContext | None = None, write_config: bool = True):
        """run_dir: a new or empty folder, or (resume) one holding this run (`run_dir.py`);
        its config.json is written once the set-up has worked (not with write_config=False:
        an evaluation of a finished run). dist: this process's place in a data-parallel job;
        default `init_distributed`,
        i.e. the torchrun job this process was launched in, else one process on `device`
        (default CUDA when available). Under a job the device is the job's."""
        from r2ec_fast.data.prompts import PromptConfig
        from r2ec_fast.model.encode import item_texts, tokenize_texts
        from r2ec_fast.rollout.engine import EngineRollout
        from r2ec_fast.rollout.hf import HFRollout, NoReasoning
        from r2ec_fast.train.metrics import MetricsLogger, PhaseTimer

        self.dist = dist if dist is not None else init_distributed(device)
        if config.optim.users_per_step % self.dist.world_size:
            raise ConfigError(f"optim.users_per_step={config.optim.users_per_step} must be a "
                              f"multiple of the number of processes ({self.dist.world_size})")
        self.config, self.progress = config, progress and self.dist.is_main
        self.run_dir = Path(run_dir)
        check_run_dir(config, self.run_dir, resume)  # before anything is written
        self.device = self.dist.device
        _seed_everything(config.seed)
        with self.dist.main_first():  # rank 0 builds missing data / a missing tiny model
            self.data = ensure_data(config.data)
        with self.dist.main_first():
            self.model = ensure_model(config.model, self.data, self.device, config.seed)
        self.plan = parallelize(self.model, self.dist,
                                activation_checkpointing=config.model.gradient_checkpointing)
        tok = self.model.tokenizer
        self.prompt_config = PromptConfig(history_window=config.data.history_window)
        self.answer_id = tok.convert_tokens_to_ids(self.prompt_config.answer_start)
        if self.answer_id is None or self.answer_id == tok.unk_token_id:
            raise ConfigError(f"the tokenizer has no single token for the answer marker "
                              f"{self.prompt_config.answer_start!r}; add it as a special token "
                              "(r2ec_fast.model.markers.add_markers, which import-model "
                              "applies)")
        r = config.rollout
        self.group_size = r.group_size if config.algo == "recpo" else 1
        self.no_reasoning = NoReasoning(self.answer_id)  # contrastive steps
        if config.algo != "recpo":
            self.rollout = NoReasoning(self.answer_id)
        elif r.engine == "hf":
            self.rollout = HFRollout(self.model, self.answer_id, r.temperature, r.top_k, r.top_p,
                                     r.max_new_tokens, r.eval_max_new_tokens)
        else:
            self.rollout = EngineRollout(self.model, self.answer_id, r.temperature, r.top_k,
                                         r.top_p, r.max_new_tokens, r.eval_max_new_tokens,
                                         block_size=r.block_size, kv_budget=r.kv_budget or None,
                                         compile_decode=r.compile_decode,
                                         **{k: None if getattr(r, k) else False for k in (
                                             "decode_graphs", "fuse_norms", "cascade")})
        self.item_ids = tokenize_texts(tok, item_texts(tok, self.data.items,
                                                       self.data.category, self.prompt_config))
        self._user_ids: dict[str, list] = {}
        self.histories = {name: torch.from_numpy(s.padded_history(config.data.history_window))
                          for name, s in self.data.splits.items()}
        params = [p for p in self.model.lm.parameters() if p.requires_grad]
        self.optimizer = _optimizer(params, config.optim, self.device, self.dist.enabled)
        warmup, warm_steps = config.optim.warmup_steps, config.warm_start_steps
        rl_scale = (config.optim.recpo_lr or config.optim.lr) / config.optim.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (min(1.0, (s + 1) / warmup) if warmup else 1.0) * (
                rl_scale if s >= warm_steps and config.algo == "recpo" else 1.0))
        self.step, self.epoch, self.position = 0, 0, 0
        self.logger = MetricsLogger(self.run_dir)
        self.eval_logger = MetricsLogger(self.run_dir, filename=EVAL_FILE)
        self.timer = PhaseTimer()
        self.phase_seconds: dict[str, float] = {}  # totals over this process's life
        # piece sizes after an out-of-memory error (None: no limit), kept for later steps
        self.max_rollout_users: int | None = None
        self.max_trajectories: int | None = None
        self._oom_events: list[str] = []
        self._phase = "forward"
        if not (resume and self._resume()):
            self.refresh_table()
        if self.dist.is_main and write_config:  # once the set-up has worked
            write_run_config(config, self.run_dir)

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

    def _items_hidden(self, item_ids: list[int], piece: int | None = None) -> torch.Tensor:
        """Encodings [b, d] of the given items' prompts, with gradient: one padded pass, or
        passes of `piece` items that keep only their inputs and recompute in the backward
        (activation checkpointing; after an out-of-memory error)."""
        if piece is not None and piece < len(item_ids) and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return torch.cat([checkpoint(self._items_hidden, item_ids[a:z], use_reentrant=False)
                              for a, z in pieces(0, len(item_ids), piece)])
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
            if not self.dist.enabled:
                self.model.encode_items(self.data.items, self.data.category,
                                        self.prompt_config, progress=self.progress)
                return
            with self.plan.gathered():
                encode_items_sharded(self.model, self.data.items, self.data.category,
                                     self.prompt_config, self.dist, progress=self.progress)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict:
        """One step (see the module docstring). Out of memory in any phase is answered by
        halving that phase's pieces and doing it again (`oom.py`): nothing is skipped."""
        from r2ec_fast.train.step import exclusion

        cfg, dev, world = self.config, self.device, self.dist
        # contrastive: the variant itself, or the warm start of a RecPO run
        warm = cfg.algo == "contrastive" or self.step < cfg.warm_start_steps
        G = 1 if warm else self.group_size
        rows_all = self.next_users()  # the global batch: the same list on every rank
        B, mine = len(rows_all), world.split(len(rows_all))
        rows = rows_all[mine]  # this rank's users
        targets_all = torch.as_tensor(self.data["train"].item_id[rows_all], device=dev)  # [B]
        exclude = exclusion(self.histories["train"][rows].to(dev)).repeat_interleave(G, 0)
        self._oom_events = []
        anchor = None  # RecPO's anchor: the warm start's trajectories of the same users
        with self.timer("rollout"), self.plan.gathered():
            if warm and cfg.algo == "recpo":
                trajs = self._warm_trajectories(rows)
            else:
                trajs = self._rollout(self.no_reasoning if warm else self.rollout, rows, G)
            if not warm and cfg.recpo.anchor_weight:
                anchor = self._warm_trajectories(rows)
                anchor = (anchor, world.sum_int(sum(t.sampled for t in anchor)))
        tokens_total = world.sum_int(sum(t.sampled for t in trajs))  # every rank's tokens
        while True:
            try:
                out = self._update(trajs, G, B, warm, targets_all, mine, exclude, tokens_total,
                                   anchor)
                break
            except Exception as exc:  # only out-of-memory is retried; the rest propagates
                if not is_out_of_memory(exc):
                    raise
                micro = cfg.optim.micro_batch_users or len(rows)
                size = self.max_trajectories or min(micro, len(rows)) * G  # the failed pieces
                self._out_of_memory(exc, self._phase, size, "trajectory")
            self.optimizer.zero_grad(set_to_none=True)  # the failed attempt's partial sums
            free_memory()
            self.max_trajectories = halved(size)
        reward, ndcg, rc, adv, sums, fresh, fresh_ids, h_all = out
        if cfg.sample_every and (self.step + 1) % cfg.sample_every == 0 and world.is_main:
            self._show_samples(rows[0], trajs[:G], h_all[:G], reward[:G], exclude[:G])
        token_loss, item_loss, clip_frac, anchor_loss = world.sum_floats(sums)
        with self.timer("optimizer"):
            params = [p for p in self.model.lm.parameters() if p.requires_grad]
            grad_norm = clip_grad_norm_(params, cfg.optim.grad_clip or math.inf).item()
            total = (cfg.recpo.token_loss_weight * token_loss
                     + cfg.recpo.item_loss_weight * item_loss
                     + cfg.recpo.anchor_weight * anchor_loss)
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"step {self.step}: loss {total} or grad norm "
                                         f"{grad_norm} is not finite; lower optim.lr")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        with self.timer("scoring"):  # DESIGN §5 step 8: the batch's targets, re-encoded
            if fresh:
                ids, hidden = torch.cat(fresh_ids), torch.cat(fresh)
            else:
                ids = targets_all
                hidden = world.gather_cat(self._encode_no_grad(targets_all[mine].tolist()))
            self.model.refresh_rows(ids, hidden.float())  # the same rows on every rank
        self.step += 1
        reward, ndcg, rc, adv = (world.gather_cat(x) for x in (reward, ndcg, rc, adv))
        metrics = {"loss": total, "token_loss": token_loss, "item_loss": item_loss,
                   **({"anchor_loss": anchor_loss} if anchor else {}),
                   "clip_frac": clip_frac, "reward_mean": reward.mean().item(),
                   "reward_std": reward.std().item() if reward.numel() > 1 else 0.0,
                   "ndcg": ndcg.mean().item(), "rc": rc.mean().item(),
                   "advantage_abs": adv.abs().mean().item(), "grad_norm": grad_norm,
                   "reasoning_len": tokens_total / (B * G),
                   "lr": self.scheduler.get_last_lr()[0], "oom_retries": len(self._oom_events)}
        if self._oom_events:
            metrics["oom_phases"] = ",".join(self._oom_events)
        for key, size in (("rollout_users_per_call", self.max_rollout_users),
                          ("trajectories_per_piece", self.max_trajectories)):
            if size is not None:  # sizes in force since an out-of-memory error
                metrics[key] = size
        return metrics

    def _show_samples(self, row: int, trajs, h, reward, exclude) -> None:
        """Print (and log to samples.jsonl) one user's prompt, chains and top-5 items."""
        from r2ec_fast.data.prompts import user_prompt
        from r2ec_fast.train.samples import format_report, sample_report, write_report

        data = self.data
        prompt = user_prompt(data["train"], row, data.items, data.category, self.prompt_config)
        report = {"step": self.step + 1, "row": row, **sample_report(
            self.model, data.items, prompt, int(data["train"].item_id[row]), trajs, h, reward,
            exclude, self.config.recpo.sim_temperature)}
        write_report(self.run_dir, report)
        tqdm.write(format_report(report))

    def _out_of_memory(self, exc: BaseException, phase: str, size: int, unit: str) -> None:
        """Record an out-of-memory error in `phase` at pieces of `size`; raise when it cannot
        be split further (or under torchrun, where the ranks would disagree on collectives)."""
        what = f"step {self.step}: out of memory in the {phase} at {size} {unit}(s) a piece"
        if self.dist.enabled:
            raise OutOfMemoryInStep(
                f"{what} on rank {self.dist.rank}; a torchrun job does not retry (its ranks "
                "would disagree on FSDP's collectives): lower optim.micro_batch_users, "
                "rollout.kv_budget or rollout.max_new_tokens") from exc
        if size <= 1:
            raise OutOfMemoryInStep(f"{what}: nothing left to split; lower "
                                    "rollout.max_new_tokens or use a smaller model") from exc
        self._oom_events.append(f"{phase}:{size}->{halved(size)}")
        if self.progress:
            tqdm.write(f"[r2ec-fast] {what}: retrying at {halved(size)}")

    def _rollout(self, rollout, rows: list[int], G: int):
        """G trajectories per user, in calls of at most `max_rollout_users` users (halved after
        an out-of-memory error; rollouts are seeded per (step, user), so the split changes
        nothing)."""
        prompts = self.user_prompt_ids("train", rows)
        seeds = [user_seed(self.config.seed, self.step, r) for r in rows]
        trajs, start = [], 0
        while start < len(rows):
            size = min(self.max_rollout_users or len(rows), len(rows) - start)
            try:
                trajs += rollout.sample(prompts[start:start + size], seeds[start:start + size], G)
                start += size
                continue
            except Exception as exc:  # only out-of-memory is retried; the rest propagates
                if not is_out_of_memory(exc):
                    raise
                self._out_of_memory(exc, "rollout", size, "user")
            free_memory()
            self.max_rollout_users = halved(size)
        return trajs

    def _warm_trajectories(self, rows: list[int]):
        """A RecPO run's warm-start trajectories (also its anchor's): the prompt, then the
        teacher-forced description (`target_description`) or nothing, then the marker."""
        from r2ec_fast.train.step import described_trajectories

        if self.config.warm_start_reasoning != "target_description":
            return self._rollout(self.no_reasoning, rows, 1)
        return described_trajectories(
            self.model.tokenizer, self.data.items, self.data["train"].item_id[rows].tolist(),
            self.user_prompt_ids("train", rows), self.answer_id,
            self.config.rollout.max_new_tokens)

    def _update(self, trajs, G: int, B: int, warm: bool, targets_all, mine, exclude,
                tokens_total: int, anchor=None):
        """The step after its rollout, in pieces of at most `max_trajectories` trajectories
        (None: each micro-batch at once): the answer states without gradient, the rewards and
        advantages, then per micro-batch its losses and backward. In-batch, a micro-batch's
        targets are encoded once with gradient and its pieces read a detached copy (`leaf`);
        their gradients for it go back through the encodings once, after the last piece, so
        that a piece sees every target of its micro-batch whatever its size. Returns (reward,
        ndcg, rc, adv [N], [token loss, item loss, clip fraction, anchor loss], fresh
        encodings, their ids, the answer states h [N, d]). `anchor`: (this rank's warm-start
        trajectories, one per user, and every rank's token count of them), whose supervised
        loss joins RecPO's (`recpo.anchor_weight`), or None."""
        from r2ec_fast.train.recpo import group_advantages, relabel_item_advantages
        from r2ec_fast.train.step import policy_forward, rewards, step_losses, trajectory_batch

        cfg, dev, world, rc_cfg = self.config, self.device, self.dist, self.config.recpo
        pad, N, cap = self.model.tokenizer.pad_token_id, len(trajs), self.max_trajectories
        b = N // G  # this rank's users
        targets_u = targets_all[mine]  # [b]
        targets = targets_u.repeat_interleave(G)  # [b G]
        micro = min(cfg.optim.micro_batch_users or b, b)
        chunks = [(lo, min(lo + micro, b)) for lo in range(0, b, micro)]  # users
        self.model.train()
        cached = None
        with self.timer("forward_backward"):
            self._phase = "forward"
            if len(chunks) == 1 and (cap is None or cap >= N):  # one pass serves both uses
                batch = trajectory_batch(trajs, pad, dev)
                cached = (batch, *policy_forward(self.model, batch))
                h_all = cached[1].detach()
            else:
                with torch.no_grad():
                    h_all = torch.cat([policy_forward(self.model, trajectory_batch(
                        trajs[a:z], pad, dev))[0] for a, z in pieces(0, N, cap)])
        with self.timer("scoring"):
            self._phase = "scoring"
            scored = [rewards(h_all[a:z].float(), self.model.item_table, targets[a:z],
                              exclude[a:z], rc_cfg.sim_temperature, rc_cfg.ndcg_k, rc_cfg.beta)
                      for a, z in pieces(0, N, cap)]
            reward, ndcg, rc = (torch.cat(x) for x in list(zip(*scored))[:3])
            adv = group_advantages(reward, G, rc_cfg.advantage)
            item_adv = relabel_item_advantages(adv, G, rc_cfg.relabel_topk)
        sums = [0.0, 0.0, 0.0, 0.0]  # token loss, item loss, clip fraction, anchor loss
        fresh, fresh_ids = [], []
        need_items = warm or rc_cfg.item_loss == "in_batch" or anchor is not None
        with self.timer("forward_backward"):
            for lo, hi in chunks:
                items = leaf = None
                if need_items:  # the chunk's targets on every rank: in-batch negatives
                    self._phase = "item encoding"
                    items = world.gather_rows(self._items_hidden(targets_u[lo:hi].tolist(), cap))
                    leaf = items.detach().requires_grad_()
                for a, z in pieces(lo * G, hi * G, cap):
                    self._phase = "forward"
                    if cached is not None:
                        batch, h, token_hidden = cached
                    else:
                        batch = trajectory_batch(trajs[a:z], pad, dev)
                        h, token_hidden = policy_forward(self.model, batch)
                    # where each trajectory's target is in `items` (this rank's block of rows)
                    labels = world.rank * (hi - lo) + torch.arange(a, z, device=dev) // G - lo
                    if warm:
                        item_part, nll = self._supervised_loss(batch, h, token_hidden, leaf,
                                                               labels, B, tokens_total)
                        sums[0] += nll.item()
                        sums[1] += item_part.item()
                        loss = item_part + nll
                    else:
                        self.plan.gather_head()  # the token loss reads the lm_head weight
                        parts = step_losses(
                            self.model, h.float(), token_hidden, batch, adv[a:z], item_adv[a:z],
                            targets[a:z], exclude[a:z], None if leaf is None else leaf.float(),
                            labels, rc_cfg, cfg.rollout.temperature,
                            rc_cfg.token_loss_weight, rc_cfg.item_loss_weight, B, B * G, tokens_total)
                        loss = parts.loss
                        sums[0] += parts.token_loss.item()
                        sums[1] += parts.item_loss.item()
                        sums[2] += parts.clip_frac.item() * batch.token_ids.numel() / max(
                            1, tokens_total)
                    self._phase = "backward"
                    loss.backward()
                if anchor is not None:  # the same users' warm-start trajectories
                    for a, z in pieces(lo, hi, cap):
                        self._phase = "forward"
                        batch = trajectory_batch(anchor[0][a:z], pad, dev)
                        h, token_hidden = policy_forward(self.model, batch)
                        labels = world.rank * (hi - lo) + torch.arange(a, z, device=dev) - lo
                        item_part, nll = self._supervised_loss(batch, h, token_hidden, leaf,
                                                               labels, B, anchor[1])
                        loss = item_part + nll
                        sums[3] += loss.item()
                        self._phase = "backward"
                        (rc_cfg.anchor_weight * loss).backward()
                if items is not None:
                    self._phase = "backward"
                    if leaf.grad is not None:
                        items.backward(leaf.grad)
                    fresh.append(items.detach())
                    fresh_ids.append(targets_all.view(world.world_size, b)[:, lo:hi].reshape(-1))
        return reward, ndcg, rc, adv, sums, fresh, fresh_ids, h_all

    def _supervised_loss(self, batch, h, token_hidden, leaf, labels, B: int,
                         tokens_total: int):
        """The warm start's two losses on teacher-forced trajectories: (the contrastive loss
        at the marker, the next-token loss on the reasoning tokens, 0 without any)."""
        from r2ec_fast.train.step import contrastive_loss, description_loss

        item_part = contrastive_loss(h.float(), leaf.float(), labels, B,
                                     self.config.recpo.sim_temperature)
        nll = torch.zeros((), device=h.device)
        if batch.token_ids.numel():  # teacher-forced reasoning (a description)
            self.plan.gather_head()
            nll = description_loss(self.model, token_hidden, batch, tokens_total)
        return item_part, nll

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
        rows = rows[self.dist.split(len(rows))]  # each rank its share of the users
        if refresh:
            self.refresh_table()
        with self.timer("eval"), self.plan.gathered():
            out = evaluate(self.model, self.rollout, self.user_prompt_ids(split, rows),
                           torch.as_tensor(data.item_id[rows]), self.histories[split][rows],
                           self.config.recpo.sim_temperature, progress=self.progress,
                           desc=f"eval {split}")
        out = weighted_means(out, len(rows), self.dist)  # the means over every rank's users
        if self.dist.is_main:
            self.eval_logger.log(self.step, split=split, **out)
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Checkpoint (every rank must call it: under FSDP2 the full state is gathered to
        rank 0, which writes it in the one-process format)."""
        from r2ec_fast.train.checkpoint import CHECKPOINTS_DIR, save_checkpoint

        adapter_only = bool(self.config.model.lora_r)
        with self.timer("checkpoint"):
            model, optimizer = self.model.lm, self.optimizer
            if self.dist.enabled:
                self.dist.check_same("the item table", self.model.item_table.weight)
                model, optimizer = full_state(model, optimizer, self.dist, adapter_only)
            path = self.run_dir / CHECKPOINTS_DIR / f"step-{self.step:08d}"
            if self.dist.is_main:
                path = save_checkpoint(
                    self.run_dir, self.step, model=model, optimizer=optimizer,
                    scheduler=self.scheduler, item_table=self.model.item_table,
                    trainer_state={"epoch": self.epoch, "position": self.position},
                    keep_last=self.config.keep_checkpoints, adapter_only=adapter_only)
            self.dist.barrier()  # no rank goes on (or resumes) before the files are there
            return path

    def _resume(self) -> bool:
        from r2ec_fast.train.checkpoint import (
            STATE_FILE, CheckpointError, checkpoint_item_table, latest_checkpoint,
            load_checkpoint, restore_rng,
        )

        path = latest_checkpoint(self.run_dir)
        if path is None:  # killed before its first checkpoint: what it logged is void
            if self.dist.is_main:
                self.logger.truncate_after(-1)
                self.eval_logger.truncate_after(-1)
            return False
        model, optimizer = sharded_loaders(self.model.lm, self.optimizer, self.dist)
        state = load_checkpoint(path, model=model, optimizer=optimizer,
                                scheduler=self.scheduler, map_location=self.device)
        position = state["trainer_state"]
        if not (isinstance(position, dict) and all(
                isinstance(position.get(k), int) for k in ("epoch", "position"))):
            raise CheckpointError(f"{path / STATE_FILE}: trainer_state needs integer 'epoch' "
                                  f"and 'position' (the data order), got {position!r}")
        self.step, self.epoch, self.position = (state["step"], position["epoch"],
                                                position["position"])
        self.model.item_table = checkpoint_item_table(state, path, self.data.items.num_items
                                                      ).to(self.device)
        restore_rng(state["rng"])
        if self.dist.is_main:
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
            if self.dist.is_main:
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

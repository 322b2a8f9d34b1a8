"""One RecPO step on tensors (DESIGN §5 steps 2-7), separate from the loop's bookkeeping.

`trajectory_batch` pads trajectories; `policy_forward` runs the decoder once with gradient and
returns what both losses need: the hidden states that predict each sampled reasoning token
(for `linear_log_probs`, never the T x |Vocab| logits) and each trajectory's final hidden
state h at its answer marker (the item action). `rewards` scores h over the whole catalog with
the history excluded; `step_losses` combines token loss and item loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r2ec_fast.ops import (
    catalog_log_prob, in_batch_log_prob, linear_log_probs, recpo_token_loss, score_catalog,
)
from r2ec_fast.rollout.hf import Trajectory
from r2ec_fast.train.recpo import fused_reward, item_loss


@dataclass
class TrajectoryBatch:
    input_ids: torch.Tensor  # [N, L] right-padded
    attention_mask: torch.Tensor  # [N, L]
    token_rows: torch.Tensor  # [T] trajectory of each sampled reasoning token
    token_pos: torch.Tensor  # [T] its position in the sequence
    token_ids: torch.Tensor  # [T] the token
    answer_pos: torch.Tensor  # [N] position of the answer marker (the last token)

    @property
    def reasoning_len(self) -> torch.Tensor:
        return torch.bincount(self.token_rows, minlength=self.input_ids.shape[0])


def trajectory_batch(trajs: list[Trajectory], pad_id: int, device) -> TrajectoryBatch:
    width = max(len(t.tokens) for t in trajs)
    ids = torch.full((len(trajs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(trajs), width), dtype=torch.long)
    rows, pos, toks = [], [], []
    for n, t in enumerate(trajs):
        seq = t.tokens
        ids[n, :len(seq)] = torch.tensor(seq)
        mask[n, :len(seq)] = 1
        start = len(t.prompt)
        for k in range(t.sampled):
            rows.append(n)
            pos.append(start + k)
            toks.append(seq[start + k])
    answer = torch.tensor([len(t.tokens) - 1 for t in trajs])
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return TrajectoryBatch(ids.to(device), mask.to(device), as_long(rows), as_long(pos),
                           as_long(toks), answer.to(device))


def policy_forward(model, batch: TrajectoryBatch):
    """(h [N, d] at the answer markers, token hidden [T, d]: the states that predict the
    sampled tokens, i.e. at position - 1). One decoder pass, no lm_head."""
    out = model.decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False)
    hidden = out.last_hidden_state  # [N, L, d] after the final norm
    n = torch.arange(hidden.shape[0], device=hidden.device)
    h = hidden[n, batch.answer_pos]
    token_hidden = hidden[batch.token_rows, batch.token_pos - 1]
    return h, token_hidden


def exclusion(histories: torch.Tensor) -> torch.Tensor:
    """[N, W] history ids (-1 pads) plus the padding item 0, which never competes."""
    zeros = torch.zeros((histories.shape[0], 1), dtype=torch.long, device=histories.device)
    return torch.cat([histories, zeros], 1)


@torch.no_grad()
def rewards(h: torch.Tensor, table, targets: torch.Tensor, exclude: torch.Tensor,
            temperature: float, ndcg_k: int, beta: float):
    """(R, NDCG@k, R_c, rank) [N] over the full catalog (DESIGN §5 step 3)."""
    scores = score_catalog(h.detach(), table, targets, exclude=exclude, temperature=temperature)
    ndcg, rc = scores.ndcg(ndcg_k), scores.target_prob()
    return fused_reward(ndcg, rc, beta), ndcg, rc, scores.rank


@dataclass
class StepLoss:
    loss: torch.Tensor
    token_loss: torch.Tensor
    item_loss: torch.Tensor
    clip_frac: torch.Tensor


def step_losses(model, h, token_hidden, batch: TrajectoryBatch, advantages, item_advantages,
                targets, exclude, item_h, item_labels, recpo, temperature: float,
                token_weight: float, item_weight: float, users_total: int,
                trajectories_total: int, tokens_total: int) -> StepLoss:
    """Token loss + item loss of a piece of the step's trajectories, scaled so that summing over
    pieces (and over ranks) gives the mean over all `tokens_total` reasoning tokens and all
    `trajectories_total` trajectories of the step (`users_total` users: the reference's token
    normalisation). Every term is per token or per trajectory, so
    the pieces may cut groups anywhere: `item_advantages` (`relabel_item_advantages` of the whole
    groups) come in already relabelled. In-batch: `item_h` holds the targets the softmax runs
    over (its micro-batch's, every rank's), row `item_labels[i]` trajectory i's target."""
    dev = h.device
    zero = torch.zeros((), device=dev)
    token_loss = clip = zero
    if batch.token_ids.numel():
        per_token_adv = advantages[batch.token_rows]
        out = recpo_token_loss(token_hidden, model.lm_head_weight, batch.token_ids,
                               per_token_adv, torch.ones_like(per_token_adv),
                               eps_low=recpo.eps_low, eps_high=recpo.eps_high,
                               softcap=model.softcap, temperature=temperature)
        share = batch.token_ids.numel() / max(1, tokens_total)
        token_loss = out.loss * share
        if recpo.token_loss_normalize == "reference":
            token_loss = token_loss / users_total
        clip = out.clip_frac
    if recpo.item_loss == "in_batch":
        logp = in_batch_log_prob(h, item_h, item_labels, temperature=recpo.sim_temperature)
    else:
        logp = catalog_log_prob(h, model.item_table, targets, exclude=exclude,
                                temperature=recpo.sim_temperature)
    loss_item, _ = item_loss(logp, None, item_advantages, recpo.eps_low, recpo.eps_high)
    loss_item = loss_item * (h.shape[0] / trajectories_total)
    loss = token_weight * token_loss + item_weight * loss_item
    return StepLoss(loss, token_loss.detach(), loss_item.detach(), clip)


def contrastive_loss(h, item_h, labels, users_total: int, temperature: float) -> torch.Tensor:
    """The "w/o reasoning" variant: -log softmax of each user's target over the batch's
    targets (user i's at row `labels[i]` of item_h), from the prompt's final state; scaled for
    piece (and rank) accumulation."""
    return -in_batch_log_prob(h, item_h, labels, temperature=temperature).sum() / users_total


def description_loss(model, token_hidden, batch: TrajectoryBatch, tokens_total: int) -> torch.Tensor:
    """The warm start's next-token loss on teacher-forced reasoning tokens (about the
    target): their summed negative log-probability over `tokens_total`, the step's count (so
    that pieces and ranks add up to the mean); the model's softcap, temperature 1."""
    logp = linear_log_probs(token_hidden, model.lm_head_weight, batch.token_ids,
                            softcap=model.softcap)
    return -logp.sum() / max(1, tokens_total)


def described_trajectories(tokenizer, items, targets: list[int], prompts: list[list[int]],
                           answer_id: int, limit: int) -> list[Trajectory]:
    """The `target_description` warm start's teacher-forced trajectories: each prompt, the
    first line of its target's description (else the title), the answer marker; at most
    `limit` tokens after the prompt, the marker included. Every one of them is a target of the
    next-token loss: the marker too, so that the model learns to end its reasoning."""
    out = []
    for prompt, target in zip(prompts, targets):
        text = items.description[target].strip().split("\n", 1)[0] or items.title[target]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:limit - 1]
        out.append(Trajectory(prompt, ids + [answer_id], len(ids) + 1))
    return out

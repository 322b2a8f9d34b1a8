"""RecPO's maths (DESIGN §5): rewards, group advantages, relabelling and the item loss.

Where RecPO departs from textbook GRPO (Shao et al. 2024, arXiv 2402.03300):
- A trajectory is G sampled reasoning chains per user *then one item action*: the policy's
  final hidden state scores the whole catalog. The reward is not a verifier's 0/1 but a fused
  ranking reward R = beta * R_c + (1 - beta) * R_d over the full catalog with the user's
  history excluded: R_d = NDCG@k of the target's rank (k = 1000), R_c = the softmax
  probability of the target (beta = 0.05).
- The item action gets its own clipped loss term, and only the top-`relabel_topk` trajectories
  of each group (by advantage) carry the advantage there; the others carry 0 ("relabel").
- No KL penalty and no reference model (the reference trainer's default); asymmetric clipping
  eps_low = 0.2, eps_high = 0.28 (DAPO's clip-higher, arXiv 2503.14476).
- Advantages: GRPO (R - mean) / (std + 1e-8) with the unbiased std (std := 1 when G = 1), or
  RLOO (R_i - mean of the other G - 1). The reference trainer's "leave-one-out" is
  R (1 + 1/G) - mean, which is not RLOO; it is offered as "reference_loo" for the compat layer.

Every function works on flat [B * G] tensors, group g's samples at rows g*G .. g*G + G - 1.
"""
from __future__ import annotations

import torch

from r2ec_fast.ops.token_logp import clipped_objective

ADVANTAGES = ("grpo", "rloo", "reference_loo")


def fused_reward(ndcg: torch.Tensor, target_prob: torch.Tensor, beta: float = 0.05):
    """R = beta * R_c + (1 - beta) * R_d, fp32 [N]."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta * target_prob.float() + (1.0 - beta) * ndcg.float()


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or x.dim() != 1 or x.numel() % group_size:
        raise ValueError(f"need a flat tensor of whole groups of {group_size}, got shape "
                         f"{tuple(x.shape)}")
    return x.float().view(-1, group_size)  # [B, G]


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "grpo",
                     eps: float = 1e-8) -> torch.Tensor:
    """Advantages [B * G] fp32 of rewards [B * G] within each group of `group_size`."""
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage kind {kind!r}; choose one of {ADVANTAGES}")
    r = _groups(rewards, group_size)
    mean = r.mean(1, keepdim=True)
    if kind == "grpo":
        std = r.std(1, keepdim=True) if group_size > 1 else torch.ones_like(mean)
        adv = (r - mean) / (std + eps)
    elif kind == "rloo":
        if group_size == 1:
            adv = torch.zeros_like(r)  # no other sample to compare with
        else:
            adv = (r - (r.sum(1, keepdim=True) - r) / (group_size - 1))
    else:
        adv = r * (1.0 + 1.0 / group_size) - mean
    return adv.reshape(-1)


def relabel_item_advantages(advantages: torch.Tensor, group_size: int,
                            topk: int = 1) -> torch.Tensor:
    """The item action's advantages: each group's `topk` largest advantages kept (ties: the
    earlier sample), every other entry 0."""
    if topk < 0:
        raise ValueError(f"relabel topk must be >= 0, got {topk}")
    a = _groups(advantages, group_size)
    k = min(topk, group_size)
    keep = torch.zeros_like(a, dtype=torch.bool)
    if k:
        # stable: sort descending by value, then by position, so ties go to the earlier row
        order = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :k]
        keep.scatter_(1, order, True)
    return torch.where(keep, a, 0.0).reshape(-1)


def item_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
              eps_low: float = 0.2, eps_high: float = 0.28):
    """DESIGN §5 step 7: the clipped objective on the item action's log-probability, averaged
    over the trajectories. Returns (loss, clip fraction)."""
    old = logp.detach() if old_logp is None else old_logp
    per, took_clip, _ = clipped_objective(logp, old, advantages, eps_low, eps_high)
    return per.mean(), took_clip.float().mean()

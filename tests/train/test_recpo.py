"""RecPO's pieces against a float64, loop-by-loop restatement of DESIGN §5."""
import math

import pytest
import torch

from r2ec_fast.train.recpo import (
    fused_reward, group_advantages, item_loss, relabel_item_advantages,
)


def rewards(b, g, seed=0):
    return torch.rand(b * g, generator=torch.Generator().manual_seed(seed))


def advantages_by_hand(r, g, kind):
    out = []
    for s in range(0, len(r), g):
        grp = [float(x) for x in r[s:s + g]]
        mean = sum(grp) / g
        for i, x in enumerate(grp):
            if kind == "grpo":
                std = 1.0 if g == 1 else math.sqrt(sum((y - mean) ** 2 for y in grp) / (g - 1))
                out.append((x - mean) / (std + 1e-8))
            elif kind == "rloo":
                out.append(0.0 if g == 1 else x - (sum(grp) - x) / (g - 1))
            else:
                out.append(x * (1 + 1 / g) - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["grpo", "rloo", "reference_loo"])
@pytest.mark.parametrize("g", [1, 2, 4, 7])
def test_group_advantages(kind, g):
    r = rewards(5, g, seed=g)
    got = group_advantages(r, g, kind)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), advantages_by_hand(r, g, kind), rtol=1e-5, atol=1e-6)
    if kind in ("grpo", "rloo"):
        assert got.view(5, g).sum(1).abs().max() < 1e-5  # centred within each group


def test_grpo_with_equal_rewards_is_zero_not_nan():
    assert torch.equal(group_advantages(torch.full((8,), 0.3), 4), torch.zeros(8))


def test_fused_reward():
    ndcg, rc = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.2, 0.0, 1.0])
    assert torch.allclose(fused_reward(ndcg, rc), 0.05 * rc + 0.95 * ndcg)
    with pytest.raises(ValueError, match="beta"):
        fused_reward(ndcg, rc, beta=1.5)


@pytest.mark.parametrize("topk", [0, 1, 2, 4, 9])
def test_relabel_keeps_the_topk_of_each_group(topk):
    adv = torch.tensor([0.5, -1.0, 2.0, 2.0,   # tie at the top: the earlier sample first
                        -0.1, -0.2, -0.3, -0.4])
    got = relabel_item_advantages(adv, 4, topk)
    expect = torch.zeros(8)
    for s in (0, 4):
        grp = adv[s:s + 4].tolist()
        order = sorted(range(4), key=lambda i: (-grp[i], i))[:min(topk, 4)]
        for i in order:
            expect[s + i] = grp[i]
    assert torch.equal(got, expect)
    if topk == 1:
        assert got.nonzero().flatten().tolist() == [2, 4]  # the earlier of the tied pair


def test_item_loss_clips_both_sides():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.tensor([0.25, 1.0, 0.25, 1.0], dtype=torch.float64))  # r = 2, 0.5
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    loss, clip_frac = item_loss(logp.float(), old.float(), adv.float())
    r = torch.exp(logp - old)
    by_hand = sum(-min(ri * a, min(max(ri, 0.8), 1.28) * a) for ri, a in zip(r.tolist(),
                                                                            adv.tolist())) / 4
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # r = 2, A > 0 and r = 0.5, A < 0 take the clipped (constant) branch
    assert clip_frac.item() == pytest.approx(0.5)
    lp = logp.detach().float().requires_grad_()
    item_loss(lp, old.float(), adv.float())[0].backward()
    assert lp.grad[0] == 0 and lp.grad[1] == 0 and lp.grad[2] != 0 and lp.grad[3] != 0


def test_bad_groups_rejected():
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="kind"):
        group_advantages(torch.zeros(8), 4, "ppo")

"""linear_log_probs / recpo_token_loss against float64 (DESIGN §4.3, §5 step 6)."""
import pytest
import torch

from r2ec_fast.ops import linear_log_probs, linear_log_probs_reference, recpo_token_loss
from r2ec_fast.ops import token_logp as mod
from r2ec_fast.testing import TOLERANCE, assert_three_way, rel_error

F32, BF16 = torch.float32, torch.bfloat16


def make_case(t, v, d, dtype=F32, seed=0, peaked=False, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, d, generator=g) / d ** 0.25
    weight = torch.randn(v, d, generator=g) / d ** 0.25
    targets = torch.randint(0, v, (t,), generator=g)
    if peaked:  # the target's row aligned with the hidden state: logits far above the rest
        weight[targets[: min(t, v)]] = 4 * hidden[: min(t, v)]
    if ignore and t > 2:
        targets[1] = -100
    return hidden.to(dtype), weight.to(dtype), targets


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 5 tokens x 7 vocabulary rows: every boundary is crossed on small shapes."""
    monkeypatch.setattr(mod, "TOKEN_CHUNK", 5)
    monkeypatch.setattr(mod, "BLOCK_ELEMS", 35)


CAPS = [(None, 1.0), (30.0, 1.0), (None, 0.7), (5.0, 2.0)]


@pytest.mark.parametrize("softcap,temperature", CAPS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("shape", [(1, 9, 8), (23, 61, 40), (12, 30, 2304)],
                         ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_match_float64(small_blocks, softcap, temperature, dtype, shape):
    hidden, weight, targets = make_case(*shape, dtype, seed=sum(shape), peaked=shape[0] > 20)
    g_logp = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    g_ent = torch.randn(shape[0], generator=torch.Generator().manual_seed(2))

    def run(fn, h, w, **kw):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fn(h, w, targets, softcap, temperature, return_entropy=True, **kw)
        ((lp * g_logp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()).backward()
        return lp, ent, h.grad, w.grad

    ours = run(linear_log_probs, hidden, weight, backend="torch")
    ref = run(linear_log_probs_reference, hidden.double(), weight.double())
    plain = run(linear_log_probs_reference, hidden, weight, upcast=False)
    tol = TOLERANCE[dtype]
    for name, a, r, p in zip(("logp", "entropy", "grad hidden", "grad weight"), ours, ref, plain):
        assert_three_way(a, r, p, name, tol=tol)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype
    if shape[0] > 2:
        assert ours[0][1] == 0 and ours[1][1] == 0  # ignored target
        assert (ours[2][1] == 0).all()  # and no gradient through it


def test_frozen_weight_gets_no_gradient_work(small_blocks, monkeypatch):
    hidden, weight, targets = make_case(11, 20, 16, seed=3)
    calls = []
    real = mod._backward_chunk
    monkeypatch.setattr(mod, "_backward_chunk",
                        lambda *a: calls.append(a[-1]) or real(*a))
    h = hidden.clone().requires_grad_()
    linear_log_probs(h, weight, targets, backend="torch").sum().backward()
    assert weight.grad is None and calls and all(gw is None for gw in calls)
    h64 = hidden.double().requires_grad_()
    linear_log_probs_reference(h64, weight.double(), targets).sum().backward()
    assert rel_error(h.grad, h64.grad) < 1e-4


def test_chunking_does_not_change_results(monkeypatch):
    hidden, weight, targets = make_case(37, 113, 24, seed=4)
    whole = linear_log_probs(hidden, weight, targets, 30.0, 0.9, backend="torch")
    monkeypatch.setattr(mod, "TOKEN_CHUNK", 4)
    monkeypatch.setattr(mod, "BLOCK_ELEMS", 4 * 9)
    cut = linear_log_probs(hidden, weight, targets, 30.0, 0.9, backend="torch")
    assert rel_error(cut, whole) < 1e-6


def test_validation_errors():
    hidden, weight, targets = make_case(4, 10, 8, seed=5)
    with pytest.raises(ValueError, match="targets"):
        linear_log_probs(hidden, weight, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="targets"):
        linear_log_probs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="d="):
        linear_log_probs(hidden, torch.randn(10, 9), targets)
    with pytest.raises(ValueError, match="softcap"):
        linear_log_probs(hidden, weight, targets, softcap=0.0)
    with pytest.raises(ValueError, match="temperature"):
        linear_log_probs(hidden, weight, targets, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        linear_log_probs(hidden, weight, targets, temperature=True)
    with pytest.raises(ValueError, match="softcap"):
        linear_log_probs(hidden, weight, targets, softcap=True)
    with pytest.raises(ValueError, match="triton"):
        linear_log_probs(hidden, weight, targets, backend="triton")


def token_loss_float64(logp, old, adv, mask, eps_low, eps_high):
    ratio = torch.exp(logp - old)
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("normalize", ["token", "reference"])
def test_recpo_token_loss_matches_the_formula(normalize):
    hidden, weight, targets = make_case(40, 50, 16, seed=6, ignore=False)
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(40, generator=g)
    mask = (torch.rand(40, generator=g) > 0.2).float()
    with torch.no_grad():
        logp0 = linear_log_probs(hidden, weight, targets, 30.0, 1.3)
    old = logp0 + 0.5 * torch.randn(40, generator=g)  # ratios well outside [0.8, 1.28]
    h = hidden.clone().requires_grad_()
    out = recpo_token_loss(h, weight, targets, adv, mask, old, softcap=30.0, temperature=1.3,
                           normalize=normalize, batch_size=4, return_entropy=True)
    out.loss.backward()
    h64 = hidden.double().requires_grad_()
    lp64, ent64 = linear_log_probs_reference(h64, weight.double(), targets, 30.0, 1.3,
                                             return_entropy=True)
    expect = token_loss_float64(lp64, old.double(), adv.double(), mask.double(), 0.2, 0.28)
    if normalize == "reference":
        expect = expect / 4
    expect.backward()
    assert rel_error(out.loss, expect) < 1e-5
    assert rel_error(h.grad, h64.grad) < 1e-4
    ratio = torch.exp(lp64.detach() - old.double())
    low = (adv < 0) & (ratio < 0.8)
    high = (adv > 0) & (ratio > 1.28)
    assert low[mask > 0].any() and high[mask > 0].any()  # both sides of the clip are exercised
    clip = ((low | high).double() * mask).sum() / mask.sum()
    assert abs(out.clip_frac.item() - clip.item()) < 1e-6
    assert rel_error(out.mean_ratio, (ratio * mask).sum() / mask.sum()) < 1e-5
    assert rel_error(out.entropy, (ent64 * mask).sum() / mask.sum()) < 1e-5


def test_recpo_token_loss_on_policy_gradient_is_policy_gradient():
    hidden, weight, targets = make_case(9, 20, 8, seed=8, ignore=False)
    adv = torch.randn(9, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(9)
    h = hidden.clone().requires_grad_()
    out = recpo_token_loss(h, weight, targets, adv, mask)
    out.loss.backward()
    assert out.mean_ratio.item() == pytest.approx(1.0) and out.clip_frac.item() == 0.0
    h2 = hidden.clone().requires_grad_()
    (-(linear_log_probs(h2, weight, targets) * adv).mean()).backward()
    assert rel_error(h.grad, h2.grad) < 1e-6
    with pytest.raises(ValueError, match="batch_size"):
        recpo_token_loss(h, weight, targets, adv, mask, normalize="reference")

"""linear_log_probs / recpo_token_loss against float64 (DESIGN §4.3, §5 step 6)."""
import pytest
import torch

from r2ec_fast.ops import linear_log_probs, linear_log_probs_reference, recpo_token_loss
from r2ec_fast.ops import token_logp as mod
from r2ec_fast.testing import TOLERANCE, assert_three_way, poisoned_empty, rel_error

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
    """Blocks of 5 tokens x 7 vocabulary rows (torch), and the Triton backward's dZ chunks
    of 8 or 16 vocabulary columns, below the interpreter's 32-column tile: every boundary is
    crossed on small shapes."""
    from r2ec_fast.kernels import token_logp as kern

    monkeypatch.setattr(mod, "TOKEN_CHUNK", 5)
    monkeypatch.setattr(mod, "BLOCK_ELEMS", 35)
    monkeypatch.setattr(kern, "CHUNK_MULTIPLE", 8)
    monkeypatch.setattr(kern, "DZ_BUDGET_BYTES", 23 * 16 * 4)  # T = 23 fp32: 16 columns


CAPS = [(None, 1.0), (30.0, 1.0), (None, 0.7), (5.0, 2.0)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("softcap,temperature", CAPS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("shape", [(1, 9, 8), (23, 61, 40), (12, 30, 2304)],
                         ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_match_float64(small_blocks, backend, softcap, temperature, dtype,
                                        shape):
    """torch blocks of 5 x 7 and the interpreter's Triton tiles of 16 x 32 (d in steps of at
    most 64) are all crossed: T = 23, Vocab = 61, d = 40 and 2304."""
    hidden, weight, targets = make_case(*shape, dtype, seed=sum(shape), peaked=shape[0] > 20)
    g_logp = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    g_ent = torch.randn(shape[0], generator=torch.Generator().manual_seed(2))

    def run(fn, h, w, **kw):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fn(h, w, targets, softcap, temperature, return_entropy=True, **kw)
        ((lp * g_logp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()).backward()
        return lp, ent, h.grad, w.grad

    ours = run(linear_log_probs, hidden, weight, backend=backend)
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
                        lambda *a: calls.append(a[-2]) or real(*a))  # grad_w
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
    with pytest.raises(ValueError, match="backend"):
        linear_log_probs(hidden, weight, targets, backend="cuda")


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


# ----------------------------------------------------------------------------- Triton kernels


def reference_grads(hidden, weight, targets, softcap, temperature, g_logp, g_ent):
    """float64 (logp, entropy, grad hidden, grad weight) of sum g_logp logp + g_ent entropy."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    lp, ent = linear_log_probs_reference(h, w, targets, softcap, temperature,
                                         return_entropy=True)
    ((lp * g_logp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def assert_matches_float64(hidden, weight, targets, softcap, temperature, tol, seed, **kw):
    """linear_log_probs(**kw) on hidden's device: logp, entropy and the gradients of hidden and
    weight (of random combinations of both) each within the three-way bound."""
    dev = hidden.device
    g = torch.Generator().manual_seed(seed)
    g_logp, g_ent = (torch.randn(hidden.shape[0], generator=g).to(dev) for _ in range(2))

    def run(fn, h, w, **kw):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fn(h, w, targets, softcap, temperature, return_entropy=True, **kw)
        ((lp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return lp, ent, h.grad, w.grad

    ours = run(linear_log_probs, hidden, weight, **kw)
    ref = reference_grads(hidden, weight, targets, softcap, temperature, g_logp, g_ent)
    plain = run(linear_log_probs_reference, hidden, weight, upcast=False)
    for name, out, r, p in zip(("logp", "entropy", "grad hidden", "grad weight"), ours, ref,
                               plain):
        assert_three_way(out.cpu(), r.cpu(), p.cpu(), name, tol=tol)
    return ours


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels must fully write starts as NaN (integers: their minimum)."""
    from r2ec_fast.kernels import token_logp as kern

    monkeypatch.setattr(kern, "_empty", poisoned_empty)
    return kern


@pytest.mark.parametrize("design", ["chunked", "fused"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_triton_launchers_cross_every_boundary(poisoned, monkeypatch, dtype, design):
    """Tiles of 16 tokens x 32 vocabulary rows x 16 features against T = 37, Vocab = 300,
    d = 40: three token blocks, ten vocabulary tiles, several forward splits, and a partial
    last block on every axis. Fused: the tiles shared by three persistent weight-gradient
    programs (so each program reuses its scratch); fp32 accumulates the weight gradient in
    place, bf16 in the scratch. Chunked: dZ chunks of 96 columns (three tiles, the last one
    partial), the last chunk 12 columns."""
    kern = poisoned
    monkeypatch.setattr(kern, "CHUNK_MULTIPLE", 32)
    monkeypatch.setattr(kern, "DZ_BUDGET_BYTES", 37 * 96 * (4 if dtype == F32 else 2))
    assert kern.chunk_columns(37, 300, 4 if dtype == F32 else 2) == 96
    hidden, weight, targets = make_case(37, 300, 40, dtype, seed=11, peaked=True)
    tgt = torch.where(targets == -100, -1, targets)
    g = torch.Generator().manual_seed(12)
    g_logp, g_ent = torch.randn(37, generator=g), torch.randn(37, generator=g)
    config = dict(block_t=16, block_v=32, block_d=16, programs=3)
    logp, ent, stats = kern.token_logp_forward(hidden, weight, tgt, 30.0, 0.8, True,
                                               config=config)
    grad_h, grad_w = kern.token_logp_backward(hidden, weight, tgt, stats, g_logp, g_ent, 30.0,
                                              0.8, True, True, config=config, design=design)
    ref = reference_grads(hidden, weight, targets, 30.0, 0.8, g_logp, g_ent)
    plain_h = hidden.clone().requires_grad_()
    plain_w = weight.clone().requires_grad_()
    plain_lp, plain_ent = linear_log_probs_reference(plain_h, plain_w, targets, 30.0, 0.8,
                                                     return_entropy=True, upcast=False)
    ((plain_lp * g_logp).sum() + (plain_ent * g_ent).sum()).backward()
    plain = (plain_lp, plain_ent, plain_h.grad, plain_w.grad)
    outs = (logp, ent, grad_h, grad_w)
    for name, out, r, p in zip(("logp", "entropy", "grad hidden", "grad weight"), outs, ref,
                               plain):
        assert_three_way(out, r, p, name, tol=TOLERANCE[dtype])
    assert grad_h.dtype == grad_w.dtype == dtype
    assert logp[1] == 0 and ent[1] == 0 and (grad_h[1] == 0).all()


@pytest.mark.parametrize("design", ["chunked", "fused"])
def test_triton_backward_is_deterministic_and_split_independent(monkeypatch, design):
    """Same inputs, same bits; summing grad_hidden over one or several vocabulary splits
    (fused), or over dZ chunks of another width (chunked), agrees to fp32 rounding."""
    from r2ec_fast.kernels import token_logp as kern

    monkeypatch.setattr(kern, "BACKWARD", design)
    monkeypatch.setattr(kern, "CHUNK_MULTIPLE", 16)
    monkeypatch.setattr(kern, "DZ_BUDGET_BYTES", 20 * 48 * 4)  # 48 columns: 4 chunks
    hidden, weight, targets = make_case(20, 150, 24, seed=13)
    g_logp = torch.randn(20, generator=torch.Generator().manual_seed(14))

    def grads():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        (linear_log_probs(h, w, targets, 30.0, 1.5, backend="triton") * g_logp).sum().backward()
        return h.grad, w.grad

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    if design == "fused":
        monkeypatch.setattr(kern, "SPLIT_PARTIAL_BYTES", 1)  # one split: no partial sums
    else:
        monkeypatch.setattr(kern, "DZ_BUDGET_BYTES", 1 << 20)  # one chunk
    single = grads()
    assert rel_error(single[0], first[0]) < 1e-6 and rel_error(single[1], first[1]) < 1e-6
    if design == "fused":
        assert torch.equal(single[1], first[1])


@pytest.mark.parametrize("design", ["chunked", "fused"])
def test_triton_frozen_weight_launches_no_weight_kernel(monkeypatch, design):
    from r2ec_fast.kernels import token_logp as kern
    from r2ec_fast.ops import _gemm

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("the weight-gradient kernel ran for a frozen weight")

    def forbidden_gemm(*args):
        raise AssertionError("the weight-gradient GEMM ran for a frozen weight")

    monkeypatch.setattr(kern, "BACKWARD", design)
    monkeypatch.setattr(kern, "_token_logp_bwd_weight_kernel", Forbidden())
    monkeypatch.setattr(_gemm, "mm_into", forbidden_gemm)
    hidden, weight, targets = make_case(9, 70, 16, seed=15)
    h = hidden.clone().requires_grad_()
    logp, ent = linear_log_probs(h, weight, targets, None, 1.0, return_entropy=True,
                                 backend="triton")
    (logp.sum() + ent.sum()).backward()
    g = torch.ones(9)
    ref = reference_grads(hidden, weight, targets, None, 1.0, g, g)
    assert weight.grad is None and rel_error(h.grad, ref[2]) < 1e-5


def test_backward_design_is_checked():
    from r2ec_fast.kernels import token_logp as kern

    hidden, weight, targets = make_case(3, 10, 8, seed=16)
    tgt = torch.where(targets == -100, -1, targets)
    _, _, stats = kern.token_logp_forward(hidden, weight, tgt, None, 1.0, False)
    with pytest.raises(ValueError, match="design='tiled'"):
        kern.token_logp_backward(hidden, weight, tgt, stats, torch.ones(3), None, None, 1.0,
                                 True, True, design="tiled")


@pytest.mark.parametrize("h_dtype,w_dtype", [(F32, BF16), (torch.float16, torch.float16),
                                             (BF16, torch.float16)], ids=str)
def test_triton_mixed_dtypes_and_strided_inputs(h_dtype, w_dtype):
    """fp32 hidden against a 16-bit head (exact fp32 dots), fp16, a bf16/fp16 mix; hidden and
    weight both non-contiguous."""
    hidden, weight, targets = make_case(19, 45, 40, seed=16)
    hidden = hidden.to(h_dtype).T.contiguous().T  # column-major [T, d]
    weight = torch.cat([weight, weight], 1).to(w_dtype)[:, ::2]  # stride 2 along d
    tol = TOLERANCE[torch.float32 if F32 in (h_dtype, w_dtype) else BF16]
    _, _, grad_h, grad_w = assert_matches_float64(hidden, weight, targets, 30.0, 1.2, tol, 17,
                                                  backend="triton")
    assert grad_h.dtype == h_dtype and grad_w.dtype == w_dtype


@pytest.mark.gpu
@pytest.mark.parametrize("design", ["chunked", "fused"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("n_tokens", [37, 700])
def test_gpu_triton_matches_float64(monkeypatch, dtype, n_tokens, design):
    """On a real GPU: compiled kernels at Gemma-2's d and softcap, a vocabulary that is not a
    multiple of any block, short (split vocabulary) and long (token blocks) sequences; the
    chunked backward over several dZ chunks."""
    from r2ec_fast.kernels import token_logp as kern

    monkeypatch.setattr(kern, "BACKWARD", design)
    monkeypatch.setattr(kern, "DZ_BUDGET_BYTES", n_tokens * 8192 * 2)  # 7 chunks
    hidden, weight, targets = make_case(n_tokens, 50021, 2304, dtype, seed=n_tokens, peaked=True)
    dev = torch.device("cuda")
    assert_matches_float64(hidden.to(dev), weight.to(dev), targets.to(dev), 30.0, 0.9,
                           TOLERANCE[dtype], 18, backend="triton")


@pytest.mark.gpu
def test_gpu_grad_filter_compiles_and_bounds(monkeypatch):
    """On a real GPU: the filtered backward's kernels and GEMMs run; an eps below every
    block's bound gives the exact backward's bits."""
    from r2ec_fast.kernels import token_logp as kern

    dev = torch.device("cuda")
    hidden, weight, targets = (t.to(dev) for t in make_case(700, 50021, 2304, BF16, seed=9))
    monkeypatch.setattr(kern, "DZ_BUDGET_BYTES", 700 * 8192 * 2)
    exact = filtered_grads(hidden, weight, targets, None)
    tiny = filtered_grads(hidden, weight, targets, 1e-300)
    assert kern.last_filter["kept"] == kern.last_filter["blocks"]
    assert all(torch.equal(a, b) for a, b in zip(exact[:4], tiny[:4]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_gpu_torch_backend_matches_float64(monkeypatch, dtype):
    """The torch backend on CUDA: every token in one chunk, vocabulary chunks of 1,024."""
    monkeypatch.setattr(mod, "CUDA_BLOCK_BYTES", 700 * 1024 * 4)
    hidden, weight, targets = make_case(700, 50021, 2304, dtype, seed=3, peaked=True)
    dev = torch.device("cuda")
    assert_matches_float64(hidden.to(dev), weight.to(dev), targets.to(dev), 30.0, 0.9,
                           TOLERANCE[dtype], 18, backend="torch")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_torch_backend_cuda_layout_on_cpu(monkeypatch, dtype):
    """The torch path as it runs on CUDA (one token chunk; each weight-gradient slice written
    once in the weight's dtype, no fp32 [Vocab, d] buffer), here on the CPU's fp32 operands:
    vocabulary chunks of 7 against Vocab = 61."""
    monkeypatch.setattr(mod, "_blocks", lambda n_tokens, vocab, device: (n_tokens, 7))
    hidden, weight, targets = make_case(23, 61, 40, dtype, seed=5, peaked=True)
    ours = assert_matches_float64(hidden, weight, targets, 30.0, 0.9, TOLERANCE[dtype], 6,
                                  backend="torch")
    assert ours[3].dtype == dtype and ours[2].dtype == dtype


def test_cuda_blocks_fit_the_budget():
    cuda = torch.device("cuda")
    assert mod._blocks(8192, 256000, cuda) == (8192, 4096)  # 128 MiB of fp32 logits
    assert mod._blocks(3, 100, cuda) == (3, 100)
    assert mod._blocks(10 ** 6, 256000, cuda) == (10 ** 6, mod.CUDA_CHUNK_MULTIPLE)
    assert mod._blocks(8192, 256000, torch.device("cpu")) == (512, 2048)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_peaked_rows_over_many_vocabulary_splits(monkeypatch, backend, dtype):
    """Regression for the GPU test above at T = 37: an H200's 132 SMs split a short sequence's
    vocabulary hundreds of ways, and logp and entropy taken as differences of absolute lse and
    E_p[z] (~30 under the softcap) lost all the digits of a peaked row's ~1e-6. Here the
    interpreter gets the H200's SM count (Vocab = 1021: 32 tiles of 32, one per split), the
    torch path vocabulary blocks of 32 rows."""
    from r2ec_fast.kernels import _common

    monkeypatch.setattr(_common, "_num_sms", lambda device: 132)  # read by _splits
    monkeypatch.setattr(mod, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(mod, "BLOCK_ELEMS", 16 * 32)
    hidden, weight, targets = make_case(37, 1021, 64, dtype, seed=37, peaked=True)
    ours = assert_matches_float64(hidden, weight, targets, 30.0, 0.9, TOLERANCE[dtype], 18,
                                  backend=backend)
    assert (ours[1][targets != -100] < 1e-3).all()  # peaked rows indeed
    assert ours[0][1] == 0 and ours[1][1] == 0 and (ours[2][1] == 0).all()  # ignored target


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_infinite_hidden_entry_under_softcap_is_finite(small_blocks, backend, bad):
    """tanh caps an infinite logit, so the row's logp and entropy are finite in float64; the
    kernel once took NaN entropy from its vocabulary tile's padding (0 x inf past V)."""
    hidden, weight, targets = make_case(6, 40, 8, seed=3)
    hidden[2, 5] = bad
    ours = linear_log_probs(hidden, weight, targets, 5.0, 1.0, return_entropy=True,
                            backend=backend)
    ref = linear_log_probs_reference(hidden.double(), weight.double(), targets, 5.0, 1.0,
                                     return_entropy=True)
    for name, a, r in zip(("logp", "entropy"), ours, ref):
        assert torch.isfinite(r).all() and torch.isfinite(a).all(), (name, a.tolist())
        assert rel_error(a, r) <= TOLERANCE[F32], (name, a.tolist(), r.tolist())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_traces_the_op(backend, monkeypatch):
    """Under torch.compile the passes are the custom ops r2ec_fast::linear_log_probs(_backward);
    results and gradients equal the eager ones."""
    hidden, weight, targets = make_case(13, 50, 16, seed=19)
    calls = []
    real = mod._forward_impl
    monkeypatch.setattr(mod, "_forward_impl", lambda *a: calls.append(a[7]) or real(*a))  # backend

    def step(h, w):
        lp, ent = linear_log_probs(h, w, targets, 30.0, 0.8, return_entropy=True,
                                   backend=backend)
        return (lp * 2).sum() + ent.sum()

    outs = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        outs.append((loss, h.grad, w.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert calls == [backend, backend]  # once eager, once inside the compiled graph's op


@pytest.fixture
def filter_blocks(monkeypatch):
    """The filtered backward on small shapes: dZ chunks of 64 columns (two interpreter tiles;
    Vocab = 300 gives 5 chunks, the last one partial), blocks of 8 tokens (T = 37: 5)."""
    from r2ec_fast.kernels import token_logp as kern

    monkeypatch.setattr(kern, "CHUNK_MULTIPLE", 32)
    monkeypatch.setattr(kern, "DZ_BUDGET_BYTES", 37 * 64 * 4)
    monkeypatch.setattr(kern, "FILTER_ROWS", 8)
    return kern


def filtered_grads(hidden, weight, targets, eps, entropy=True):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    g = torch.Generator().manual_seed(21)
    g_logp, g_ent = (torch.randn(hidden.shape[0], generator=g).to(hidden.device)
                     for _ in range(2))
    lp, ent = linear_log_probs(h, w, targets, 30.0, 0.8, return_entropy=True, backend="triton",
                               grad_filter=eps)
    ((lp * g_logp).sum() + ((ent * g_ent).sum() if entropy else 0)).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad, (g_logp, g_ent)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_grad_filter_skips_blocks_with_a_bounded_error(filter_blocks, dtype):
    """Peaked rows (each token's target far above the rest): at eps = 1e-3 some (token block,
    chunk) blocks are skipped, never a block holding a token's target; the forward is
    unchanged and the gradients stay within eps-sized error of float64; reruns are
    bit-identical."""
    kern = filter_blocks
    hidden, weight, _ = make_case(37, 300, 24, F32, seed=22)
    targets = torch.arange(37)  # as real text's frequent tokens: in the first chunk
    targets[1] = -100
    weight[:37] = 4 * hidden  # every token's own row far above the rest
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    kern.DZ_BUDGET_BYTES = 37 * 64 * (4 if dtype == F32 else 2)
    exact = filtered_grads(hidden, weight, targets, None)
    first = filtered_grads(hidden, weight, targets, 1e-3)
    assert 0 < kern.last_filter["kept"] < kern.last_filter["blocks"] == 25, kern.last_filter
    again = filtered_grads(hidden, weight, targets, 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(first[:4], again[:4]))
    assert torch.equal(first[0], exact[0]) and torch.equal(first[1], exact[1])
    ref = reference_grads(hidden, weight, targets, 30.0, 0.8, *exact[4])
    assert rel_error(exact[2], ref[2]) <= TOLERANCE[dtype]
    assert rel_error(exact[3], ref[3]) <= TOLERANCE[dtype]
    # the dropped part of dL/dx[t, :] has an l1 norm of at most (chunks x eps) of mass times
    # (|g_logp| + |g_ent| |z - E_p z|) / temperature, |z - E_p z| <= 2 softcap / temperature
    g_logp, g_ent = (g.double().abs().cpu() for g in exact[4])
    n_chunks, z_span = 5, 2 * 30.0 / 0.8
    l1 = n_chunks * 1e-3 * (g_logp + g_ent * z_span) / 0.8  # [T]
    w_max = weight.double().norm(dim=1).max()
    err_h = (first[2].double() - ref[2]).norm(dim=1)
    own_h = (exact[2].double() - ref[2]).norm(dim=1)
    assert (err_h <= l1 * w_max + own_h + 1e-6).all(), (err_h - l1 * w_max - own_h).max()
    err_w = (first[3].double() - ref[3]).norm()
    own_w = (exact[3].double() - ref[3]).norm()
    assert err_w <= (l1 * hidden.double().norm(dim=1)).sum() + own_w + 1e-6
    assert (first[2] != exact[2]).any()  # something was dropped


def test_grad_filter_below_every_mass_is_the_exact_backward(filter_blocks):
    """An eps below every block's bound keeps every block: the same bits as grad_filter=None."""
    kern = filter_blocks
    hidden, weight, targets = make_case(37, 300, 24, seed=23)
    exact = filtered_grads(hidden, weight, targets, None)
    tiny = filtered_grads(hidden, weight, targets, 1e-300)
    assert kern.last_filter["kept"] == kern.last_filter["blocks"]
    assert all(torch.equal(a, b) for a, b in zip(exact[:4], tiny[:4]))


def test_grad_filter_is_checked():
    hidden, weight, targets = make_case(4, 20, 8, seed=24)
    for bad in (0, 1.5, True, "1e-3"):
        with pytest.raises(ValueError, match="grad_filter must be"):
            linear_log_probs(hidden, weight, targets, backend="triton", grad_filter=bad)
    with pytest.raises(ValueError, match="backend='torch' computes the exact gradient"):
        linear_log_probs(hidden, weight, targets, backend="torch", grad_filter=1e-3)

"""RMSNorm forward: the Triton kernel (interpreter here) against float64 and plain PyTorch; the
torch path against HF's own norm modules bit for bit; the rollout's module patching."""
import pytest
import torch

from r2ec_fast.ops.rms_norm import (KNOWN_NORMS, fused_rms_norms, rms_norm,
                                    rms_norm_reference)
from r2ec_fast.testing import TOLERANCE, assert_three_way, poisoned_empty

F32, BF16 = torch.float32, torch.bfloat16
SHAPES = [(1, 2304), (37, 123), (2, 3, 64)]  # Gemma-2's d, an odd d, a 3-d batch


def make(shape, dtype, gemma, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    x[..., 0] = 40.0  # a large entry, so the mean square is not ~1
    scale = 0.2 if gemma else 1.0  # Gemma stores w - 1 (its weights start at zero)
    w = (torch.randn(shape[-1], generator=g) * scale + (0 if gemma else 1)).to(dtype)
    return x, w


@pytest.mark.parametrize("gemma", [True, False])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_float64_and_torch(shape, dtype, gemma, monkeypatch):
    import r2ec_fast.kernels.rms_norm as kern

    monkeypatch.setattr(kern, "_empty", poisoned_empty)  # every output element is written
    x, w = make(shape, dtype, gemma)
    out = rms_norm(x, w, 1e-6, gemma, backend="triton")
    plain = rms_norm(x, w, 1e-6, gemma, backend="torch")
    assert out.dtype == plain.dtype == dtype and out.shape == x.shape
    assert_three_way(out, rms_norm_reference(x, w, 1e-6, gemma), plain, "rms_norm",
                     tol=TOLERANCE[dtype] / 10)
    if dtype == BF16:  # the same bf16 values but for rare one-ulp roundings
        assert (out != plain).float().mean() < 0.01


def hf_norms():
    """(HF norm class, gemma) for the classes of KNOWN_NORMS this transformers has."""
    import importlib

    found = []
    for name, gemma in KNOWN_NORMS.items():
        family = name[:-len("RMSNorm")].lower()
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        if hasattr(module, name):
            found.append((getattr(module, name), gemma))
    return found


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_torch_path_is_hfs_norm_bit_for_bit(dtype):
    norms = hf_norms()
    assert {cls.__name__ for cls, _ in norms} >= {"Gemma2RMSNorm", "Qwen2RMSNorm"}
    for cls, gemma in norms:
        module = cls(123, eps=1e-5).to(dtype)
        x, w = make((7, 123), dtype, gemma, seed=3)
        with torch.no_grad():
            module.weight.copy_(w)
            want = module(x)
        assert torch.equal(rms_norm(x, module.weight, 1e-5, gemma, backend="torch"), want), cls


def test_fused_rms_norms_patches_and_restores(tmp_path):
    from r2ec_fast.model.tiny import make_tiny_model
    from transformers import AutoModelForCausalLM

    make_tiny_model("gemma2", ["a b c d"] * 4, tmp_path, seed=0)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(10, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    calls = []
    import r2ec_fast.ops.rms_norm as mod

    real = mod._rms_norm
    with torch.no_grad():
        want = lm(input_ids=ids).logits
        with fused_rms_norms(lm, backend="torch") as count:
            mod._rms_norm = lambda *a: calls.append(a[-2]) or real(*a)
            try:
                got = lm(input_ids=ids).logits
            finally:
                mod._rms_norm = real
        again = lm(input_ids=ids).logits
    n_layers = lm.config.num_hidden_layers
    assert count == 4 * n_layers + 1  # Gemma-2: four norms per layer and the final one
    assert len(calls) == count and set(calls) == {True}
    assert torch.equal(got, want) and torch.equal(again, want)
    assert not any("forward" in vars(m) for m in lm.modules())  # restored


def test_gradients_take_the_torch_path():
    x, w = make((3, 64), F32, True)
    x.requires_grad_()
    y = rms_norm(x, w, 1e-6, True)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_inputs():
    x, w = make((3, 64), F32, True)
    with pytest.raises(ValueError, match="must be \\[D\\]"):
        rms_norm(x, w[:10], 1e-6, True)
    with pytest.raises(ValueError, match="floating point"):
        rms_norm(x.long(), w, 1e-6, True)
    with pytest.raises(ValueError, match="not a backend"):
        rms_norm(x, w, 1e-6, True, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", [True, False])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_gpu_compiled_kernel(dtype, gemma):
    """On a real GPU: the compiled kernel at a decode step's shape (64 rows of Gemma-2's d) and
    a prefill's (3,000 rows)."""
    for rows in (64, 3000):
        x, w = make((rows, 2304), dtype, gemma, seed=rows)
        x, w = x.cuda(), w.cuda()
        out = rms_norm(x, w, 1e-6, gemma, backend="triton")
        plain = rms_norm(x, w, 1e-6, gemma, backend="torch")
        assert_three_way(out, rms_norm_reference(x, w, 1e-6, gemma), plain, "rms_norm",
                         tol=TOLERANCE[dtype] / 10)
        if dtype == BF16:  # fp32: last-bit differences in 31 % of the entries (H200), as the
            assert (out != plain).float().mean() < 0.01  # sum order and sqrt differ

"""Error measures and assertions shared by the tests and the benchmarks (STYLE.md).

- ``rel_error``: relative Frobenius error against a float64 reference; infinities must sit in
  the same places with the same sign; NaN never passes (it gives an infinite error).
- ``assert_three_way``: a kernel's error vs float64 must be at most ``factor`` times the
  same-dtype plain-PyTorch error plus ``tol`` (Cut Cross-Entropy's rule).
- ``assert_close_verbose``: elementwise check that names the mismatch count, the first bad
  indices and any NaN/Inf.
"""
from __future__ import annotations

import math

import torch

# relative Frobenius tolerances of DESIGN §3, by input dtype
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the finite entries of ``ref``, in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    if torch.isnan(out).any() and not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return math.inf
    inf_ref, inf_out = torch.isinf(ref), torch.isinf(out)
    if not torch.equal(inf_ref, inf_out) or not torch.equal(out[inf_ref], ref[inf_ref]):
        return math.inf
    finite = torch.isfinite(ref)
    diff = (out[finite] - ref[finite]).norm().item()
    scale = ref[finite].norm().item()
    return diff / scale if scale > 0 else diff


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor,
                      name: str, limit: int = 5) -> str:
    idx = bad.nonzero()[:limit].tolist()
    pairs = ", ".join(f"{tuple(i)}: {actual[tuple(i)].item()!r} vs {expected[tuple(i)].item()!r}"
                      for i in idx)
    return (f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
            f"(NaN in actual: {int(torch.isnan(actual).sum())}, Inf in actual: "
            f"{int(torch.isinf(actual).sum())}); first: {pairs}")


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 0.0,
                         atol: float = 0.0, name: str = "tensor") -> None:
    """Elementwise |a - e| <= atol + rtol |e|; equal infinities pass, NaN fails unless both."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu().to(actual.dtype if actual.is_floating_point() else expected.dtype)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if not actual.is_floating_point():
        bad = actual != expected
    else:
        a, e = actual.double(), expected.double()
        same = (a == e) | (torch.isnan(a) & torch.isnan(e))
        bad = ~same & ~((a - e).abs() <= atol + rtol * e.abs())
    if bad.any():
        raise AssertionError(describe_mismatch(actual, expected, bad, name))


def assert_three_way(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor | None,
                     name: str, factor: float = 2.0, tol: float = 1e-6) -> float:
    """Error of ``out`` vs ``ref64`` within ``factor`` x the error of ``plain`` (the same-dtype
    plain-PyTorch result) plus ``tol``; returns the error."""
    err = rel_error(out, ref64)
    bound = tol + (factor * rel_error(plain, ref64) if plain is not None else 0.0)
    if not err <= bound:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {bound:.3e}")
    return err


def poisoned_empty(shape, dtype, device) -> torch.Tensor:
    """A stand-in for the kernels' `_empty` allocation hook: NaN for float buffers, the
    dtype's most negative value for integer ones, so that any element a kernel fails to
    write shows up in the comparison."""
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


def train_config(values: dict, **dotted):
    """A TrainConfig from nested `values` with dotted overrides applied (tests' small runs:
    `train_config(base, **{"rollout.engine": "hf"})`); `values` is not modified."""
    import copy

    from r2ec_fast.train.config import TrainConfig

    values = copy.deepcopy(values)
    for key, value in dotted.items():
        node = values
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return TrainConfig.from_dict(values)

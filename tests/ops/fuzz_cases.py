"""The machinery of tests/ops/test_fuzz.py: a case budget per (op, backend), hypothesis settings
that cannot flake, one-line reproducers and their replay, and small input helpers.

Every fuzz case is a plain dict of JSON values (shapes, dtype names, flags and a `seed` for
torch.Generator); the tensors are built from it, so a failure names the whole case in one line
and the command that reruns exactly that case:

    R2EC_FUZZ_CASE='<key>=<json>' .venv/bin/python -m pytest \
        'tests/ops/test_fuzz.py::test_fuzz[<key>]'

With R2EC_FUZZ_CASE set, the matching target runs that one case and every other target skips.
"""
from __future__ import annotations

import json
import math
import os
import shlex
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from r2ec_fast.testing import TOLERANCE, rel_error

REPLAY_ENV = "R2EC_FUZZ_CASE"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# cases run per target in this process (the budget test and each target check these)
RAN: Counter = Counter()

# hypothesis: the same cases on every run (derandomize, no example database), no timing
# health checks or deadlines (interpreter cases take up to seconds). Interpreter targets do
# not shrink a failure: hundreds of reruns of a Triton interpreter case would take minutes,
# and the reproducer line already names the failing case.
_COMMON = dict(derandomize=True, database=None, deadline=None, print_blob=False,
               suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
_FAST_PHASES = (Phase.explicit, Phase.generate, Phase.shrink)
_SLOW_PHASES = (Phase.explicit, Phase.generate)


@dataclass(frozen=True)
class Target:
    """One fuzzed (op, backend): `cases` draws a params dict, `check(params)` asserts."""

    key: str
    cases: Callable[[], st.SearchStrategy]
    check: Callable[[dict], None]
    budget: int
    slow: bool = False  # runs Triton kernels through the interpreter


def reproducer(key: str, params: dict) -> str:
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return (f"FUZZ REPRODUCER {key} seed={params.get('seed')}: {REPLAY_ENV}="
            f"{shlex.quote(f'{key}={blob}')} .venv/bin/python -m pytest "
            f"'tests/ops/test_fuzz.py::test_fuzz[{key}]' -q")


def run_case(target: Target, params: dict) -> None:
    """One case; any failure is re-raised as an AssertionError that opens with the reproducer."""
    RAN[target.key] += 1
    try:
        target.check(params)
    except Exception as exc:  # the reproducer goes first, then what went wrong
        raise AssertionError(f"{reproducer(target.key, params)}\n{type(exc).__name__}: "
                             f"{exc}") from exc


def run_target(target: Target) -> None:
    """Replay the case of R2EC_FUZZ_CASE, or run the target's whole budget of cases."""
    replay = os.environ.get(REPLAY_ENV)
    if replay:
        key, _, blob = replay.partition("=")
        if key != target.key:
            pytest.skip(f"{REPLAY_ENV} replays {key}")
        run_case(target, json.loads(blob))
        return
    before = RAN[target.key]

    @settings(max_examples=target.budget, phases=_SLOW_PHASES if target.slow else _FAST_PHASES,
              **_COMMON)
    @given(target.cases())
    def fuzz(params):
        run_case(target, params)

    fuzz()
    ran = RAN[target.key] - before
    assert ran >= target.budget, f"{target.key}: {ran} cases ran, the budget is {target.budget}"


# ----------------------------------------------------------------------------- strategies


def seeds() -> st.SearchStrategy:
    return st.integers(0, 2**31 - 1)


def dtype_names(*names: str) -> st.SearchStrategy:
    return st.sampled_from(names or tuple(DTYPES))


LAYOUTS = ("contig", "T", "step2", "rows2")


def layouts() -> st.SearchStrategy:
    return st.sampled_from(LAYOUTS)


# ----------------------------------------------------------------------------- inputs


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` with other strides, differentiably (the gradient reaches `t`):
    "T" column-major, "step2" every other element of the last dim, "rows2" every other row."""
    if layout == "contig" or t.dim() == 0:
        return t
    if layout == "T":
        return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t
    if layout == "step2":
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    if layout == "rows2":
        return torch.stack([t, torch.zeros_like(t)], dim=1).select(1, 0)
    raise ValueError(layout)


def strided_ids(ids: torch.Tensor, layout: str) -> torch.Tensor:
    """Integer ids with other strides (no autograd)."""
    if layout == "contig":
        return ids
    if layout == "T" and ids.dim() == 2:
        return ids.T.contiguous().T
    return torch.stack([ids, ids], dim=-1)[..., 0]


def tolerance(*names: str) -> float:
    """DESIGN §3's relative tolerance for the coarsest of the input dtypes."""
    return max(TOLERANCE[DTYPES[n]] for n in names)


@contextmanager
def patched(*triples):
    """Set (object, attribute, value) for the duration of the block."""
    with ExitStack() as stack:
        for obj, name, value in triples:
            old = getattr(obj, name)
            setattr(obj, name, value)
            stack.callback(setattr, obj, name, old)
        yield


# ----------------------------------------------------------------------------- errors


def scaled_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """rel_error (infinities in the same places, NaN never passes), with the reference's norm
    raised to `floor`: for score-like values the error scale is the size of the scores, not of
    a result that happens to cancel to ~0."""
    err = rel_error(out, ref)
    if not math.isfinite(err) or floor <= 0:
        return err
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(r)
    return (o[finite] - r[finite]).norm().item() / max(r[finite].norm().item(), floor)


def assert_close64(name: str, out: torch.Tensor, ref64: torch.Tensor, tol: float,
                   plain: torch.Tensor | None = None, floor: float = 0.0) -> None:
    """Error vs float64 within `tol` (DESIGN §3), or within tol + 2 x the same-dtype
    plain-PyTorch error (STYLE's three-way rule) when `plain` is given."""
    err = scaled_error(out, ref64, floor)
    bound = tol
    if plain is not None:
        plain_err = scaled_error(plain, ref64, floor)
        if math.isfinite(plain_err):
            bound += 2 * plain_err
    if not err <= bound:
        o, r = out.detach().double().cpu().flatten(), ref64.detach().double().cpu().flatten()
        bad = ~((o - r).abs() <= bound * max(r[torch.isfinite(r)].abs().max().item()
                                                if torch.isfinite(r).any() else 1.0, floor))
        first = bad.nonzero()[:3, 0].tolist()
        raise AssertionError(
            f"{name}: error {err:.3e} > bound {bound:.3e} (NaN in out: "
            f"{int(torch.isnan(o).sum())}, in ref: {int(torch.isnan(r).sum())}); first: "
            + ", ".join(f"[{i}] {o[i].item()!r} vs {r[i].item()!r}" for i in first))

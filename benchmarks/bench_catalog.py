"""Full-catalog scoring benchmark (DESIGN §4.1-4.2, §7): ours (torch, triton) vs plain PyTorch.

Two groups per shape, each measured against its own plain baseline:
- rewards: what RecPO needs per trajectory over the whole catalog with the history excluded,
  R_c (softmax probability of the target) and NDCG@1000. "plain rewards" is the reference
  trainer's recipe (`reference_trainer_rewards`: materialise N x V, mask, softmax, topk(1000));
  "torch/triton rewards" is `score_catalog` then `.target_prob()` and `.ndcg(1000)`.
- fwd+bwd: `catalog_log_prob` and its gradient w.r.t. the user rows (the item action; in
  training the item table is refreshed from detached encodings, so it gets no gradient).
  "plain fwd+bwd" is autograd through `catalog_log_prob_reference(upcast=False)`.

Formulas: bytes = V * d * element size (the table read once); flops = 2NVd for rewards, 4NVd
for fwd+bwd (scores, then the user gradient).
Inputs are random. Half the rows get a target item correlated with the user row (cosine
3/sqrt(d), three standard deviations above a random pair) so that target ranks straddle the
top-1000 boundary and the NDCG errors compare more than zeros.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import (
    catalog_log_prob,
    catalog_log_prob_reference,
    reference_trainer_rewards,
    score_catalog,
    score_catalog_reference,
)
from ..testing import rel_error
from .harness import Case, Impl, register, time_ratio_check, with_setting

TEMPERATURE = 0.02
SIMILARITY = "cosine"
HISTORY = 20  # excluded ids per row (the reference's history window), some padded with -1
NDCG_K = 1000
REF_ROWS = 16
# a float64 N x V reference bigger than this (and its temporaries, a few times more) runs on
# the first REF_ROWS rows only: every output here is row-wise, so those rows are exact
REF_FULL_LIMIT_BYTES = 1 << 30
ACCEPTANCE = (256, 128, 1_000_000, torch.float32)  # the CPU shape with memory and time targets
ACCEPT_ADDED_MIB = 64
ACCEPT_TIME_RATIO = 1.2
# the item action at scale (issue 14): triton fwd+bwd at least 1.5x plain
GPU_ACCEPTANCE = (512, 2304, 1_000_000, torch.bfloat16)
GPU_SPEEDUP = 1.5


def _shapes(device: str, mode: str) -> list[tuple[int, int, int, torch.dtype]]:
    """(N, d, V, dtype) per case. GPU: Gemma-2-2B's d = 2304, bf16 as in training."""
    if mode == "smoke":
        return [(8, 32, 2000, torch.float32)]
    if device == "cuda":  # the 1e6-item cases last: a crash or OOM there loses no other case
        ns = (64,) if mode == "quick" else (64, 512)
        vs = (10_000, 100_000) if mode == "quick" else (10_000, 100_000, 1_000_000)
        bf16 = [(n, 2304, v, torch.bfloat16) for v in vs for n in ns]
        return bf16[:-len(ns)] + [(64, 2304, 100_000, torch.float32)] + bf16[-len(ns):]
    quick = [(64, 256, v, torch.float32) for v in (10_000, 100_000)]
    return quick if mode == "quick" else quick + [ACCEPTANCE]


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, seed: int,
                device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    user = torch.randn(n, d, generator=g, device=device, dtype=dtype)  # [N, d]
    items = torch.randn(v, d, generator=g, device=device, dtype=dtype)  # [V, d]
    target = torch.randint(0, v, (n,), generator=g, device=device)  # [N]
    planted = n // 2
    cos = min(0.9, 3.0 / math.sqrt(d))
    noise = torch.randn(planted, d, generator=g, device=device)
    rows = (cos * F.normalize(user[:planted].float(), dim=-1)
            + math.sqrt(1 - cos * cos) * F.normalize(noise, dim=-1))
    items[target[:planted]] = rows.to(dtype)
    history = torch.randint(0, v, (n, HISTORY), generator=g, device=device)
    length = torch.randint(HISTORY // 2, HISTORY + 1, (n, 1), generator=g, device=device)
    exclude = history.masked_fill(torch.arange(HISTORY, device=device) >= length, -1)  # [N, L]
    grad_w = torch.rand(n, generator=g, device=device) + 0.5  # upstream gradient of log p
    return {"user": user, "items": items, "target": target, "exclude": exclude,
            "grad_w": grad_w}


# ----------------------------------------------------------------------------- implementations


def _plain_rewards(k: int):
    def run(x):
        r = reference_trainer_rewards(x["user"], x["items"], x["target"], x["exclude"],
                                      TEMPERATURE, SIMILARITY, k=k)
        return {"rc": r["rc"], "ndcg": r["ndcg"]}
    return run


def _our_rewards(backend: str, k: int):
    def run(x):
        # mask_excluded_target: the reference trainer's rule, so both sides compute one thing
        s = score_catalog(x["user"], x["items"], x["target"], x["exclude"], TEMPERATURE,
                          SIMILARITY, mask_excluded_target=True, backend=backend)
        return {"lse": s.lse, "target_score": s.target_score, "rc": s.target_prob(),
                "ndcg": s.ndcg(k)}
    return run


def _fwd_bwd(log_prob):
    def run(x):
        user = x["user"].detach().requires_grad_(True)
        logp = log_prob(user, x["items"], x["target"], x["exclude"])  # [N]
        (logp.float() * x["grad_w"]).sum().backward()
        return {"logp": logp.detach(), "grad_user": user.grad}
    return run


def _plain_log_prob(user, items, target, exclude):
    return catalog_log_prob_reference(user, items, target, exclude, TEMPERATURE, SIMILARITY,
                                      upcast=False)


def _our_log_prob(backend: str):
    def log_prob(user, items, target, exclude):
        return catalog_log_prob(user, items, target, exclude, TEMPERATURE, SIMILARITY,
                                backend=backend)
    return log_prob


def _triton_design(design: str):
    """fwd+bwd by the Triton backend with the given backward design (kernels/catalog.py's
    BACKWARD: "chunked", the default, or "fused"), set for the call only."""
    return with_setting("r2ec_fast.kernels.catalog", "BACKWARD", design,
                        _fwd_bwd(_our_log_prob("triton")))


def _impls(n: int, d: int, v: int, k: int) -> list[Impl]:
    fwd, fwd_bwd = 2.0 * n * v * d, 4.0 * n * v * d
    about_ours = "score_catalog(backend={!r}) + target_prob() + ndcg({})"
    about_grad = "catalog_log_prob(backend={!r}) forward + grad w.r.t. user rows"
    return [
        Impl("plain rewards", _plain_rewards(k), fwd,
             about=f"reference_trainer_rewards: N x V scores, mask, softmax, topk({k})"),
        Impl("torch rewards", _our_rewards("torch", k), fwd, baseline="plain rewards",
             about=about_ours.format("torch", k)),
        Impl("triton rewards", _our_rewards("triton", k), fwd, baseline="plain rewards",
             needs_cuda=True, about=about_ours.format("triton", k)),
        Impl("plain fwd+bwd", _fwd_bwd(_plain_log_prob), fwd_bwd,
             about="autograd through catalog_log_prob_reference(upcast=False)"),
        Impl("torch fwd+bwd", _fwd_bwd(_our_log_prob("torch")), fwd_bwd,
             baseline="plain fwd+bwd", about=about_grad.format("torch")),
        Impl("triton fwd+bwd", _triton_design("chunked"), fwd_bwd,
             baseline="plain fwd+bwd", needs_cuda=True,
             about=about_grad.format("triton") + " (the default catalog-chunked backward)"),
        Impl("triton fwd+bwd fused", _triton_design("fused"), fwd_bwd,
             baseline="plain fwd+bwd", needs_cuda=True,
             about="the same with the former per-output-tile Triton backward"),
    ]


# ----------------------------------------------------------------------------- reference and errors


def _reference(k: int):
    def run(x):
        n, v = x["user"].shape[0], x["items"].shape[0]
        rows = n if n * v * 8 <= REF_FULL_LIMIT_BYTES else min(n, REF_ROWS)
        user, target, exclude, grad_w = (x[f][:rows] for f in ("user", "target", "exclude",
                                                                 "grad_w"))
        s = score_catalog_reference(user, x["items"], target, exclude, TEMPERATURE, SIMILARITY,
                                    mask_excluded_target=True, upcast=True)
        ref = {"lse": s.lse, "target_score": s.target_score, "rc": s.target_prob(),
               "ndcg": s.ndcg(k)}
        del s
        user64 = user.detach().double().requires_grad_(True)
        logp = catalog_log_prob_reference(user64, x["items"], target, exclude, TEMPERATURE,
                                          SIMILARITY, upcast=True)
        (logp * grad_w.double()).sum().backward()
        ref.update(logp=logp.detach(), grad_user=user64.grad)
        ref = {name: t.cpu() for name, t in ref.items()}
        note = "the float64 reference"
        if rows < n:
            note += (f" on the first {rows} of {n} rows (all {n} would need an N x V float64 "
                     f"matrix of {n * v * 8 / 2**30:.1f} GiB)")
        return ref, {"dtype": "float64", "rows": rows, "subset": rows < n, "note": note}
    return run


def _errors(out: dict, ref: dict) -> dict[str, float]:
    """Relative error of every output field the reference has (plain rewards: rc and ndcg)."""
    rows = ref["lse"].shape[0]
    return {name: rel_error(out[name][:rows], ref[name]) for name in out if name in ref}


def _first_call_note(res: dict) -> str:
    first = res.get("memory", {}).get("first_call_added_mib")
    return "" if first is None else f" per call; {first:.1f} MiB on a fresh process's first call"


def _acceptance(results: dict[str, dict]) -> list[dict]:
    ours, plain = results.get("torch rewards", {}), results.get("plain rewards", {})
    added = ours.get("memory", {}).get("added_mib")
    plain_added = plain.get("memory", {}).get("added_mib")
    plain_txt = f"{plain_added:.0f} MiB" if plain_added is not None else "not measured"
    return [
        {"name": f"torch rewards adds <= {ACCEPT_ADDED_MIB} MiB beyond its inputs",
         "passed": None if added is None else added <= ACCEPT_ADDED_MIB,
         "value": (f"{added:.1f} MiB" if added is not None else "not measured")
         + _first_call_note(ours) + f" (plain rewards adds {plain_txt})"},
        time_ratio_check(results, "torch rewards", "plain rewards", ACCEPT_TIME_RATIO),
    ]


def _gpu_acceptance(results: dict[str, dict]) -> list[dict]:
    return [time_ratio_check(results, "triton fwd+bwd", "plain fwd+bwd", round(1 / GPU_SPEEDUP, 3)),
            time_ratio_check(results, "triton fwd+bwd", "triton fwd+bwd fused", 1.0)]


def _case(n: int, d: int, v: int, dtype: torch.dtype, seed: int) -> Case:
    k = min(NDCG_K, v)
    return Case(
        key=f"N={n} d={d} V={v} L={HISTORY} {str(dtype).replace('torch.', '')}",
        shape={"N": n, "d": d, "V": v, "L": HISTORY, "ndcg_k": k},
        dtype=dtype,
        bytes_read=v * d * torch.empty(0, dtype=dtype).element_size(),
        make_inputs=lambda device: make_inputs(n, d, v, dtype, seed, device),
        reference=_reference(k),
        errors=_errors,
        impls=_impls(n, d, v, k),
        checks=(_acceptance if (n, d, v, dtype) == ACCEPTANCE else
                _gpu_acceptance if (n, d, v, dtype) == GPU_ACCEPTANCE else None),
    )


@register("catalog")
def catalog_cases(device: str, mode: str) -> list[Case]:
    return [_case(n, d, v, dtype, seed=1000 + i)
            for i, (n, d, v, dtype) in enumerate(_shapes(device, mode))]

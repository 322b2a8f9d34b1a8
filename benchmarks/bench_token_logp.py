"""Fused token log-probability benchmark (DESIGN §4.3, §7): ours vs plain PyTorch and peers.

Per shape, two groups, each against its own plain baseline:
- fwd: log-probabilities of the sampled tokens. "plain fwd" materialises the logits, applies
  softcap and temperature, log_softmax, gather (`linear_log_probs_reference(upcast=False)`).
- fwd+bwd: the same with the gradient of sum(g * logp) w.r.t. hidden and weight (random
  per-token g, the RL case).
Peers where installed: `torch.nn.functional.linear_cross_entropy` (reduction "none"; it has
no softcap or temperature, so with a softcap it computes another function and gets no error
column). Liger-Kernel and Cut Cross-Entropy rows and our Triton rows come with the Triton
kernels (issue 3).

Formulas: bytes = Vocab * d * element size (the weight read once); flops = 2TVd for fwd,
6TVd for fwd+bwd (logits, grad hidden, grad weight; ours recomputes the logits: 8TVd of work).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import linear_log_probs, linear_log_probs_reference
from ..testing import rel_error
from .harness import Case, Impl, register, time_ratio_check

REF_FULL_LIMIT_BYTES = 1 << 30  # a bigger float64 T x V reference runs on REF_ROWS tokens
REF_ROWS = 64
ACCEPTANCE = (4096, 256, 65536, 30.0, torch.float32)  # CPU shape with memory and time targets
ACCEPT_MEMORY_FRACTION = 1 / 8
ACCEPT_TIME_RATIO = 1.5
GEMMA2, QWEN25 = (2304, 256000, 30.0), (2048, 151936, None)  # d, vocabulary, softcap


def _shapes(device: str, mode: str):
    """(T, d, V, softcap, dtype) per case."""
    if mode == "smoke":
        return [(16, 32, 500, 30.0, torch.float32)]
    if device == "cuda":
        ts = (1024,) if mode == "quick" else (1024, 8192)
        return [(t, d, v, cap, torch.bfloat16) for (d, v, cap) in (GEMMA2, QWEN25) for t in ts]
    quick = [(512, 256, 16384, 30.0, torch.float32)]
    return quick if mode == "quick" else quick + [ACCEPTANCE]


def make_inputs(t, d, v, dtype, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(t, d, generator=g, device=device) / d ** 0.25  # [T, d]
    weight = torch.randn(v, d, generator=g, device=device) / d ** 0.25  # [V, d]
    targets = torch.randint(0, v, (t,), generator=g, device=device)  # [T]
    grad = torch.randn(t, generator=g, device=device)  # per-token upstream gradient
    return {"hidden": hidden.to(dtype), "weight": weight.to(dtype), "targets": targets,
            "grad": grad}


def _ours(softcap, backward: bool):
    def run(x):
        with torch.set_grad_enabled(backward):
            h = x["hidden"].detach().requires_grad_(backward)
            w = x["weight"].detach().requires_grad_(backward)
            logp = linear_log_probs(h, w, x["targets"], softcap, backend="torch")
            if not backward:
                return {"logp": logp}
            (logp * x["grad"]).sum().backward()
        return {"logp": logp.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}
    return run


def _plain(softcap, backward: bool):
    def run(x):
        with torch.set_grad_enabled(backward):
            h = x["hidden"].detach().requires_grad_(backward)
            w = x["weight"].detach().requires_grad_(backward)
            logp = linear_log_probs_reference(h, w, x["targets"], softcap, upcast=False)
            if not backward:
                return {"logp": logp}
            (logp.float() * x["grad"]).sum().backward()
        return {"logp": logp.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}
    return run


def _torch_linear_ce(softcap, backward: bool):
    key = "logp" if softcap is None else "logp_uncapped"  # no error column with a softcap

    def run(x):
        with torch.set_grad_enabled(backward):
            h = x["hidden"].detach().requires_grad_(backward)
            w = x["weight"].detach().requires_grad_(backward)
            logp = -F.linear_cross_entropy(h, w, x["targets"], reduction="none")
            if not backward:
                return {key: logp}
            (logp.float() * x["grad"]).sum().backward()
        out = {key: logp.detach()}
        if softcap is None:
            out.update(grad_hidden=h.grad, grad_weight=w.grad)
        return out
    return run


def _impls(t, d, v, softcap):
    fwd, fwd_bwd = 2.0 * t * v * d, 6.0 * t * v * d
    impls = [
        Impl("plain fwd", _plain(softcap, False), fwd,
             about="logits, softcap/temperature, log_softmax, gather"),
        Impl("torch fwd", _ours(softcap, False), fwd, baseline="plain fwd",
             about="linear_log_probs(backend='torch')"),
        Impl("plain fwd+bwd", _plain(softcap, True), fwd_bwd, about="autograd through plain"),
        Impl("torch fwd+bwd", _ours(softcap, True), fwd_bwd, baseline="plain fwd+bwd",
             about="linear_log_probs(backend='torch') + grads of hidden and weight"),
    ]
    if hasattr(F, "linear_cross_entropy"):
        about = "torch.nn.functional.linear_cross_entropy(reduction='none')" + (
            "" if softcap is None else ", which has no softcap: another function, no error")
        impls += [Impl("F.linear_ce fwd", _torch_linear_ce(softcap, False), fwd,
                       baseline="plain fwd", about=about),
                  Impl("F.linear_ce fwd+bwd", _torch_linear_ce(softcap, True), fwd_bwd,
                       baseline="plain fwd+bwd", about=about)]
    return impls


def _reference(softcap):
    def run(x):
        t, v = x["hidden"].shape[0], x["weight"].shape[0]
        rows = t if t * v * 8 <= REF_FULL_LIMIT_BYTES else min(t, REF_ROWS)
        h = x["hidden"][:rows].double().requires_grad_(True)
        w = x["weight"].double().requires_grad_(True)
        logp = linear_log_probs_reference(h, w, x["targets"][:rows], softcap)
        (logp * x["grad"][:rows].double()).sum().backward()
        ref = {"logp": logp.detach(), "grad_hidden": h.grad}
        if rows == t:  # the weight gradient sums over every token
            ref["grad_weight"] = w.grad
        note = "the float64 reference"
        if rows < t:
            note += (f" on the first {rows} of {t} tokens (all would need a T x V float64 "
                     f"matrix of {t * v * 8 / 2**30:.1f} GiB); no weight-gradient error")
        return ({k: r.cpu() for k, r in ref.items()},
                {"dtype": "float64", "rows": rows, "subset": rows < t, "note": note})
    return run


def _errors(out: dict, ref: dict) -> dict[str, float]:
    rows = ref["logp"].shape[0]
    errs = {}
    for name in out:
        if name in ref:
            got = out[name] if name == "grad_weight" else out[name][:rows]
            errs[name] = rel_error(got, ref[name])
    return errs


def _acceptance(results: dict[str, dict]) -> list[dict]:
    peak = results.get("torch fwd+bwd", {}).get("memory", {}).get("added_mib")
    plain_peak = results.get("plain fwd+bwd", {}).get("memory", {}).get("added_mib")
    frac = peak / plain_peak if peak is not None and plain_peak else None
    return [
        {"name": f"torch fwd+bwd peak memory <= {ACCEPT_MEMORY_FRACTION:.3f} of plain's",
         "passed": None if frac is None else frac <= ACCEPT_MEMORY_FRACTION,
         "value": "not measured" if frac is None else
         f"{peak:.0f} MiB vs {plain_peak:.0f} MiB = {frac:.3f}"},
        time_ratio_check(results, "torch fwd+bwd", "plain fwd+bwd", ACCEPT_TIME_RATIO),
    ]


def _case(t, d, v, softcap, dtype, seed) -> Case:
    return Case(
        key=f"T={t} d={d} V={v} softcap={softcap} {str(dtype).replace('torch.', '')}",
        shape={"T": t, "d": d, "V": v, "softcap": softcap or 0},
        dtype=dtype,
        bytes_read=v * d * torch.empty(0, dtype=dtype).element_size(),
        make_inputs=lambda device: make_inputs(t, d, v, dtype, seed, device),
        reference=_reference(softcap),
        errors=_errors,
        impls=_impls(t, d, v, softcap),
        checks=_acceptance if (t, d, v, softcap, dtype) == ACCEPTANCE else None,
    )


@register("token_logp")
def token_logp_cases(device: str, mode: str) -> list[Case]:
    return [_case(*shape, seed=2000 + i) for i, shape in enumerate(_shapes(device, mode))]

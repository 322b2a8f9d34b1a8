"""Fused token log-probability benchmark (DESIGN §4.3, §7): ours vs plain PyTorch and peers.

Per shape, two groups, each against its own plain baseline:
- fwd: log-probabilities of the sampled tokens. "plain fwd" materialises the logits, applies
  softcap and temperature, log_softmax, gather (`linear_log_probs_reference(upcast=False)`).
- fwd+bwd: the same with the gradient of sum(g * logp) w.r.t. hidden and weight (random
  per-token g, the RL case).
Ours: `linear_log_probs` with backend "torch" everywhere and "triton" on CUDA.
Peers where installed (all at temperature 1, which is what the cases use):
- `torch.nn.functional.linear_cross_entropy` (reduction "none"): no softcap, so with a softcap
  it computes another function and gets no error column;
- Liger-Kernel's fused linear cross-entropy (reduction "none", softcap) and its chunked GRPO
  loss (a loss, not log-probabilities: time and memory only);
- Cut Cross-Entropy's `linear_cross_entropy` (reduction "none", softcap).
On CUDA a "GEMM" row times hidden @ weight.T alone: the four-GEMM floor of fwd+bwd (logits,
their recomputation, grad hidden, grad weight) is 4x its time.

Formulas: bytes = Vocab * d * element size (the weight read once); flops = 2TVd for fwd,
6TVd for fwd+bwd (logits, grad hidden, grad weight; ours recomputes the logits: 8TVd of work).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import linear_log_probs, linear_log_probs_reference
from ..testing import rel_error
from .harness import Case, Impl, register, time_ratio_check, with_setting

REF_FULL_LIMIT_BYTES = 1 << 30  # a bigger float64 T x V reference runs on REF_ROWS tokens
REF_ROWS = 64
ACCEPTANCE = (4096, 256, 65536, 30.0, torch.float32)  # CPU shape with memory and time targets
ACCEPT_MEMORY_FRACTION = 1 / 8
ACCEPT_TIME_RATIO = 1.5
GPU_ACCEPTANCE = (8192, 2304, 256000, 30.0, torch.bfloat16)  # Gemma-2-2B, T = 8192
GPU_MEMORY_OVER_GRADS = 1.2  # peak beyond inputs / bytes of grad hidden + grad weight
GRAD_FILTER = 1e-5  # the filtered row's eps
GPU_TIME_OVER_FLOOR = 1.25  # fwd+bwd time / four GEMMs at the measured rate (issue 14)
GEMMA2, QWEN25 = (2304, 256000, 30.0), (2048, 151936, None)  # d, vocabulary, softcap


def _shapes(device: str, mode: str):
    """(T, d, V, softcap, dtype) per case."""
    if mode == "smoke":
        return [(16, 32, 500, 30.0, torch.float32)]
    if device == "cuda":
        ts = (1024,) if mode == "quick" else (1024, 8192)
        shapes = [(t, d, v, cap, torch.bfloat16) for (d, v, cap) in (GEMMA2, QWEN25) for t in ts]
        # the acceptance case (last: an OOM there loses no other case) is in every GPU mode
        return [s for s in shapes if s != GPU_ACCEPTANCE] + [GPU_ACCEPTANCE]
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


def _logp_run(logp_fn, backward: bool, key: str = "logp", grads: bool = True):
    """An implementation row: log-probabilities `logp_fn(hidden, weight, targets)` and, with
    `backward`, the gradients of sum(g * logp) w.r.t. hidden and weight (per-token g)."""
    def run(x):
        with torch.set_grad_enabled(backward):
            h = x["hidden"].detach().requires_grad_(backward)
            w = x["weight"].detach().requires_grad_(backward)
            logp = logp_fn(h, w, x["targets"])
            if not backward:
                return {key: logp}
            (logp.float() * x["grad"]).sum().backward()
        out = {key: logp.detach()}
        if grads:
            out.update(grad_hidden=h.grad, grad_weight=w.grad)
        return out
    return run


def _ours(backend, softcap, backward: bool, grad_filter=None):
    return _logp_run(lambda h, w, t: linear_log_probs(h, w, t, softcap, backend=backend,
                                                      grad_filter=grad_filter), backward)


def _triton_design(design, softcap):
    """fwd+bwd by the Triton backend with the given backward design (kernels/token_logp.py's
    BACKWARD: "chunked", the default, or "fused"), set for the call only."""
    return with_setting("r2ec_fast.kernels.token_logp", "BACKWARD", design,
                        _ours("triton", softcap, True))


def _plain(softcap, backward: bool):
    return _logp_run(lambda h, w, t: linear_log_probs_reference(h, w, t, softcap, upcast=False),
                     backward)


def _torch_linear_ce(softcap, backward: bool):
    # no softcap in torch's op: with one it computes another function, so no error column
    return _logp_run(lambda h, w, t: -F.linear_cross_entropy(h, w, t, reduction="none"),
                     backward, key="logp" if softcap is None else "logp_uncapped",
                     grads=softcap is None)


def _gemm(x):
    torch.matmul(x["hidden"], x["weight"].T)
    return {}


def _peer_logp(name, softcap, backward: bool):
    """Log-probabilities from a peer's fused linear cross-entropy (reduction "none")."""
    def logp(h, w, targets):
        if name == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as ce
        else:
            from cut_cross_entropy import linear_cross_entropy as ce
        loss = ce(h, w, targets, softcap=softcap, reduction="none")
        return -(loss[0] if isinstance(loss, tuple) else loss)  # some versions add z-loss
    return _logp_run(logp, backward)


def _liger_grpo(x):
    """Liger's chunked GRPO loss on one sequence of T tokens, on-policy, no reference model."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    h = x["hidden"].detach().requires_grad_()
    w = x["weight"].detach().requires_grad_()
    mask = torch.ones_like(x["targets"])[None]
    out = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)(
        h[None], w, x["targets"][None], mask, x["grad"][:1])
    (out[0] if isinstance(out, tuple) else out).backward()
    return {}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _impls(t, d, v, softcap):
    fwd, fwd_bwd = 2.0 * t * v * d, 6.0 * t * v * d
    impls = [
        Impl("plain fwd", _plain(softcap, False), fwd,
             about="logits, softcap/temperature, log_softmax, gather"),
        Impl("torch fwd", _ours("torch", softcap, False), fwd, baseline="plain fwd",
             about="linear_log_probs(backend='torch')"),
        Impl("triton fwd", _ours("triton", softcap, False), fwd, baseline="plain fwd",
             needs_cuda=True, about="linear_log_probs(backend='triton')"),
        Impl("plain fwd+bwd", _plain(softcap, True), fwd_bwd, about="autograd through plain"),
        Impl("torch fwd+bwd", _ours("torch", softcap, True), fwd_bwd, baseline="plain fwd+bwd",
             about="linear_log_probs(backend='torch') + grads of hidden and weight"),
        Impl("triton fwd+bwd", _triton_design("chunked", softcap), fwd_bwd,
             baseline="plain fwd+bwd", needs_cuda=True,
             about="linear_log_probs(backend='triton') + grads of hidden and weight "
                   "(the default vocabulary-chunked backward)"),
        Impl("triton fwd+bwd fused", _triton_design("fused", softcap), fwd_bwd,
             baseline="plain fwd+bwd", needs_cuda=True,
             about="the same with the former fused two-pass Triton backward"),
        Impl("triton fwd+bwd filtered", _ours("triton", softcap, True, GRAD_FILTER), fwd_bwd,
             baseline="plain fwd+bwd", needs_cuda=True,
             about=f"the chunked backward with grad_filter={GRAD_FILTER} (approximate: see "
                   "its error column; these random inputs give a flat softmax, little to skip)"),
        Impl("GEMM", _gemm, 2.0 * t * v * d, needs_cuda=True,
             about="hidden @ weight.T alone (cuBLAS): the matmul rate of the four-GEMM floor"),
    ]
    for module, label in (("liger_kernel", "liger"), ("cut_cross_entropy", "cce")):
        if _installed(module):
            about = f"{module} fused linear cross-entropy, reduction='none', softcap"
            impls += [Impl(f"{label} fwd", _peer_logp(label, softcap, False), fwd,
                           baseline="plain fwd", about=about),
                      Impl(f"{label} fwd+bwd", _peer_logp(label, softcap, True), fwd_bwd,
                           baseline="plain fwd+bwd", about=about)]
    if _installed("liger_kernel"):
        impls.append(Impl("liger GRPO fwd+bwd", _liger_grpo, fwd_bwd, baseline="plain fwd+bwd",
                          about="LigerFusedLinearGRPOLoss, beta 0, on-policy (no softcap: "
                                "another function, a loss: no error column)"))
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


def _gpu_acceptance(t, d, v, dtype):
    grad_mib = (t + v) * d * torch.empty(0, dtype=dtype).element_size() / 2**20

    def checks(results: dict[str, dict]) -> list[dict]:
        peak = results.get("triton fwd+bwd", {}).get("memory", {}).get("added_mib")
        t_ours = results.get("triton fwd+bwd", {}).get("time_ms", {}).get("median")
        t_gemm = results.get("GEMM", {}).get("time_ms", {}).get("median")
        floor = 4 * t_gemm if t_gemm else None
        return [
            {"name": f"triton fwd+bwd peak memory <= {GPU_MEMORY_OVER_GRADS}x the gradients'",
             "passed": None if peak is None else peak <= GPU_MEMORY_OVER_GRADS * grad_mib,
             "value": "not measured" if peak is None else
             f"{peak:.0f} MiB vs {grad_mib:.0f} MiB of gradients = {peak / grad_mib:.2f}x"},
            {"name": f"triton fwd+bwd time <= {GPU_TIME_OVER_FLOOR}x four GEMMs",
             "passed": None if not (t_ours and floor) else t_ours <= GPU_TIME_OVER_FLOOR * floor,
             "value": "not measured" if not (t_ours and floor) else
             f"{t_ours:.1f} ms vs 4 x {t_gemm:.1f} ms = {t_ours / floor:.2f}x"},
            time_ratio_check(results, "triton fwd+bwd", "plain fwd+bwd", 1.0),
            time_ratio_check(results, "triton fwd+bwd", "triton fwd+bwd fused", 1.0),
            time_ratio_check(results, "triton fwd+bwd filtered", "triton fwd+bwd", 1.0),
        ]
    return checks


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
        checks=(_acceptance if (t, d, v, softcap, dtype) == ACCEPTANCE else
                _gpu_acceptance(t, d, v, dtype) if (t, d, v, softcap, dtype) == GPU_ACCEPTANCE
                else None),
    )


@register("token_logp")
def token_logp_cases(device: str, mode: str) -> list[Case]:
    return [_case(*shape, seed=2000 + i) for i, shape in enumerate(_shapes(device, mode))]

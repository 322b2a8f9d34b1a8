"""Token sampling for the rollout engine (DESIGN §4.5): HF's logits processors, then one draw.

processed = TopP(TopK(Temperature(RepetitionPenalty(logits))))   (HF ``generate``'s order)

- repetition penalty, on the raw logits (upcast to fp32, as ``generate`` does): for every id in
  ``prev_tokens[b]``, score < 0 -> score * penalty, else score / penalty (once per id, however
  often it occurs); ids outside [0, V) are ignored: -1 pads, and HF drops ids >= the logits'
  width too. No range check: it would cost a host sync at every decode step.
- temperature: score / temperature;
- top-k: keep scores >= the k-th largest (ties kept); 0 or k >= V: off;
- top-p: HF's rule, literally: sort ascending, remove where the cumulative probability
  <= 1 - top_p, always keep the largest; top_p = 1: off (``generate`` skips it then).

Each warper runs only when it changes something (as ``generate`` adds it only then), so the
per-step torch cost at B = 32, V = 4096 is a few element-wise passes, a ``topk`` for top-k, and
a full sort only when top_p < 1.

The draw is an inverse CDF with ONE uniform u per row, in vocabulary order: the token is the
first id whose cumulative kept probability exceeds u * total (u * total at or past the end, by
rounding, gives the last kept id). The caller may pass the uniforms, so that each sequence's
randomness is its own: the same (logits row, u) gives the same token in any batch. Returned
log-probs are log_softmax(processed)[token], the distribution the token was drawn from.
temperature = 0 is greedy: argmax of the penalised logits (first id on ties), log-prob under
log_softmax of the penalised logits at temperature 1; ``process_logits`` then returns those.

Backends: ``torch`` (any device; the oracle) and ``cuda``, the fused kernel of
``csrc/sampling.cu`` (one pass over the logits by the whole GPU for per-tile statistics, then
one thread block per row that reads only the tiles that can hold kept tokens; no sort; see the
file for how its thresholds reproduce the rules above). Selection: ``backend=`` ('reference' is the torch path, which is
this op's reference; there is no Triton kernel) > ``R2EC_BACKEND`` when it names 'torch' or
'cuda' (other values, meant for other ops, are ignored here) > automatic: 'cuda' for CUDA
logits with temperature > 0 when the extension builds and its shared memory (at most 34 KiB)
fits the device, else 'torch'. A failed build warns once, with the
reason, and the torch path is used from then on. Greedy always runs on the torch path (an
argmax needs no kernel of its own). The kernel keeps HF's top-k set exactly; at a top-p cut it
keeps a whole tie where HF keeps an arbitrary part of it, and fp32 rounding may move the cut
by tokens whose mass above lies within rounding of top_p (see csrc/sampling.cu).
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

CSRC_SAMPLING = Path(__file__).resolve().parents[2] / "csrc" / "sampling.cu"
EXTENSION_NAME = "r2ec_fast_sampling"


def _kernel_shared_bytes(top_p) -> int:
    """Shared memory per block of csrc/sampling.cu's row kernel: 16 x 512 fp32 top-p counters
    (or 4096 fp32 top-k candidates, which they reuse), and 1264 bytes of its own (ptxas,
    sm_90), rounded up. At most 34 KiB: every CUDA device has 48 KiB."""
    return 4 * (16 * 512 if top_p < 1 else 4096) + 2048


def _check_params(temperature, top_k, top_p, repetition_penalty):
    def number(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    if not (number(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature!r}")
    if not (isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not (number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")
    if not (number(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got "
                         f"{repetition_penalty!r}")


def _check_tensors(logits, prev_tokens, uniform=None):
    if not (isinstance(logits, torch.Tensor) and logits.is_floating_point()
            and logits.dim() == 2):
        raise ValueError(f"logits must be a floating-point [B, V] tensor, got "
                         f"{getattr(logits, 'dtype', type(logits))} of shape "
                         f"{tuple(getattr(logits, 'shape', ()))}")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary (V = 0)")
    batch = logits.shape[0]
    if prev_tokens is not None:
        if not isinstance(prev_tokens, torch.Tensor) or prev_tokens.dim() != 2 \
                or prev_tokens.shape[0] != batch:
            raise ValueError(f"prev_tokens must be a [B={batch}, L] tensor of token ids "
                             f"(-1 pads), got shape {tuple(getattr(prev_tokens, 'shape', ()))}")
        if prev_tokens.is_floating_point() or prev_tokens.is_complex() \
                or prev_tokens.dtype == torch.bool:
            raise ValueError(f"prev_tokens must hold integer ids, got {prev_tokens.dtype}")
        if prev_tokens.device != logits.device:
            raise ValueError(f"prev_tokens is on {prev_tokens.device} but logits on "
                             f"{logits.device}")
    if uniform is not None:
        if not isinstance(uniform, torch.Tensor) or tuple(uniform.shape) != (batch,):
            raise ValueError(f"uniform must be a [B={batch}] tensor of draws in [0, 1), got "
                             f"shape {tuple(getattr(uniform, 'shape', ()))}")
        if not uniform.is_floating_point():
            raise ValueError(f"uniform must be floating point (fp32 or fp64), got "
                             f"{uniform.dtype}")
        if uniform.device != logits.device:
            raise ValueError(f"uniform is on {uniform.device} but logits on {logits.device}")


def _penalise(scores, prev_tokens, penalty):
    """HF's RepetitionPenaltyLogitsProcessor on fp32 [B, V] scores, with ids outside [0, V)
    sent to one extra column that is dropped (HF's own trick for ids >= V)."""
    vocab = scores.shape[1]
    ids = prev_tokens.long()
    ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab)  # [B, L]
    padded = F.pad(scores, (0, 1))  # [B, V + 1]
    score = padded.gather(1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return padded.scatter(1, ids, score)[:, :vocab]  # repeated ids write the same value


def _top_p(scores, top_p):
    """HF's TopPLogitsWarper, the same operations in the same order (so the same bits)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[:, -1] = False  # min_tokens_to_keep = 1
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def process_logits(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                   prev_tokens=None) -> torch.Tensor:
    """[B, V] fp32 processed logits, -inf where removed (module docstring). temperature = 0:
    the penalised logits (greedy's distribution)."""
    _check_params(temperature, top_k, top_p, repetition_penalty)
    _check_tensors(logits, prev_tokens)
    scores = logits.float()
    if repetition_penalty != 1.0 and prev_tokens is not None and prev_tokens.shape[1] > 0:
        scores = _penalise(scores, prev_tokens, float(repetition_penalty))
    if temperature == 0:
        return scores
    if temperature != 1.0:
        scores = scores / float(temperature)
    if 0 < top_k < scores.shape[1]:
        # the k-th largest value (what HF reads off sorted topk), without sorting the k
        kth = torch.topk(scores, int(top_k), dim=-1, sorted=False).values.amin(-1, True)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        scores = _top_p(scores, float(top_p))
    return scores


def _draw(processed, u):
    """Inverse CDF in vocabulary order: (tokens [B], logprobs [B]). Unnormalised weights: max,
    exp and cumsum are the only passes over the row (no softmax, no logsumexp)."""
    row_max = processed.amax(dim=-1, keepdim=True)  # [B, 1]
    cdf = torch.exp(processed - row_max).cumsum(dim=-1)  # [B, V], non-decreasing
    total = cdf[:, -1:].contiguous()
    first = torch.searchsorted(cdf, u.float()[:, None] * total, right=True)  # cdf > target
    # u * total >= total (u rounded to 1): the last id that adds to the sum (the last kept id,
    # unless fp32 absorbed a tail of weights below total * 2^-24)
    last = torch.searchsorted(cdf, total, right=False)
    # a row with a NaN or +inf logit, or all -inf, has a NaN cdf: searchsorted then gives V,
    # which crashed the whole batch's gather (a device-side assert on CUDA; found by
    # tests/ops/test_fuzz.py). Clamped, such a row draws an arbitrary id with a NaN log-prob
    # (as greedy does) and the other rows are unaffected; no host sync to check for it
    tokens = torch.minimum(first, last).clamp_max_(processed.shape[1] - 1)  # [B, 1]
    logprobs = processed.gather(1, tokens) - row_max - torch.log(total)
    return tokens[:, 0], logprobs[:, 0]


@functools.lru_cache(maxsize=None)
def _load_extension():
    """(module, None) or (None, reason): the ahead-of-time build ``r2ec_fast._C`` (setup.py
    with R2EC_BUILD_CUDA=1) if present, else a JIT build of csrc/sampling.cu (once per process;
    torch caches the binary under its default extensions folder)."""
    try:
        from r2ec_fast import _C  # type: ignore[attr-defined]

        if hasattr(_C, "sample"):
            return _C, None
    except (ImportError, OSError):  # not built, or built for another torch: JIT-build instead
        pass
    try:
        from torch.utils.cpp_extension import load

        if not CSRC_SAMPLING.is_file():
            raise FileNotFoundError(f"{CSRC_SAMPLING} (install from a source checkout)")
        module = load(name=EXTENSION_NAME, sources=[str(CSRC_SAMPLING)],
                      extra_cuda_cflags=["-O3"], verbose=False)
        return module, None
    except Exception as exc:  # a missing nvcc, a compiler error, an ABI mismatch: all fall back
        reason = f"{type(exc).__name__}: {exc}"
        if len(reason) > 2000:
            reason = reason[:500] + " [...] " + reason[-1500:]
        warnings.warn(f"r2ec_fast sampling: the CUDA kernel could not be built or loaded, "
                      f"sampling uses the torch path. Reason: {reason}", RuntimeWarning,
                      stacklevel=4)
        return None, reason


def _cuda_extension():
    """The compiled sampling extension, or None (after one warning) when it cannot be built."""
    return _load_extension()[0]


def _resolve_backend(backend, logits, temperature, top_p, repetition_penalty) -> str:
    explicit = backend is not None
    if backend is None:
        env = os.environ.get("R2EC_BACKEND")
        backend = env if env in ("torch", "cuda") else None
    elif backend not in ("reference", "torch", "cuda"):
        hint = " (sampling has no Triton kernel)" if backend == "triton" else ""
        raise ValueError(f"backend={backend!r} is not a sampling backend{hint}; choose one of "
                         f"'torch' ('reference' is the same), 'cuda' or None (automatic)")
    if backend in ("reference", "torch") or temperature == 0:
        return "torch"
    if not logits.is_cuda:
        if explicit:
            raise ValueError("backend='cuda' needs CUDA logits; use backend='torch' on CPU")
        return "torch"
    module, reason = _load_extension()
    if module is not None:
        need = _kernel_shared_bytes(top_p)
        props = torch.cuda.get_device_properties(logits.device)
        have = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
        if need <= have:
            return "cuda"
        reason = (f"V = {logits.shape[1]} needs {need} bytes of shared memory per block, the "
                  f"device has {have}")
    if explicit:
        raise RuntimeError(f"backend='cuda' cannot run: {reason}")
    return "torch"


@torch.no_grad()
def sample(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
           prev_tokens=None, generator=None, uniform=None, backend=None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [B, V] (any float dtype): (tokens [B] int64, logprobs
    [B] fp32). ``uniform`` [B] in [0, 1): the caller's draws (values outside give the first /
    last kept id; not checked, that would sync); None: ``torch.rand(B, generator=generator)``.
    On the torch path a row with a NaN or +inf logit, or none above -inf, gets a NaN log-prob
    and an arbitrary token id in [0, V); the other rows are unaffected.
    See the module docstring for the semantics and the backends."""
    _check_params(temperature, top_k, top_p, repetition_penalty)
    _check_tensors(logits, prev_tokens, uniform)
    batch, vocab = logits.shape
    which = _resolve_backend(backend, logits, temperature, top_p, repetition_penalty)
    if temperature == 0:
        scores = process_logits(logits, 0.0, top_k, top_p, repetition_penalty, prev_tokens)
        tokens = scores.argmax(dim=-1)  # the first maximal id
        logprobs = scores.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scores, dim=-1)
        return tokens, logprobs
    if uniform is None:
        gen_device = generator.device if generator is not None else logits.device
        uniform = torch.rand(batch, generator=generator, device=gen_device).to(logits.device)
    top_k = int(top_k) if int(top_k) < vocab else 0
    if which == "cuda":
        prev = (prev_tokens.long() if prev_tokens is not None
                else torch.empty(batch, 0, dtype=torch.long, device=logits.device))
        return _cuda_extension().sample(logits, prev, uniform.float().contiguous(),
                                        float(temperature), top_k, float(top_p),
                                        float(repetition_penalty))
    processed = process_logits(logits, temperature, top_k, top_p, repetition_penalty,
                               prev_tokens)
    return _draw(processed, uniform)

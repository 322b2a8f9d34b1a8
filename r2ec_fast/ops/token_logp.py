"""Fused linear token log-probabilities (DESIGN §4.3) and the RecPO token loss (§5 step 6).

logits = softcap * tanh((hidden @ weight.T) / softcap) / temperature   (softcap optional)
logp[t] = logits[t, target[t]] - logsumexp(logits[t]);  entropy[t] = lse[t] - sum_v p z

The fused paths compute both anchored at the row max z_max (an actual logit, so z - z_max is
exact near the max): logp = (z_tgt - z_max) - log L and entropy = log L - E_p[z - z_max], with
L = sum exp(z - z_max). The absolute lse and E_p[z] (~30 under a softcap of 30) would cost
ulp(30) ~ 2e-6 in absolute error, 100 % of a peaked row's entropy. L - 1 is carried without
the max's exact 1 and log L = log1p(L - 1); z - z_max is computed as (y - y_max) z_scale, where
z = z_scale y and y = tanh(x / softcap) (see kernels/token_logp.py for why). Forward saves the
row statistics [3, T] fp32 (y_max, log L, E_p[z] - z_max) for the backward.

Implementations (DESIGN §3):
- ``reference``: materialises the T x |Vocab| logits (float64 with upcast=True);
- ``torch``: a custom autograd Function over [token chunk x vocabulary chunk] blocks with an
  online log-sum-exp; backward recomputes the blocks from the saved row statistics, so no
  T x |Vocab| tensor exists in forward or backward; no weight-gradient work when the weight
  is frozen;
- ``triton``: the kernels of ``r2ec_fast.kernels.token_logp`` (split vocabulary + merge
  forward; two deterministic backward passes, one per gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from r2ec_fast.ops._backend import resolve_backend
from r2ec_fast.ops._gemm import addmm_f32_, mm_f32, mm_into

IGNORE_INDEX = -100
# CPU: elements of one [token chunk, vocabulary chunk] block of fp32 logits (4 MiB)
BLOCK_ELEMS = 1 << 20
TOKEN_CHUNK = 512
# CUDA: every token in one chunk, so that each weight-gradient slice is written once in the
# weight's dtype (no fp32 [Vocab, d] buffer), and vocabulary chunks of fp32 logits up to this
# many bytes, a multiple of CUDA_CHUNK_MULTIPLE columns (Gemma-2-2B, T = 8192: 4,096 columns)
CUDA_BLOCK_BYTES = 128 << 20
CUDA_CHUNK_MULTIPLE = 256


def _check(hidden, weight, targets, softcap, temperature, ignore_index):
    if not (isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and hidden.dim() == 2):
        raise ValueError(f"hidden must be a floating-point [T, d] tensor, got "
                         f"{getattr(hidden, 'shape', type(hidden))}")
    if not (isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2):
        raise ValueError("weight must be a floating-point [Vocab, d] tensor")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has d={hidden.shape[1]} but weight has d={weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must have shape [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer ids, got {targets.dtype}")
    if not hidden.device == weight.device == targets.device:
        raise ValueError(f"hidden, weight and targets must share a device, got {hidden.device}, "
                         f"{weight.device} and {targets.device}")
    if softcap is not None and (isinstance(softcap, bool) or not (
            isinstance(softcap, (int, float)) and softcap > 0)):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float))
                                             and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if targets.numel():
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"targets has ids outside [0, {weight.shape[0]}) that are not "
                             f"ignore_index={ignore_index}")


def _capped(x: torch.Tensor, softcap) -> torch.Tensor:
    """Raw logits x -> y = tanh(x / softcap) (in place on x; x itself without a softcap); the
    sampled distribution's logits are z = _z_scale(...) y, as in the Triton kernels."""
    return x if softcap is None else x.div_(softcap).tanh_()


def _z_scale(softcap, temperature) -> float:
    return (1.0 if softcap is None else softcap) / temperature


def _dz_dx(y: torch.Tensor, softcap, temperature) -> torch.Tensor | float:
    """d logits / d raw logits, from y."""
    if softcap is None:
        return 1.0 / temperature
    return (1.0 - y * y) / temperature


def linear_log_probs_reference(hidden, weight, targets, softcap=None, temperature=1.0,
                               ignore_index=IGNORE_INDEX, return_entropy=False, upcast=True):
    """Materialise the logits (float64 with upcast, else the inputs' dtype, i.e. plain
    PyTorch) and apply the formula literally; differentiable by autograd."""
    dtype = torch.float64 if upcast else torch.promote_types(hidden.dtype, weight.dtype)
    valid = targets != ignore_index
    # ignored rows take no part at all: a NaN hidden row there (padding) must not reach the
    # weight gradient through 0 x NaN (found by tests/ops/test_fuzz.py)
    hidden = torch.where(valid[:, None], hidden, 0)
    x = hidden.to(dtype) @ weight.to(dtype).T  # [T, V]
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    z = x / temperature
    logsm = torch.log_softmax(z.float() if not upcast else z, dim=-1)
    safe = torch.where(valid, targets, 0).long()
    logp = torch.where(valid, logsm.gather(1, safe[:, None])[:, 0], 0.0)
    if not return_entropy:
        return logp
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, torch.where(valid, entropy, 0.0)


def _blocks(n_tokens: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(token chunk, vocabulary chunk) of the torch path on `device`."""
    if device.type == "cuda":
        fit = CUDA_BLOCK_BYTES // (4 * max(1, n_tokens))
        cols = max(CUDA_CHUNK_MULTIPLE, fit // CUDA_CHUNK_MULTIPLE * CUDA_CHUNK_MULTIPLE)
        return max(1, n_tokens), max(1, min(vocab, cols))
    token_chunk = max(1, min(TOKEN_CHUNK, n_tokens))
    return token_chunk, max(1, min(vocab, BLOCK_ELEMS // token_chunk))


def _operand(x: torch.Tensor) -> torch.Tensor:
    """A GEMM operand as the torch path takes it: fp32 on the CPU (upcast once per chunk);
    on CUDA its own dtype, so that 16-bit operands meet tensor cores (r2ec_fast.ops._gemm)."""
    return x if x.is_cuda else x.float()


def _forward_chunk(h, weight, tgt, valid, softcap, temperature, vocab_chunk, want_entropy):
    """(row statistics [3, Tc] = (y_max, log L, E_p[z] - z_max or zeros), target's y [Tc]) of
    one token chunk, streaming over the vocabulary. Same recurrences as the Triton forward
    kernel (see its module docstring)."""
    n = h.shape[0]
    z_scale = _z_scale(softcap, temperature)
    m = torch.full((n,), float("-inf"), device=h.device)  # y_max
    r = torch.full((n,), -1.0, device=h.device)  # L - 1 without the max's exact 1
    ezr = torch.zeros(n, device=h.device)  # sum exp(z - z_max) (z - z_max), <= 0
    y_tgt = torch.zeros(n, device=h.device)
    for a in range(0, weight.shape[0], vocab_chunk):
        b = min(a + vocab_chunk, weight.shape[0])
        y = _capped(mm_f32(h, _operand(weight[a:b]).T), softcap)  # [Tc, Vc] fp32
        inside = valid & (tgt >= a) & (tgt < b)
        y_tgt += torch.where(inside, y.gather(1, (tgt - a).clamp(0, b - a - 1)[:, None])[:, 0], 0.0)
        block_max = y.amax(1)
        m_new = torch.maximum(m, block_max)
        alpha = torch.exp((m - m_new) * z_scale)  # 0 on the first block
        ym = y.sub_(m_new[:, None])
        at_max = ym == 0
        zm = ym.mul_(z_scale)
        e = torch.exp(zm).masked_fill_(at_max, 0.0)  # the maxima's exact ones are counted
        if want_entropy:
            # re-anchor at m_new; the first block has L = 0 and m = -inf, hence the guard
            shift = torch.where(r > -1, (m - m_new) * z_scale, 0.0)
            ezr = alpha * (ezr + (1 + r) * shift) + (e * zm).sum(1)
        e_sum = e.sum(1)
        r = torch.where(block_max >= m, alpha * (1 + r) + e_sum + (at_max.sum(1) - 1), r + e_sum)
        m = m_new
    return torch.stack((m, torch.log1p(r), ezr / (1 + r))), y_tgt


def _backward_chunk(h, weight, tgt, valid, stats, g_logp, g_ent, softcap, temperature,
                    vocab_chunk, grad_w, write_w):
    """fp32 grad of the token chunk's hidden rows [Tc, d]; into grad_w [V, d] when given:
    written (`write_w`, the chunk holds every token) or added (fp32 grad_w). `stats`
    [3, Tc] = (y_max, log L, E_p[z] - z_max)."""
    h = torch.where(valid[:, None], h, 0.0)  # an ignored NaN row: no 0 x NaN into grad_w
    m, log_l, mean_zm = stats[0, :, None], stats[1, :, None], stats[2, :, None]
    z_scale = _z_scale(softcap, temperature)
    grad_h = torch.zeros(h.shape, device=h.device)
    for a in range(0, weight.shape[0], vocab_chunk):
        b = min(a + vocab_chunk, weight.shape[0])
        w = _operand(weight[a:b])
        y = _capped(mm_f32(h, w.T), softcap)  # [Tc, Vc] fp32
        zm = (y - m) * z_scale  # z - z_max
        p = torch.exp(zm - log_l)
        # d/dz of g_logp * (z_tgt - lse) + g_ent * (lse - sum p z); z - E_p[z] = zm - mean_zm
        coef = -p * g_logp[:, None]
        if g_ent is not None:
            coef -= (p * (zm - mean_zm)) * g_ent[:, None]
        inside = valid & (tgt >= a) & (tgt < b)
        coef.scatter_add_(1, (tgt - a).clamp(0, b - a - 1)[:, None],
                          torch.where(inside, g_logp, 0.0)[:, None])
        coef = coef * _dz_dx(y, softcap, temperature)
        coef = torch.where(valid[:, None], coef, 0.0)
        if w.dtype == h.dtype != torch.float32:  # rounded as plain PyTorch rounds dL/dlogits
            coef = coef.to(w.dtype)
        addmm_f32_(grad_h, coef, w)
        if grad_w is not None and write_w:
            mm_into(grad_w[a:b], coef.T, h)
        elif grad_w is not None:
            addmm_f32_(grad_w[a:b], coef.T, h)
    return grad_h


def _torch_forward(hidden, weight, tgt, valid, softcap, temperature, want_entropy):
    """(logp [T], entropy [T], row statistics [3, T]) fp32 by the blocked torch path."""
    n_tokens = hidden.shape[0]
    token_chunk, vocab_chunk = _blocks(n_tokens, weight.shape[0], hidden.device)
    stats = torch.empty(3, n_tokens, device=hidden.device)
    y_tgt = torch.empty(n_tokens, device=hidden.device)
    for s in range(0, n_tokens, token_chunk):
        e = min(s + token_chunk, n_tokens)
        stats[:, s:e], y_tgt[s:e] = _forward_chunk(
            _operand(hidden[s:e]), weight, tgt[s:e], valid[s:e], softcap, temperature,
            vocab_chunk, want_entropy)
    m, log_l, mean_zm = stats
    logp = torch.where(valid, (y_tgt - m) * _z_scale(softcap, temperature) - log_l, 0.0)
    entropy = (torch.where(valid, log_l - mean_zm, 0.0) if want_entropy
               else torch.zeros_like(logp))
    return logp, entropy, stats


def _torch_backward(hidden, weight, tgt, valid, stats, g_logp, g_ent, softcap, temperature,
                    need_h, need_w):
    n_tokens = hidden.shape[0]
    token_chunk, vocab_chunk = _blocks(n_tokens, weight.shape[0], hidden.device)
    write_w = token_chunk >= n_tokens  # one token chunk: each slice of grad_w written once
    grad_w = None
    if need_w:
        grad_w = (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if write_w
                  else torch.zeros(weight.shape, device=weight.device))
    grad_h = torch.empty(hidden.shape, device=hidden.device) if need_h else None
    for s in range(0, n_tokens, token_chunk):
        e = min(s + token_chunk, n_tokens)
        gh = _backward_chunk(_operand(hidden[s:e]), weight, tgt[s:e], valid[s:e],
                             stats[:, s:e], g_logp[s:e], None if g_ent is None else g_ent[s:e],
                             softcap, temperature, vocab_chunk, grad_w, write_w)
        if need_h:
            grad_h[s:e] = gh
    return (grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None)


def _forward_impl(hidden, weight, targets, softcap, temperature, ignore_index, want_entropy,
                  backend, grad_filter=0.0):
    """(logp [T], entropy [T], row statistics [3, T] = (y_max, log L, E_p[z] - z_max), the
    forward's tile maxima [T, tiles] for the filtered backward or [0]) fp32; entropy and
    E_p[z] - z_max are zeros when not wanted."""
    valid = targets != ignore_index
    if backend == "triton":
        from r2ec_fast.kernels import token_logp as kern

        tgt = torch.where(valid, targets, -1).long().contiguous()
        tile_max = hidden.new_empty(0, dtype=torch.float32)
        if grad_filter:
            tiles = -(-weight.shape[0] // kern.tile_columns(hidden, weight))
            tile_max = hidden.new_empty((hidden.shape[0], tiles), dtype=torch.float32)
        logp, entropy, stats = kern.token_logp_forward(
            hidden, weight, tgt, softcap, temperature, want_entropy,
            tile_max=tile_max if grad_filter else None)
        if entropy is None:
            entropy = torch.zeros_like(logp)
        return logp, entropy, stats, tile_max
    tgt = torch.where(valid, targets, 0).long()
    return (*_torch_forward(hidden, weight, tgt, valid, softcap, temperature, want_entropy),
            hidden.new_empty(0, dtype=torch.float32))


def _backward_impl(g_logp, g_ent, hidden, weight, targets, stats, softcap, temperature,
                   ignore_index, backend, need_h, need_w, grad_filter=0.0, tile_max=None):
    """(grad hidden, grad weight) in the inputs' dtypes; [0]-shaped when not needed. `g_ent`
    None: no entropy term."""
    valid = targets != ignore_index
    g_logp = g_logp.float().contiguous()
    g_ent = None if g_ent is None else g_ent.float().contiguous()
    if backend == "triton":
        from r2ec_fast.kernels import token_logp as kern

        tgt = torch.where(valid, targets, -1).long().contiguous()
        grad_h, grad_w = kern.token_logp_backward(
            hidden, weight, tgt, stats, g_logp, g_ent, softcap, temperature, need_h, need_w,
            design="chunked" if grad_filter else None, grad_filter=grad_filter or None,
            tile_max=tile_max if grad_filter else None)
    else:
        tgt = torch.where(valid, targets, 0).long()
        grad_h, grad_w = _torch_backward(hidden, weight, tgt, valid, stats, g_logp, g_ent,
                                         softcap, temperature, need_h, need_w)
    return (grad_h if need_h else hidden.new_empty(0),
            grad_w if need_w else weight.new_empty(0))


# torch.compile: the two passes are custom ops, so each stays one node of the graph (Dynamo
# cannot trace a Triton launcher or the chunk loop); eager calls use the autograd Function
# below, because the dispatcher's first call imports torch._dynamo (1.6 s, 120 MiB; see
# ops/catalog.py).
@torch.library.custom_op("r2ec_fast::linear_log_probs", mutates_args=())
def linear_log_probs_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        softcap: Optional[float], temperature: float, ignore_index: int,
                        want_entropy: bool, backend: str, grad_filter: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(hidden, weight, targets, softcap, temperature, ignore_index,
                         want_entropy, backend, grad_filter)


@linear_log_probs_op.register_fake
def _(hidden, weight, targets, softcap, temperature, ignore_index, want_entropy, backend,
      grad_filter):
    n_tokens = hidden.shape[0]
    tiles = (0,)
    if grad_filter:
        from r2ec_fast.kernels import token_logp as kern

        tiles = (n_tokens, -(-weight.shape[0] // kern.tile_columns(hidden, weight)))
    return (hidden.new_empty(n_tokens, dtype=torch.float32),
            hidden.new_empty(n_tokens, dtype=torch.float32),
            hidden.new_empty((3, n_tokens), dtype=torch.float32),
            hidden.new_empty(tiles, dtype=torch.float32))


@torch.library.custom_op("r2ec_fast::linear_log_probs_backward", mutates_args=())
def linear_log_probs_backward(g_logp: torch.Tensor, g_ent: Optional[torch.Tensor],
                              hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              stats: torch.Tensor, softcap: Optional[float],
                              temperature: float, ignore_index: int, backend: str,
                              need_h: bool, need_w: bool, grad_filter: float,
                              tile_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(g_logp, g_ent, hidden, weight, targets, stats, softcap, temperature,
                          ignore_index, backend, need_h, need_w, grad_filter, tile_max)


@linear_log_probs_backward.register_fake
def _(g_logp, g_ent, hidden, weight, targets, stats, softcap, temperature, ignore_index,
      backend, need_h, need_w, grad_filter, tile_max):
    return (hidden.new_empty(hidden.shape if need_h else (0,)),
            weight.new_empty(weight.shape if need_w else (0,)))


def _setup(ctx, inputs, output):
    (hidden, weight, targets, softcap, temperature, ignore_index, want_entropy, backend,
     grad_filter) = inputs
    ctx.save_for_backward(hidden, weight, targets, output[2], output[3])
    ctx.args = (softcap, temperature, ignore_index, want_entropy, backend, grad_filter)
    ctx.mark_non_differentiable(output[2], output[3])


def _grads(ctx, g_logp, g_ent, backward):
    hidden, weight, targets, stats, tile_max = ctx.saved_tensors
    softcap, temperature, ignore_index, want_entropy, backend, grad_filter = ctx.args
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_logp = torch.zeros_like(stats[0]) if g_logp is None else g_logp
    g_ent = g_ent if want_entropy else None
    grad_h, grad_w = backward(g_logp, g_ent, hidden, weight, targets, stats, softcap,
                              temperature, ignore_index, backend, need_h, need_w, grad_filter,
                              tile_max)
    return (grad_h if need_h else None, grad_w if need_w else None) + (None,) * 7


linear_log_probs_op.register_autograd(
    lambda ctx, g_logp, g_ent, g_stats, g_tiles: _grads(ctx, g_logp, g_ent,
                                                         linear_log_probs_backward),
    setup_context=_setup)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, temperature, ignore_index, want_entropy,
                backend, grad_filter):
        out = _forward_impl(hidden, weight, targets, softcap, temperature, ignore_index,
                            want_entropy, backend, grad_filter)
        _setup(ctx, (hidden, weight, targets, softcap, temperature, ignore_index, want_entropy,
                     backend, grad_filter), out)
        return out

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_stats, g_tiles):
        return _grads(ctx, g_logp, g_ent, _backward_impl)


def linear_log_probs(hidden, weight, targets, softcap=None, temperature=1.0,
                     ignore_index=IGNORE_INDEX, return_entropy=False, backend=None,
                     grad_filter=None):
    """Per-token log-probabilities [T] fp32 (and entropies [T] with ``return_entropy``) of
    ``targets`` under softmax(softcap * tanh(hidden @ weight.T / softcap) / temperature),
    without materialising the T x |Vocab| logits. Differentiable w.r.t. ``hidden`` and
    ``weight`` (no weight-gradient work when ``weight.requires_grad`` is false); ignored
    targets give 0 and no gradient.

    ``grad_filter=eps`` (opt-in, triton backend): the backward skips the work of blocks of
    tokens x vocabulary chunk whose softmax mass is provably below eps for every token of the
    block (never a token's own target): an approximate gradient, deterministic, whose error
    the token_logp benchmark reports against float64."""
    _check(hidden, weight, targets, softcap, temperature, ignore_index)
    backend = resolve_backend(backend, hidden, weight)
    if grad_filter is not None:
        if isinstance(grad_filter, bool) or not (isinstance(grad_filter, (int, float))
                                                 and 0 < grad_filter < 1):
            raise ValueError(f"grad_filter must be None or a number in (0, 1), got "
                             f"{grad_filter!r}")
        if backend != "triton":
            raise ValueError(f"grad_filter is a mode of the triton backend's chunked "
                             f"backward; backend={backend!r} computes the exact gradient "
                             "(pass grad_filter=None)")
    if backend == "reference":
        out = linear_log_probs_reference(hidden, weight, targets, softcap, temperature,
                                         ignore_index, return_entropy, upcast=False)
        return tuple(o.float() for o in out) if return_entropy else out.float()
    apply = linear_log_probs_op if torch.compiler.is_compiling() else _LinearLogProbs.apply
    logp, entropy, _, _ = apply(hidden, weight, targets,
                                None if softcap is None else float(softcap), float(temperature),
                                int(ignore_index), bool(return_entropy), backend,
                                float(grad_filter or 0.0))
    return (logp, entropy) if return_entropy else logp


@dataclass
class TokenLoss:
    loss: torch.Tensor  # scalar, differentiable
    mean_ratio: torch.Tensor  # over the masked tokens
    clip_frac: torch.Tensor  # fraction of masked tokens whose clipped term was taken
    entropy: torch.Tensor | None = None  # mean entropy over the masked tokens


def recpo_token_loss(hidden, weight, targets, advantages, loss_mask, old_logp=None,
                     eps_low=0.2, eps_high=0.28, softcap=None, temperature=1.0,
                     normalize="token", batch_size=None, return_entropy=False,
                     backend=None) -> TokenLoss:
    """The clipped token objective of DESIGN §5 step 6 on flattened tokens [T]:
    r = exp(logp - old_logp), loss_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).

    normalize="token": mean over the masked tokens; "reference": that mean divided by
    ``batch_size`` (the reference trainer's mini-batch size). ``old_logp=None`` means on-policy
    (the ratio is 1, the gradient that of logp A)."""
    if normalize not in ("token", "reference"):
        raise ValueError(f"normalize={normalize!r}; choose 'token' or 'reference'")
    if normalize == "reference" and not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError("normalize='reference' needs batch_size, the mini-batch size")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    n_tokens = hidden.shape[0] if isinstance(hidden, torch.Tensor) else None
    for name, t in (("advantages", advantages), ("loss_mask", loss_mask), ("old_logp", old_logp)):
        if t is not None and t.shape != (n_tokens,):
            raise ValueError(f"{name} must have shape [{n_tokens}], got {tuple(t.shape)}")
    out = linear_log_probs(hidden, weight, targets, softcap, temperature,
                           return_entropy=return_entropy, backend=backend)
    logp, entropy = out if return_entropy else (out, None)
    mask = loss_mask.to(torch.float32)
    old = logp.detach() if old_logp is None else old_logp
    per_token, took_clip, ratio = clipped_objective(logp, old, advantages, eps_low, eps_high)
    count = mask.sum().clamp_min(1.0)
    loss = (per_token * mask).sum() / count
    if normalize == "reference":
        loss = loss / batch_size
    with torch.no_grad():
        stats = TokenLoss(loss, (ratio * mask).sum() / count,
                          (took_clip.float() * mask).sum() / count)
        if entropy is not None:
            stats.entropy = (entropy * mask).sum() / count
    return stats


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float = 0.28):
    """Per-element PPO loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with
    r = exp(logp - old_logp); also whether the clipped branch was taken, and r (detached)."""
    ratio = torch.exp(logp.float() - old_logp.float())
    adv = advantages.float()
    unclipped, clipped = ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach(), ratio.detach()

"""RMSNorm forward, as the HF decoders compute it (the rollout engine's norms, DESIGN §4.4).

    x32 = x.float();  n = x32 * rsqrt(mean(x32^2, -1) + eps)
    gemma=True:   y = (n * (1 + w.float())).to(x.dtype)       (GemmaRMSNorm, Gemma2RMSNorm)
    gemma=False:  y = w * n.to(x.dtype)                       (LlamaRMSNorm, Qwen2RMSNorm)

Implementations (DESIGN §3):
- ``reference``: the same formula in float64 (upcast=True), the oracle in tests;
- ``torch``: HF's own sequence of ops (cast, pow, mean, rsqrt, products), bit for bit;
- ``triton``: ``r2ec_fast.kernels.rms_norm``, one fused kernel (forward only: with autograd
  recording a gradient through x or w, the torch path runs instead).

`fused_rms_norms(module)` routes every known HF RMSNorm inside a model through `rms_norm` for
the duration of a ``with`` block (the rollout engine's decode steps).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from r2ec_fast.ops._backend import resolve_backend

# HF norm classes whose forward is exactly one of the two formulas above: name -> gemma
KNOWN_NORMS = {"GemmaRMSNorm": True, "Gemma2RMSNorm": True, "LlamaRMSNorm": False,
               "Qwen2RMSNorm": False, "MistralRMSNorm": False}


def rms_norm_reference(x, weight, eps: float, gemma: bool, upcast: bool = True):
    dtype = torch.float64 if upcast else torch.float32
    x64 = x.to(dtype)
    n = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return n * (1 + weight.to(dtype)) if gemma else weight.to(dtype) * n


def _torch_rms_norm(x, weight, eps, gemma):
    x32 = x.float()
    n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (n * (1.0 + weight.float())).type_as(x)
    return weight * n.to(x.dtype)


def _rms_norm(x, weight, eps, gemma, backend):
    if backend == "triton":
        from r2ec_fast.kernels import rms_norm as kern

        return kern.rms_norm_forward(x, weight, eps, gemma)
    if backend == "reference":  # float64 arithmetic, the torch path's output dtype
        dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
        return rms_norm_reference(x, weight, eps, gemma).to(dtype)
    return _torch_rms_norm(x, weight, eps, gemma)


@torch.library.custom_op("r2ec_fast::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
                 backend: str) -> torch.Tensor:
    return _rms_norm(x, weight, eps, gemma, backend)


@_rms_norm_op.register_fake
def _(x, weight, eps, gemma, backend):
    dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    return x.new_empty(x.shape, dtype=dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
             backend: str | None = None) -> torch.Tensor:
    """RMSNorm of x [..., D] with weight [D] (formulas in the module docstring)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be tensors")
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} must be [D] for x {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight on {weight.device}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"x and weight must be floating point, got {x.dtype}, {weight.dtype}")
    backend = resolve_backend(backend, x, weight)
    if backend == "triton" and torch.is_grad_enabled() and (x.requires_grad
                                                             or weight.requires_grad):
        backend = "torch"  # the kernel has no backward
    if torch.compiler.is_compiling():
        return _rms_norm_op(x, weight, float(eps), bool(gemma), backend)
    return _rms_norm(x, weight, eps, gemma, backend)


def _norm_eps(module) -> float:
    return module.eps if hasattr(module, "eps") else module.variance_epsilon


@contextmanager
def fused_rms_norms(model: torch.nn.Module, backend: str | None = None):
    """Inside the block, every module of a class in KNOWN_NORMS computes `rms_norm(...,
    backend)`; their own forwards are restored on exit. Other norm classes are left alone."""
    patched = []
    try:
        for module in model.modules():
            gemma = KNOWN_NORMS.get(type(module).__name__)
            if gemma is None or "forward" in vars(module):
                continue
            eps = float(_norm_eps(module))

            def forward(x, _m=module, _eps=eps, _gemma=gemma):
                return rms_norm(x, _m.weight, _eps, _gemma, backend)

            module.forward = forward
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward

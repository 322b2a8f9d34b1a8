"""Fused RMSNorm forward (the rollout engine's decoder norms, DESIGN §4.4).

One program per row: the row is read once, its mean square reduced in fp32, and the scaled row
written once. HF's Gemma-2 and Qwen-2 norms run this as seven to ten elementwise kernels each
(cast, pow, mean, add, rsqrt, mul, weight, cast), which at a decode step's 64 rows of 2,304 cost
about 36 us per norm on an H200, 4 ms of an 11 ms step (profile in
benchmarks/results/gpu-h200-2026-11-26/rollout-profile.txt).

    x32 = x.float();  n = x32 * rsqrt(mean(x32^2) + eps)
    GEMMA:  y = (n * (1 + w.float())).to(x.dtype)          (Gemma, Gemma-2)
    else:   y = w * n.to(x.dtype)                          (Llama, Qwen-2: product in the
                                                            promoted dtype of w and x)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _empty


@triton.jit
def _round(y, DTYPE: tl.constexpr):
    """y (fp32) rounded to DTYPE, kept in fp32. bf16 by hand, to nearest even: the interpreter's
    fp32 -> bf16 cast truncates (numpy has no bf16), the GPU's rounds; this is the same on both
    (finite values)."""
    if DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return y.to(DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, D, stride_x, stride_y, eps,
                         BLOCK_D: tl.constexpr, GEMMA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    n = x * rstd
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        y = n * (1.0 + w)
    else:  # n rounded to x's dtype, then the product in the output dtype (w is exact in it)
        y = w * _round(n, X.dtype.element_ty)
    y = _round(y, Y.dtype.element_ty)  # exact in Y's dtype: the store's cast changes nothing
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     gemma: bool) -> torch.Tensor:
    """y [..., D] (x's dtype for Gemma; the promoted dtype of weight and x otherwise)."""
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight {tuple(weight.shape)} must be [{d}] for x {tuple(x.shape)}")
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    y = _empty(rows.shape, out_dtype, x.device)
    if rows.shape[0]:
        block_d = triton.next_power_of_2(d)
        _rms_norm_fwd_kernel[(rows.shape[0],)](
            rows, weight.contiguous(), y, d, rows.stride(0), y.stride(0), float(eps),
            BLOCK_D=block_d, GEMMA=gemma, num_warps=min(16, max(1, block_d // 256)))
    return y.reshape(x.shape)

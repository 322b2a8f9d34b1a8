"""Matrix products with fp32 accumulation whatever the operands' dtype: on CUDA, 16-bit
operands stay 16-bit (cuBLAS tensor-core GEMMs, fp32 results where asked for); elsewhere, and
for any other dtype mix, both operands are upcast to fp32 first (exact products, and no
CPU bf16 GEMM: see the oneDNN NaN leak in the README's Backends section).

The vocabulary-chunked backward passes (ops/token_logp.py, kernels/token_logp.py) use these
for their logits and gradient products."""
from __future__ import annotations

import torch

_HALF = (torch.bfloat16, torch.float16)
_DTYPE_GEMM: dict[int | None, bool] = {}  # CUDA device index -> aten's out_dtype GEMMs work


def _tensor_cores(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.is_cuda and a.dtype == b.dtype and a.dtype in _HALF


def _dtype_gemm(device: torch.device) -> bool:
    """Whether this torch has aten's `mm.dtype` / `addmm.dtype_out` (16-bit in, fp32 out) on
    `device`; probed once on a 1 x 1 product."""
    if device.index not in _DTYPE_GEMM:
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        acc = torch.zeros(1, 1, dtype=torch.float32, device=device)
        try:
            torch.ops.aten.addmm.dtype_out(acc, one, one, torch.float32, out=acc)
            ok = float(acc) == 1.0 and torch.ops.aten.mm.dtype(one, one, torch.float32).dtype \
                == torch.float32
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
        _DTYPE_GEMM[device.index] = ok
    return _DTYPE_GEMM[device.index]


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32 [m, n], accumulated in fp32."""
    if _tensor_cores(a, b) and _dtype_gemm(a.device):
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return a.float() @ b.float()


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place, acc fp32 [m, n]."""
    if _tensor_cores(a, b) and _dtype_gemm(a.device):
        return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out = a @ b, accumulated in fp32 and rounded once to out's dtype."""
    if _tensor_cores(a, b) and out.dtype == a.dtype:
        return torch.mm(a, b, out=out)
    return out.copy_(mm_f32(a, b))

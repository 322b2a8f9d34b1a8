"""RMSNorm forward benchmark (`r2ec_fast.ops.rms_norm`, the rollout engine's fused norms).

Rows: "hf" (the model's own norm module, Gemma-2's or Qwen-2's arithmetic: cast, pow, mean,
rsqrt, products), "torch" (the op's torch path, the same ops through the op) and "triton"
(one fused kernel; CUDA only). Shapes: a decode step's rows (64 and 256 sequences) and a
prefill's (4,096 tokens) at Gemma-2-2B's d 2304 in bf16, the fp32 tiny case on CPU. Bytes:
x read once and y written once (the weight is negligible). Error: vs the float64 formula.
"""
from __future__ import annotations

import torch

from r2ec_fast.ops.rms_norm import rms_norm, rms_norm_reference

from .harness import Case, Impl, register
from ..testing import rel_error

EPS = 1e-6


def _hf_norm(gemma: bool, d: int):
    """The HF module the engine replaces, Gemma-2's or Qwen-2's (its forward is the
    baseline)."""
    if gemma:
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm as cls
    else:
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm as cls
    return cls(d, eps=EPS)


def _make_inputs(rows, d, dtype, gemma, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g).to(dtype)
    w = (torch.randn(d, generator=g) * 0.2 + (0.0 if gemma else 1.0)).to(dtype)
    module = _hf_norm(gemma, d).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(w)
    return {"x": x.to(device), "w": w.to(device), "module": module, "gemma": gemma}


def _case(rows, d, dtype, gemma, seed) -> Case:
    name = "gemma" if gemma else "qwen"
    elem = torch.empty(0, dtype=dtype).element_size()

    def reference(x):
        return ({"y": rms_norm_reference(x["x"], x["w"], EPS, x["gemma"])},
                {"dtype": "float64", "note": "the same formula in float64"})

    def errors(out, ref):
        return {"y": rel_error(out["y"], ref["y"])}

    def op(backend):
        def run(x):
            with torch.no_grad():
                return {"y": rms_norm(x["x"], x["w"], EPS, x["gemma"], backend=backend)}
        return run

    def hf(x):
        with torch.no_grad():
            return {"y": x["module"](x["x"])}

    return Case(
        key=f"{name} rows={rows} d={d} {str(dtype).replace('torch.', '')}",
        shape={"rows": rows, "d": d}, dtype=dtype, bytes_read=2 * rows * d * elem,
        make_inputs=lambda device: _make_inputs(rows, d, dtype, gemma, seed, device),
        reference=reference, errors=errors,
        impls=[Impl("hf", hf, 0.0, about=f"transformers' {name} RMSNorm module"),
               Impl("torch", op("torch"), 0.0, baseline="hf", about="rms_norm(backend='torch')"),
               Impl("triton", op("triton"), 0.0, baseline="hf", needs_cuda=True,
                    about="rms_norm(backend='triton'), one fused kernel")])


@register("rms_norm")
def rms_norm_cases(device: str, mode: str) -> list[Case]:
    if mode == "smoke":
        return [_case(5, 64, torch.float32, True, 0)]
    if device == "cuda":
        shapes = [(64, 2304), (256, 2304)] + ([] if mode == "quick" else [(4096, 2304)])
        return [_case(r, d, torch.bfloat16, gemma, 0) for r, d in shapes
                for gemma in (True, False)]
    return [_case(64, 2304, torch.float32, True, 0), _case(64, 2304, torch.float32, False, 0)]

"""Backend selection, in one place for every op (DESIGN §3).

Order: explicit ``backend=`` argument > environment variable ``R2EC_BACKEND`` > automatic
(``triton`` on CUDA tensors, ``torch`` on CPU tensors).
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("reference", "torch", "triton")


def triton_interpreting() -> bool:
    """True when Triton kernels run through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# looked up once, without importing triton (a plain constant also traces under torch.compile)
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Pick the implementation for an op call on ``tensors``.

    Raises ``ValueError`` for an unknown name or a backend that cannot run on these tensors.
    """
    source = "backend="
    if backend is None:
        backend = os.environ.get("R2EC_BACKEND") or None
        source = "R2EC_BACKEND"
    on_cuda = any(t.is_cuda for t in tensors if t is not None)
    if backend is None:
        return "triton" if on_cuda and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{source}{backend!r} is not a backend; choose one of {BACKENDS}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{source}'triton' but triton is not installed (pip install 'triton>=3.6')")
        if not on_cuda and not triton_interpreting():
            raise ValueError(
                f"{source}'triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported, or use backend='torch'"
            )
    return backend

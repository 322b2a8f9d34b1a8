"""Recognising an out-of-memory error and giving the memory back (any layer may use it)."""
from __future__ import annotations

import gc

import torch

# CPU allocations that fail raise a plain RuntimeError with one of these
_CPU_MESSAGES = ("can't allocate memory", "out of memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError (CUDA and other accelerators) and for a CPU
    allocator's failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _CPU_MESSAGES)


def free_memory() -> None:
    """Give back what a failed attempt held. Call it after leaving the `except` block, so that
    the traceback's frames, and the tensors they hold, are gone."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""Pieces shared by the Triton kernels and their launchers: the dot-product helper, the
interpreter test, buffer allocation and the split of a streamed axis across programs."""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr):
    # DOT_F32: fp32 operands with exact (ieee) products. Set for fp32 inputs, and in the
    # interpreter, whose tl.dot multiplies raw bf16 bit patterns (DESIGN §3).
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every buffer a kernel must fully write (tests poison it through here)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so the merge paths are always exercised


def _splits(n_blocks: int, n_tiles: int, device: torch.device,
            programs_per_sm: int = 4) -> tuple[int, int]:
    """(num_splits, tiles_per_split) so that the grid fills the device `programs_per_sm` deep;
    every split starts on a tile inside the axis."""
    want = max(1, math.ceil(programs_per_sm * _num_sms(device) / n_blocks))
    splits = min(n_tiles, want)
    tiles_per_split = math.ceil(n_tiles / splits)
    return math.ceil(n_tiles / tiles_per_split), tiles_per_split


def chunk_width(rows: int, total: int, itemsize: int, budget: int, multiple: int) -> int:
    """Columns of one [rows, width] chunk buffer of `itemsize`-byte elements: a multiple of
    `multiple` under `budget` bytes (at least one multiple), never more than `total`."""
    fit = budget // max(1, rows * itemsize)
    return min(total, max(multiple, fit // multiple * multiple))

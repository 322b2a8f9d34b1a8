"""Out of memory during a training step: recognised, memory given back, the work split in half.

The reference trainer skips the whole step when a rank runs out of memory (REFERENCE.md,
"Behaviours" 6), and in a mini-batch backward even drops the earlier mini-batches' gradients.
Here a step is never skipped: the trainer catches the error, frees what the failed attempt
held, halves the piece of work that failed (users per rollout call; trajectories per forward,
scoring or backward piece) and does that part of the step again, down to one user's group for
the rollout and one trajectory for the rest. The halved size is kept for the following steps
(a step that ran out once would likely run out again), and every event is logged in
metrics.jsonl (`oom_retries`, `oom_phases`, and the piece sizes in force).

Splitting changes no number beyond float summation order: rollouts are seeded per (step, user),
scoring is per row, the losses are sums of per-trajectory terms normalised by the step's global
token and trajectory counts, and the in-batch item softmax always sees every target of its
micro-batch (`Trainer._update`). Only one process: under torchrun the ranks would disagree on
the collectives of FSDP, so there an out-of-memory error stops the run with what to lower.
"""
from __future__ import annotations

from r2ec_fast.memory import free_memory, is_out_of_memory

__all__ = ["free_memory", "halved", "is_out_of_memory", "pieces", "OutOfMemoryInStep"]


def halved(size: int, floor: int = 1) -> int:
    return max(floor, size // 2)


def pieces(lo: int, hi: int, size: int | None) -> list[tuple[int, int]]:
    """[lo, hi) in consecutive ranges of at most `size` (None: one range)."""
    step = hi - lo if size is None else max(1, size)
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)] if hi > lo else []


class OutOfMemoryInStep(RuntimeError):
    """A step ran out of memory with nothing left to split (or under torchrun)."""

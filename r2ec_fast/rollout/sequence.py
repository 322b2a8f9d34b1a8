"""Sequence state of the rollout engine: sampling settings, one group per prompt, one sequence
per sample.

A `Group` is one prompt and its G samples. The prompt is prefilled once, by the group; its KV
blocks are then shared by the samples (see `block_manager`). A `Sequence` is one sample: the
tokens it generated, their log-probs, its block table and its own random stream, so that what
it draws depends only on (seed, prompt, sample index), never on which other sequences share a
batch or on whether it was preempted and recomputed.
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """What to draw: HF `generate` semantics for each knob (DESIGN §4.5)."""

    n: int = 1  # samples per prompt (the group size G)
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # HF's: over the prompt and the generated tokens
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # generation stops after one of these (kept)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n", "must be an int >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0 (0: greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an int >= 0 (0: off)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1: off)"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens",
             "must be an int >= 1"),
            (isinstance(self.seed, int), "seed", "must be an int"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV dropped, to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


def sample_generator(seed: int, sample_index: int) -> random.Random:
    """The random stream of sample `sample_index` of a prompt seeded `seed`: one uniform per
    token is drawn from it on the host and shipped to the device with the batch. Python's
    Mersenne Twister, seeded from numpy's SeedSequence of (seed, index): the same stream on
    every platform, and a draw costs 0.1 us (a torch.Generator draw: 7 us, 32 per step)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, sample_index]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


@dataclass(eq=False)
class Sequence:
    seq_id: int
    group: "Group"
    sample_index: int
    generator: random.Random
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    status: Status = Status.WAITING

    @property
    def prompt(self) -> list[int]:
        return self.group.prompt

    @property
    def num_tokens(self) -> int:
        return len(self.group.prompt) + len(self.output)

    def token(self, position: int) -> int:
        prompt = self.group.prompt
        return prompt[position] if position < len(prompt) else self.output[position - len(prompt)]

    def next_uniform(self) -> float:
        return self.generator.random()  # in [0, 1)


@dataclass(eq=False)
class Group:
    """One prompt and its samples. Until it is prefilled the group holds the prompt's blocks
    itself (`block_table`); the fork hands them to the samples."""

    index: int  # the prompt's position in the `generate` call
    prompt: list[int]
    samples: list[Sequence] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)

    @property
    def live(self) -> list[Sequence]:
        return [s for s in self.samples if s.status is not Status.FINISHED]

    @property
    def done(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.samples)

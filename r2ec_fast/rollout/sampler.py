"""Sampler: one token per drawing sequence from the runner's logits (DESIGN §4.5).

The draw itself is `r2ec_fast.ops.sampling.sample` (the fused CUDA kernel of `csrc/` on CUDA
machines, torch elsewhere). What this module adds is the engine's randomness contract: every
sequence draws its uniform from its own generator (`Sequence.next_uniform`), one per token, so a
sample's tokens depend on (seed, prompt, sample index) only, not on batching or preemption.
A group's prefill row gives one logits row that all its G samples draw from.
"""
from __future__ import annotations

import torch

from r2ec_fast.ops.sampling import sample

from .scheduler import Batch
from .sequence import SamplingParams, Sequence


class Sampler:
    def __init__(self, params: SamplingParams, backend: str | None = None):
        self.params, self.backend = params, backend

    def draw_index(self, batch: Batch) -> tuple[list[Sequence], list[int]]:
        """The drawing sequences in order, and for each, its row in the logits."""
        seqs, index = [], []
        for row_index, seq_list in enumerate(r.draw_for for r in batch.rows if r.draw_for):
            seqs += seq_list
            index += [row_index] * len(seq_list)
        return seqs, index

    def _prev_tokens(self, seqs: list[Sequence], device) -> torch.Tensor:
        width = max(s.num_tokens for s in seqs)
        rows = [s.prompt + s.output + [-1] * (width - s.num_tokens) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=device)

    @property
    def fusable(self) -> bool:
        """Whether a compiled decode step may draw itself (`ModelRunner.run(draw=...)`): the
        torch path of `sample`, and no repetition penalty (the step takes no token history)."""
        return (self.backend in (None, "torch", "reference")
                and self.params.repetition_penalty == 1)

    def uniforms(self, seqs: list[Sequence]) -> list[float]:
        """One uniform per drawing sequence, from its own stream (none when greedy)."""
        return [] if self.params.greedy else [s.next_uniform() for s in seqs]

    def __call__(self, batch: Batch, logits: torch.Tensor) -> tuple[list[int], list[float],
                                                                    list[Sequence]]:
        seqs, index = self.draw_index(batch)
        if len(index) != logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(index, device=logits.device))
        p = self.params
        uniform = None if p.greedy else torch.tensor(self.uniforms(seqs), dtype=torch.float64,
                                                     device=logits.device)
        prev = self._prev_tokens(seqs, logits.device) if p.repetition_penalty != 1 else None
        tokens, logprobs = sample(logits, temperature=p.temperature, top_k=p.top_k,
                                  top_p=p.top_p, repetition_penalty=p.repetition_penalty,
                                  prev_tokens=prev, uniform=uniform, backend=self.backend)
        return (*to_host(tokens, logprobs), seqs)


def to_host(tokens: torch.Tensor, logprobs: torch.Tensor) -> tuple[list[int], list[float]]:
    both = torch.stack([tokens.double(), logprobs.double()]).cpu()  # one host sync
    return [int(t) for t in both[0].tolist()], both[1].tolist()

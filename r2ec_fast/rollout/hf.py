"""The `Rollout` interface and its first implementation, HF `generate` (DESIGN §5 step 1).

A rollout turns tokenised prompts into completions: G sampled reasoning chains per prompt for
training, one greedy chain for evaluation. A completion stops at the answer-start marker (the
item action happens at that token: its final hidden state scores the catalog), at the end of
turn, or at `max_new_tokens`. `Trajectory` records which tokens were sampled (they carry the
token loss) and whether the marker had to be appended.

Sampling is seeded per (step, user): the G samples of a user do not depend on which other
users share the batch, or on how users are spread over processes. `HFRollout` generates one
prompt at a time (no padding, so the seeds mean the same on every batch); the paged engine
(`engine.EngineRollout`) is the trainer's default, this one stays selectable
(`rollout.engine = "hf"`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Trajectory:
    prompt: list[int]
    completion: list[int]  # ends with the answer marker
    sampled: int  # how many leading completion tokens were sampled (the rest appended)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.completion


class Rollout(Protocol):
    def sample(self, prompts: list[list[int]], seeds: list[int], group_size: int
               ) -> list[Trajectory]:
        """`group_size` sampled trajectories per prompt, grouped: prompt i's at rows
        i*G .. i*G + G - 1."""

    def greedy(self, prompts: list[list[int]]) -> list[Trajectory]:
        """One greedy trajectory per prompt."""


def finish(prompt: list[int], generated: list[int], answer_id: int, stop_ids: set[int],
           pad_id: int | None) -> Trajectory:
    """Cut `generated` at its first stop token. A generated answer marker is kept (it was
    sampled); otherwise (end of turn, length limit) the marker is appended, unsampled."""
    for k, tok in enumerate(generated):
        if tok == answer_id:
            return Trajectory(prompt, generated[:k + 1], k + 1)
        if tok in stop_ids:
            return Trajectory(prompt, generated[:k] + [answer_id], k)
    if pad_id is not None and pad_id not in stop_ids:
        while generated and generated[-1] == pad_id:  # generate pads finished sequences
            generated = generated[:-1]
    return Trajectory(prompt, generated + [answer_id], len(generated))


def stop_ids_of(model, answer_id: int) -> set[int]:
    """End-of-turn ids that end a completion besides the answer marker: the generation
    config's eos ids and the tokenizer's eos."""
    eos = model.lm.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if model.tokenizer.eos_token_id is not None:
        eos.append(model.tokenizer.eos_token_id)
    return set(eos) - {answer_id}


class HFRollout:
    """`Rollout` through `model.lm.generate` with the HF logits processors of DESIGN §4.5
    (temperature, top_k, top_p)."""

    def __init__(self, model, answer_id: int, temperature: float = 2.0, top_k: int = 200,
                 top_p: float = 1.0, max_new_tokens: int = 300,
                 eval_max_new_tokens: int | None = None):
        from transformers import GenerationConfig

        self.model = model
        self.answer_id = answer_id
        self.stop_ids = stop_ids_of(model, answer_id)
        self.pad_id = model.tokenizer.pad_token_id
        common = dict(eos_token_id=[answer_id, *sorted(self.stop_ids)], pad_token_id=self.pad_id,
                      bos_token_id=None, use_cache=True)
        self.sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None,
                             top_p=top_p, max_new_tokens=max_new_tokens, **common)
        self.greedy_config = dict(do_sample=False,
                                  max_new_tokens=eval_max_new_tokens or max_new_tokens, **common)
        self._config_class = GenerationConfig

    def _generate(self, prompt: list[int], settings: dict, count: int) -> list[list[int]]:
        ids = torch.tensor([prompt], device=self.model.device)
        config = self._config_class(**settings, num_return_sequences=count)
        out = self.model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     generation_config=config)
        return [row[len(prompt):].tolist() for row in out]

    @torch.no_grad()
    def sample(self, prompts, seeds, group_size):
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for prompt, seed in zip(prompts, seeds):
                devices = [self.model.device] if self.model.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    gens = self._generate(prompt, self.sampling, group_size)
                out += [finish(prompt, g, self.answer_id, self.stop_ids, self.pad_id)
                        for g in gens]
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def greedy(self, prompts):
        was_training = self.model.training
        self.model.eval()
        try:
            return [finish(p, self._generate(p, self.greedy_config, 1)[0], self.answer_id,
                           self.stop_ids, self.pad_id) for p in prompts]
        finally:
            self.model.train(was_training)


class NoReasoning:
    """The paper's "w/o reasoning" variant: the answer marker right after the prompt."""

    def __init__(self, answer_id: int):
        self.answer_id = answer_id

    def sample(self, prompts, seeds, group_size):
        return [Trajectory(p, [self.answer_id], 0) for p in prompts for _ in range(group_size)]

    def greedy(self, prompts):
        return [Trajectory(p, [self.answer_id], 0) for p in prompts]

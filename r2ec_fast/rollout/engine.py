"""`RolloutEngine`: generation inside the training process, from the live parameters.

    engine = RolloutEngine(model, block_size=16, kv_budget="2GiB")
    outs = engine.generate(prompt_token_ids, SamplingParams(n=4, temperature=1.0, ...))
    outs[i].samples[j].token_ids / .logprobs / .finish_reason

It ties the roles together: `Scheduler` (continuous batching under the KV budget, preemption),
`BlockManager` (a group's prompt blocks held once by its G samples), `ModelRunner` (the model's
own decoder over the paged cache) and `Sampler`. The model is used as it is at the call (LoRA
adapters included): nothing is copied, so there is no weight reload between training steps.
The KV cache is allocated per call, sized to what the call can need at most, within the budget;
when allocating it runs out of memory it is halved (down to what one group needs at its longest)
and the scheduler preempts within the smaller cache instead of the call failing.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..memory import free_memory, is_out_of_memory
from .block_manager import BlockManager
from .graph_runner import compiled_step
from .model_runner import ModelRunner, text_config
from .sampler import Sampler, to_host
from .scheduler import Scheduler
from .sequence import Group, SamplingParams, Sequence, Status, sample_generator

__all__ = ["RolloutEngine", "SamplingParams", "RequestOutput", "SampleOutput", "parse_budget"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}
_BUDGET_HELP = "bytes (int), a size like '2GiB' or a block count like '512 blocks'"


def parse_budget(value: int | str) -> tuple[int, str]:
    """(amount, "bytes" | "blocks") from an int (bytes) or a string: "512MiB", "2 GiB",
    "1.5GB", "512 blocks"."""
    if isinstance(value, bool):
        raise ValueError(f"kv_budget must be {_BUDGET_HELP}, got {value!r}")
    if isinstance(value, int):
        return value, "bytes"
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if unit in ("block", "blocks") and match.group(1).isdigit():
        return int(match.group(1)), "blocks"
    if unit not in _UNITS:
        raise ValueError(f"kv_budget must be {_BUDGET_HELP}, got {value!r}")
    return int(float(match.group(1)) * _UNITS[unit]), "bytes"


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float]  # of each token under the distribution it was drawn from
    finish_reason: str  # "stop" (a stop token, kept as the last id) or "length"


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    samples: list[SampleOutput]


@dataclass
class EngineStats:
    """What the last `generate` did: blocks, preemptions, steps and tokens."""

    num_blocks: int = 0
    block_size: int = 0
    peak_blocks: int = 0
    # the most blocks that held prompt positions at once (measured after each prefill and the
    # decode that follows it, when partial blocks are copied), and what one copy of the
    # prompt per sample would have held at that moment
    prompt_blocks: int = 0
    prompt_blocks_per_copy: int = 0
    preemptions: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    graph_captures: int = 0  # decode batch sizes captured as CUDA graphs
    cache_shrinks: int = 0  # halvings of the cache after allocating it ran out of memory


class RolloutEngine:
    def __init__(self, model, block_size: int = 16, kv_budget: int | str | None = None,
                 max_num_seqs: int = 256, max_prefill_tokens: int = 8192,
                 attn_backend: str | None = None, sample_backend: str | None = None,
                 decode_graphs: bool | None = None, fuse_norms: bool | None = None,
                 cascade: bool | None = None, compile_decode: bool = False,
                 progress: bool = False):
        """model: a `DualHeadModel`. kv_budget: the most the KV cache may take, in bytes (an
        int, or "2GiB") or in blocks ("512 blocks"); default: on CUDA half of the free device
        memory at each call, on CPU 2 GiB.
        The cache never takes more than the call can use. attn_backend / sample_backend: force
        an implementation of the paged-attention / sampling ops (default: automatic).
        decode_graphs: replay decode steps from CUDA graphs, one per padded batch size
        (`graph_runner.py`; default: on when the model is on CUDA); on CPU, True runs the same
        padded static decode path eagerly. fuse_norms: the model's RMSNorms as one fused kernel
        each during generation (`r2ec_fast.ops.rms_norm`; default: on CUDA, where the kernel
        is Triton; on CPU True routes them through the op's torch path, HF's own arithmetic).
        cascade: give decode steps the shared-prefix hint, so that a group's prompt pages are
        read once per group rather than once per sample (default: on CUDA, where the triton
        attention uses it; the torch attention ignores it and on CPU checks it).
        compile_decode: decode steps through `torch.compile` (inductor fuses the HF layers'
        elementwise ops; on CUDA inside the graphs), padded to the graph sizes on CPU too,
        where the step also draws the tokens (unless repetition_penalty != 1). One compile
        serves every batch size and width (sizes 1 and 2 are specialised): 10-75 s on the
        first call on a 2-core CPU; the compiled step is kept by the engine for later calls.
        Incompatible with fuse_norms=True."""
        for name, value in (("decode_graphs", decode_graphs), ("fuse_norms", fuse_norms),
                            ("cascade", cascade)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True, False or None, got {value!r}")
        if not isinstance(compile_decode, bool):
            raise ValueError(f"compile_decode must be True or False, got {compile_decode!r}")
        if compile_decode and fuse_norms:
            raise ValueError("compile_decode fuses the norms itself: leave fuse_norms unset "
                             "(the patched norm forwards would recompile every call)")
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.model = model
        self.block_size = block_size
        self.kv_budget = None if kv_budget is None else parse_budget(kv_budget)
        if self.kv_budget is not None and self.kv_budget[0] < 1:
            raise ValueError(f"kv_budget must be positive, got {kv_budget!r}")
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.attn_backend, self.sample_backend = attn_backend, sample_backend
        self.decode_graphs, self.fuse_norms, self.cascade = decode_graphs, fuse_norms, cascade
        self.compile_decode = compile_decode
        self._step = None  # the compiled decode step, made at the first call that needs it
        self.progress = progress
        self.stats = EngineStats()

    # ---------------------------------------------------------------- sizing

    def _budget_blocks(self) -> int:
        per_block = ModelRunner.bytes_per_block(self.model, self.block_size)
        if self.kv_budget is not None and self.kv_budget[1] == "blocks":
            return self.kv_budget[0]
        budget = None if self.kv_budget is None else self.kv_budget[0]
        if budget is None:
            if self.model.device.type == "cuda":
                budget = torch.cuda.mem_get_info(self.model.device)[0] // 2
            else:
                budget = 2 * 2**30
        return budget // per_block

    def _worst_case_blocks(self, prompt_len: int, params: SamplingParams) -> int:
        """Blocks one group can hold at most: its prompt's full blocks once, the rest per
        sample."""
        full = prompt_len // self.block_size
        per_sample = math.ceil((prompt_len + params.max_new_tokens) / self.block_size) - full
        return full + params.n * per_sample

    def _check(self, prompts, params: SamplingParams, seeds) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(prompts, (list, tuple)):
            raise TypeError("prompt_token_ids must be a list of token-id lists")
        vocab = self.model.lm_head_weight.shape[0]
        limit = getattr(text_config(self.model), "max_position_embeddings", None)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
            if limit is not None and len(p) + params.max_new_tokens > limit:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens "
                                 f"{params.max_new_tokens} exceed the model's "
                                 f"max_position_embeddings {limit}")
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[RequestOutput]:
        """Per prompt, `params.n` samples. seeds: one per prompt (default: params.seed + the
        prompt's index); sample j of a prompt draws from its own stream of (seed, j)."""
        self._check(prompt_token_ids, params, seeds)
        if not prompt_token_ids:
            return []
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        seeds = [params.seed + i for i in range(len(prompts))] if seeds is None else seeds
        worst = [self._worst_case_blocks(len(p), params) for p in prompts]
        budget = self._budget_blocks()
        if max(worst) > budget:
            i = max(range(len(prompts)), key=worst.__getitem__)
            raise ValueError(
                f"the KV budget holds {budget} blocks of {self.block_size} tokens, but prompt {i} "
                f"({len(prompts[i])} tokens, n={params.n}, max_new_tokens="
                f"{params.max_new_tokens}) can need {worst[i]}: raise kv_budget or lower n / "
                "max_new_tokens")
        # enough for every group at its longest plus the scheduler's headroom of a block per
        # sequence: then a roomy budget admits everything at once and never preempts
        num_blocks = min(budget, sum(worst) + len(prompts) * params.n)
        cuda = self.model.device.type == "cuda"
        graphs = cuda if self.decode_graphs is None else self.decode_graphs
        width = max(math.ceil((len(p) + params.max_new_tokens) / self.block_size)
                    for p in prompts)
        if self.compile_decode and self._step is None:
            self._step = compiled_step()
        fuse = (cuda and not self.compile_decode) if self.fuse_norms is None else self.fuse_norms
        runner = ModelRunner(self.model, self.block_size, num_blocks, self.attn_backend,
                             graph_width=width if graphs or self.compile_decode else None,
                             capture=graphs and cuda, fuse_norms=fuse,
                             group_size=params.n if (cuda if self.cascade is None
                                                     else self.cascade) else 0,
                             step=self._step if self.compile_decode else None)
        sampler = Sampler(params, self.sample_backend)
        groups = self._groups(prompts, seeds, params)
        num_blocks, shrinks = self._allocate(runner, max(worst))
        blocks = BlockManager(num_blocks, self.block_size)
        scheduler = Scheduler(blocks, self.max_num_seqs, self.max_prefill_tokens)
        for g in groups:
            scheduler.add(g)
        self.stats = EngineStats(num_blocks=num_blocks, block_size=self.block_size,
                                 cache_shrinks=shrinks)
        was_training = self.model.training
        self.model.eval()
        try:
            with runner.attention():
                self._loop(scheduler, runner, sampler, params, groups)
        finally:
            if runner.graphs is not None:
                self.stats.graph_captures = runner.graphs.captures
                if runner.graphs.compile_failed:  # warned once: no more tries
                    self.compile_decode, self._step = False, None
            runner.release()
            self.model.train(was_training)
        self.stats.peak_blocks = blocks.peak_used
        self.stats.preemptions = scheduler.num_preemptions
        return [RequestOutput(g.prompt, [SampleOutput(s.output, s.logprobs, s.finish_reason)
                                         for s in g.samples]) for g in groups]

    @staticmethod
    def _allocate(runner: ModelRunner, floor: int) -> tuple[int, int]:
        """Allocate the runner's cache; when that runs out of memory, halve it (down to `floor`,
        what one group needs at its longest) and let the scheduler preempt within it. Returns
        (blocks, halvings)."""
        shrinks = 0
        while True:
            try:
                runner.allocate()
                return runner.num_blocks, shrinks
            except Exception as exc:  # only out-of-memory is answered; the rest propagates
                if not is_out_of_memory(exc) or runner.num_blocks <= floor:
                    raise
            runner.release()
            free_memory()
            runner.resize(max(floor, runner.num_blocks // 2))
            shrinks += 1

    @staticmethod
    def _groups(prompts, seeds, params) -> list[Group]:
        groups, seq_id = [], 0
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            group = Group(i, prompt)
            for j in range(params.n):
                group.samples.append(Sequence(seq_id, group, j, sample_generator(int(seed), j)))
                seq_id += 1
            groups.append(group)
        return groups

    def _loop(self, scheduler, runner, sampler, params, groups) -> None:
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(len(g.samples) for g in groups), desc="rollout", unit="seq")
        stop = set(params.stop_token_ids)
        measure = False
        while not scheduler.finished:
            batch = scheduler.schedule()
            fused = sampler.fusable and runner.draws(batch)
            if fused:  # a compiled decode step draws the tokens too
                seqs, _ = sampler.draw_index(batch)
                drawn = runner.run(batch, (sampler.uniforms(seqs), params))
            else:
                logits = runner.run(batch)
            if batch.prefill:
                self.stats.prefill_steps += 1
            else:
                self.stats.decode_steps += 1
            for group in batch.forks:  # the group's prompt blocks pass to its samples
                for seq, table in zip(group.live, scheduler.blocks.fork(group.block_table,
                                                                        len(group.live))):
                    seq.block_table = table
                group.block_table = []
            if batch.prefill or measure:
                self._measure_prompt_blocks(scheduler)
            measure = batch.prefill
            if fused:
                tokens, logprobs = to_host(*drawn)
            elif logits.shape[0]:
                tokens, logprobs, seqs = sampler(batch, logits)
            else:
                continue
            for seq, token, logprob in zip(seqs, tokens, logprobs):
                seq.output.append(token)
                seq.logprobs.append(logprob)
                self.stats.generated_tokens += 1
                if token in stop or len(seq.output) >= params.max_new_tokens:
                    seq.finish_reason = "stop" if token in stop else "length"
                    seq.status = Status.FINISHED
                    scheduler.blocks.release(seq.block_table)
                    seq.block_table = []
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()

    def _measure_prompt_blocks(self, scheduler) -> None:
        held, per_copy = set(), 0
        for g in scheduler.running:
            prompt_blocks = scheduler.blocks.blocks_for(len(g.prompt))
            for s in g.live:
                held.update(s.block_table[:prompt_blocks])
                per_copy += prompt_blocks
        if len(held) > self.stats.prompt_blocks:
            self.stats.prompt_blocks, self.stats.prompt_blocks_per_copy = len(held), per_copy


class EngineRollout:
    """The trainer's `Rollout` (see `hf.py`) through the paged engine: G samples per user drawn
    with the training sampling settings, seeded per (step, user); greedy chains at evaluation.
    Completions are cut at the answer marker (or end of turn) exactly as `HFRollout`'s are."""

    def __init__(self, model, answer_id: int, temperature: float = 2.0, top_k: int = 200,
                 top_p: float = 1.0, max_new_tokens: int = 300,
                 eval_max_new_tokens: int | None = None, **engine_kwargs):
        from .hf import stop_ids_of

        self.model, self.answer_id = model, answer_id
        self.stop_ids = stop_ids_of(model, answer_id)
        self.pad_id = model.tokenizer.pad_token_id
        stops = (answer_id, *sorted(self.stop_ids))
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                             max_new_tokens=max_new_tokens, stop_token_ids=stops)
        self.greedy_params = SamplingParams(n=1, temperature=0.0, stop_token_ids=stops,
                                            max_new_tokens=eval_max_new_tokens or max_new_tokens)
        self.engine = RolloutEngine(model, **engine_kwargs)

    def _trajectories(self, prompts, outs):
        from .hf import finish

        return [finish(p, s.token_ids, self.answer_id, self.stop_ids, None)
                for p, out in zip(prompts, outs) for s in out.samples]

    def sample(self, prompts, seeds, group_size):
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        params = SamplingParams(n=group_size, **self.sampling)
        return self._trajectories(prompts, self.engine.generate(prompts, params, seeds=seeds))

    def greedy(self, prompts):
        return self._trajectories(prompts, self.engine.generate(prompts, self.greedy_params))

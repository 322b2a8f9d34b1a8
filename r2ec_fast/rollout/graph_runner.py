"""Decode steps replayed from CUDA graphs (the launch overhead of eager decoding, DESIGN §4.4).

An eager decode step launches about forty kernels per decoder layer from Python; at Gemma-2-2B's
shape on an H200 that CPU work took 33 ms a step against 11 ms of GPU work (profile in
benchmarks/results/gpu-h200-2026-11-26/rollout-profile.txt). Here each decode batch is padded to
one of a few sizes (`SIZES`) and the decoder's forward for that size is captured once into a
CUDA graph, then replayed with new inputs: one host-to-device copy of the step's metadata and
one graph launch.

Everything the graph reads lives in static buffers: `meta` [size, 5 + width] int64 holds per row
the token, its position, the sequence length after it, its cache slot, its shared-prefix length
(cascade decoding) and the row's block table padded to `width` (the most blocks any sequence
of the call can hold); `members` [size // 2, G] the rows of each shared prefix. The int32 views
the kernels take are made inside the graph. Padding rows write their one key into the spare
block that the runner allocates past the block manager's (`ModelRunner.spare_block`) and attend
to it alone; their outputs are dropped. The paged decode kernels have no host reads and a grid
that depends on shapes only, so they capture as they are; the KV cache tensors, the model's
weights and the graph memory pool are fixed for the graphs' lifetime, which is one `generate`
call (the cache is allocated per call).

Off CUDA (the tests) `capture=False` runs the same padded path eagerly, so the padding and the
metadata layout are tested without a GPU (there `meta` is made fresh each step, as wide as the
step's longest block table).

With a compiled step (`compiled_step`, the engine's compile_decode) and no capture (CPU), the
step is called directly every time: its buffers are marked dynamic so that one compile serves
every size and width; after the first step of a size in a call it runs with Dynamo's guard
evaluation reduced to the guards that tell variants apart (nothing they check changes within
a call); and it can draw the tokens itself (`draws`: `sample`'s torch ops inside the compiled
graph, the uniforms in a static buffer), which saves the sampler's separate dispatches.
"""
from __future__ import annotations

import warnings

import torch

from r2ec_fast.ops.sampling import sample

from .scheduler import Batch, shared_prefixes

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
META = 5  # meta columns before the block table: token, position, length, slot, prefix length


def final_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[R, Vocab] fp32 logits of the lm_head, Gemma-2's final softcap applied (as HF does: the
    product in the model's dtype, the cap in fp32)."""
    logits = torch.nn.functional.linear(hidden, model.lm_head_weight).float()
    cap = model.softcap
    if cap is not None:  # in place: a [R, Vocab] buffer per op was 0.4 ms of a CPU step
        logits = logits.div_(cap).tanh_().mul_(cap)
    return logits


def decode_step(model, cache, meta: torch.Tensor, members: torch.Tensor | None,
                uniform: torch.Tensor | None = None, sampling: tuple | None = None):
    """One padded decode step from the static buffers: [size, Vocab] fp32 logits, or with
    `sampling` = (temperature, top_k, top_p) the draw too (`ops.sampling.sample`'s torch path,
    one uniform per row from `uniform` [size] fp64): (tokens [size], logprobs [size]). A plain
    function of tensors, numbers and the model, so that `torch.compile` can take it whole (no
    graph break on tiny Gemma-2 and Qwen-2)."""
    cache.block_table = meta[:, META:].to(torch.int32)
    cache.cache_seqlens = meta[:, 2].to(torch.int32)
    cache.slot_mapping = meta[:, 3].contiguous()
    cache.cu_seqlens_q = None
    cache.prefix_members = members
    cache.prefix_lens = None if members is None else meta[:, 4].to(torch.int32)
    out = model.decoder()(input_ids=meta[:, 0][None], position_ids=meta[:, 1][None],
                          use_cache=False, paged_kv=cache)
    logits = final_logits(model, out.last_hidden_state[0])
    if sampling is None:
        return logits
    temperature, top_k, top_p = sampling
    return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                  uniform=None if temperature == 0 else uniform, backend="torch")


def padded_size(n: int) -> int:
    """The graph size a batch of n rows runs at: the smallest of SIZES >= n, past them the next
    multiple of 64."""
    for size in SIZES:
        if size >= n:
            return size
    return -(-n // 64) * 64


class _Graph:
    """Static inputs and outputs of one padded batch size (and its graph once captured)."""

    def __init__(self, size: int, width: int, group_size: int, device):
        self.size = size
        self.meta = torch.zeros((size, META + width), dtype=torch.int64, device=device)
        # cascade hint: at most size // 2 prefixes of two or more rows
        self.members = (torch.full((max(1, size // 2), group_size), -1, dtype=torch.int32,
                                   device=device) if group_size > 1 else None)
        self.uniform = torch.full((size,), 0.5, dtype=torch.float64, device=device)
        self.graph = None
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, runner, width: int, capture: bool, step=None):
        """step: `decode_step` or a compiled version of it (`compiled_step`)."""
        self.runner, self.width, self.capture = runner, width, capture
        self.step = step or decode_step
        self.graphs: dict[int, _Graph] = {}
        self.compile_failed = False
        self.pool = None
        self.captures = 0  # graphs captured this call (EngineStats)
        self.guarded: set = set()  # (size, sampling) whose compiled step ran with all guards

    @property
    def draws(self) -> bool:
        """Whether `run` can draw the tokens too: a compiled step run as it is (the draw
        inside CUDA graphs is not implemented)."""
        return self.step is not decode_step and not self.capture

    def run(self, batch: Batch, draw=None):
        """[n, Vocab] fp32 logits of a decode batch's n rows; with draw = (uniforms, params),
        only when `draws`: (tokens [n], logprobs [n]) drawn inside the compiled step."""
        n = len(batch.rows)
        size = padded_size(n)
        g = self.graphs.get(size)
        if g is None:
            g = self.graphs[size] = _Graph(size, self.width, self.runner.group_size,
                                           self.runner.model.device)
            if self.step is not decode_step:
                # one compiled step for every batch size, width and cache size (sizes 1 and
                # 2 aside, which Dynamo specialises): on CPU a rollout whose batch shrinks as
                # samples stop compiled for 52 s instead of 76 s, its steps no slower, and a
                # call with longer prompts or outputs (a bigger cache) compiles nothing new
                cache = self.runner.cache
                for t, dim in ((g.meta, 0), (g.meta, 1), (g.uniform, 0), (g.members, 0),
                               *((c, 0) for c in (*cache.k, *cache.v))):
                    if t is not None:
                        torch._dynamo.maybe_mark_dynamic(t, dim)
        self._fill(g, batch)
        if draw is not None:
            if not self.draws:
                raise RuntimeError("this decode path does not draw (see DecodeGraphs.draws)")
            uniforms, params = draw
            if uniforms:
                g.uniform[:n].copy_(torch.tensor(uniforms, dtype=torch.float64))
            tokens, logprobs = self._forward(g, (params.temperature, params.top_k,
                                                 params.top_p))
            return tokens[:n], logprobs[:n]
        if g.graph is not None:
            g.graph.replay()
        elif self.capture:
            self._capture(g)  # runs this step too (replayed, or eagerly if capture fails)
        else:
            g.logits = self._forward(g)
        return g.logits[:n]

    def _fill(self, g: _Graph, batch: Batch) -> None:
        runner = self.runner
        # only CUDA graphs need `meta` static (they read the buffer they were captured with);
        # otherwise each step gets a fresh one as wide as its longest block table (a dynamic
        # dimension of a compiled step): the compiled torch attention reads whole table rows,
        # so the call's full width would be wasted early on
        static = self.capture
        width = self.width if static else max(len(r.table) for r in batch.rows)
        lens = [0] * len(batch.rows)
        if g.members is not None:
            members, lens = shared_prefixes(batch.rows, runner.block_size, runner.group_size)
            members += [[-1] * runner.group_size] * (g.members.shape[0] - len(members))
            g.members.copy_(torch.tensor(members, dtype=torch.int32))
        rows = []
        for i, r in enumerate(batch.rows):
            if len(r.tokens) != 1 or len(r.table) > self.width:
                raise RuntimeError(f"decode row {i} has {len(r.tokens)} tokens and "
                                   f"{len(r.table)} blocks (graph width {self.width})")
            rows.append([r.tokens[0], r.start, r.start + 1, r.slots[0], lens[i], *r.table,
                         *[0] * (width - len(r.table))])
        # padding rows: token 0 at position 0, written to and read from the spare block
        spare = runner.spare_block
        rows.extend([[0, 0, 1, spare * runner.block_size, 0, spare, *[0] * (width - 1)]]
                    * (g.size - len(rows)))
        if static:
            g.meta.copy_(torch.tensor(rows, dtype=torch.int64))
            return
        g.meta = torch.tensor(rows, dtype=torch.int64, device=g.meta.device)
        if self.step is not decode_step:
            torch._dynamo.maybe_mark_dynamic(g.meta, 0)
            torch._dynamo.maybe_mark_dynamic(g.meta, 1)

    def _forward(self, g: _Graph, sampling: tuple | None = None):
        model, cache = self.runner.model, self.runner.cache
        args = (model, cache, g.meta, g.members, g.uniform, sampling)
        if self.step is decode_step:
            return decode_step(*args)
        try:
            if (g.size, sampling) not in self.guarded:
                out = self.step(*args)
                self.guarded.add((g.size, sampling))
                return out
            # Dynamo's guards (about 0.6 ms a step for the tiny model on CPU, more per layer)
            # check the model's modules and the call's objects, none of which change within a
            # `generate` call, and this size passed them all earlier in it: evaluate only the
            # guards that tell the compiled variants apart, which select the same variant
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self.step(*args)
        except Exception as exc:  # noqa: BLE001 - a compiler that fails: decode uncompiled
            # (compilation fails before anything runs, so the step is redone from scratch)
            warnings.warn(f"rollout: the compiled decode step failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); decoding "
                          "uncompiled", RuntimeWarning, stacklevel=3)
            self.step = decode_step
            self.compile_failed = True
            return decode_step(*args)

    def _capture(self, g: _Graph) -> None:
        """Warm up on a side stream (the real step: it writes this step's K/V, which the replay
        writes again identically; a compiled step compiles here), capture, replay. A capture
        that fails (an op of the model that reads the device from the host, say) leaves this
        call on the eager path."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            g.logits = self._forward(g)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(g)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: stay eager
            warnings.warn(f"rollout: CUDA graph capture failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); decoding eagerly",
                          RuntimeWarning, stacklevel=3)
            self.capture = False
            torch.cuda.synchronize()
            return
        self.pool = graph.pool()
        g.graph, g.logits = graph, logits
        self.captures += 1
        graph.replay()


# inductor inlines a cheap pointwise producer into each of its consumers unless its body has more
# than this many ops (default 50 on CPU): at 50 the rotated query was recomputed for every key
# of the attention's reduction (cos/sin per key); at 10 it is stored once (a CPU decode step of
# the tiny model measured 25% faster)
COMPILE_OPTIONS = {"realize_cpu_opcount_threshold": 10}


def compiled_step():
    """`decode_step` under `torch.compile` (inductor): the HF layers' elementwise ops fused. Its
    guards recompile it for a new batch size or cache size until those become dynamic
    (torch's automatic dynamic shapes); a compiler that fails falls back to `decode_step`."""
    return torch.compile(decode_step, options=COMPILE_OPTIONS)

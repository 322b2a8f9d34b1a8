"""Data-parallel RecPO under `torchrun`: process group, FSDP2 sharding, cross-rank gathers.

`r2ec-fast train` run as `torchrun --nproc_per_node N -m r2ec_fast.cli train ...` trains on
N processes (gloo on CPU, nccl on CUDA); run plainly it is one process and none of this
starts. What each piece does, and why:

- `init_distributed` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and returns a
  `DistContext` (rank, world size, device) that the trainer passes around explicitly;
  `DistContext.single()` is the one-process context, whose helpers are identities.
- `parallelize` applies activation checkpointing, then `fully_shard` per decoder block, then
  the embedding / lm_head group, the decoder, and the root (the HF model), all with one
  explicit `MixedPrecisionPolicy`. The trainer calls the decoder on its own (no lm_head
  logits) and reads the lm_head weight outside any forward (the fused token loss), so:
  the embedding and the lm_head are one FSDP group (they are tied in Gemma-2 and Qwen-2.5, and
  FSDP2 wants tied weights in one group) that is not resharded after forward; the decoder
  (final norm) is a group of its own, so a decoder-only call unshards it; and one token is
  run through the root at set-up, because FSDP2 makes the first module to run forward its
  root and the first forward the trainer runs is decoder-only.
- Gradients: FSDP2 reduce-scatters with a divide factor of 1 (a sum), because the step's
  losses are already normalised by global counts (sampled tokens and trajectories of all
  ranks), so the summed gradient is the one-process gradient of the same global batch.
- `ShardPlan.gathered()`: the rollout, the catalog encoding and evaluation run with every
  parameter all-gathered once and kept (reshard_after_forward off) until the block ends.
  Generation runs one forward per new token; with per-forward all-gathers that would be
  one all-gather of the whole model per decode step, and, worse, ranks whose users stop at
  different lengths would issue different numbers of collectives and hang. Gathered, the
  forwards issue no collectives at all, so every rank runs its own users at its own pace.
  The cost is the full parameters in memory during these phases (as in the reference).
- `gather_rows` is an autograd all-gather: the in-batch item loss scores every trajectory
  against the targets of all ranks (the reference shares in-batch negatives across
  processes); its backward all-reduces the gradient and keeps this rank's rows.
- Checkpoints hold full (unsharded) state dicts written by rank 0, in exactly the format of
  a one-process run (`checkpoint.save_checkpoint`), so a run resumes on any number of
  processes; `full_state` / `sharded_loaders` adapt the FSDP model and optimizer to it.
"""
from __future__ import annotations

import gc
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


# ----------------------------------------------------------------------------- context

@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. world_size 1: no process group, identity helpers."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> "DistContext":
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(device=torch.device(device))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. builds missing data or a model folder), the other
        ranks after it has finished (and then find it built)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def split(self, n: int) -> slice:
        """This rank's contiguous share of n things (sizes differ by at most one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # ------------------------------------------------------------------ reductions

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64), one all-reduce; the values themselves in
        one process."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_int(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def gather_cat(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation in rank order of every rank's x (same shape everywhere), no grad."""
        if not self.enabled:
            return x
        x = x.detach().contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    def gather_varlen(self, x: torch.Tensor) -> torch.Tensor:
        """Like gather_cat, for tensors whose first dimension differs between ranks."""
        if not self.enabled:
            return x
        counts = self.gather_cat(torch.tensor([x.shape[0]], device=x.device)).tolist()
        if max(counts) == 0:
            return x
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = self.gather_cat(padded).split(max(counts))
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def check_same(self, what: str, x: torch.Tensor) -> None:
        """Raise if x differs between ranks (a fingerprint of its rows, not a bitwise
        comparison: float64 sums of each row, plain and position-weighted)."""
        if not self.enabled:
            return
        rows = x.reshape(x.shape[0], -1).sum(1, dtype=torch.float64)  # [V]
        position = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
        mine = torch.stack([rows.sum(), (rows * position).sum()])
        every = self.gather_cat(mine[None])  # [world, 2]
        if not bool((every == every[0]).all()):
            raise RuntimeError(f"{what} differs between ranks (row-sum fingerprints "
                               f"{every.tolist()}); every rank must apply the same updates")

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Autograd all-gather of [b, d] rows (b equal on every rank) -> [world * b, d]."""
        if not self.enabled:
            return x
        return _GatherRows.apply(x, self.rank, self.world_size)


class _GatherRows(torch.autograd.Function):
    """Forward: all-gather. Backward: every rank's loss read every rank's rows, so the
    gradient of this rank's rows is the sum over ranks of their gradients for them; an
    all-reduce then a slice (the rows are small, and gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, rank: int, world_size: int):
        ctx.rank, ctx.rows = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        lo = ctx.rank * ctx.rows
        return grad[lo:lo + ctx.rows], None, None


def init_distributed(device: str | None = None) -> DistContext:
    """The context of a torchrun-launched process (the process group initialised: nccl on
    CUDA, gloo on CPU), or `DistContext.single()` when WORLD_SIZE is unset or 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext.single(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available()
                                                       else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device(kind)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"process group (rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}) disagrees with RANK={rank}, "
                           f"WORLD_SIZE={world_size}")
    return DistContext(rank, world_size, local_rank, where)


def close_distributed(ctx: DistContext, wait: bool = True) -> None:
    """Destroy the process group; with wait (the ranks finished normally) after a barrier, so
    that no rank tears its gloo/NCCL threads down while a peer is still talking to it. After
    an error, no barrier: a peer may never arrive.

    Call it once the sharded model and its optimizer are gone (return from the function that
    holds them first): FSDP2's modules keep the process group alive, and a group destroyed
    only at interpreter exit aborts the process now and then ("terminate called without an
    active exception": twice in CI, from a worker that still held its model here). The
    garbage collection frees what reference cycles still hold while the interpreter is up."""
    if ctx.enabled and dist.is_initialized():
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


# ----------------------------------------------------------------------------- FSDP2

@dataclass
class ShardPlan:
    """What `parallelize` did: every FSDP module with its reshard_after_forward (children
    first, the root last) and the module holding the lm_head weight. Empty in one process."""

    modules: list[tuple[nn.Module, bool]] = field(default_factory=list)
    head: nn.Module | None = None

    @contextmanager
    def gathered(self):
        """Every parameter all-gathered once for the block (no collectives inside it), then
        resharded: for generation, catalog encoding and evaluation (see the module doc)."""
        if not self.modules:
            yield
            return
        for module, _ in self.modules:
            module.set_reshard_after_forward(False, recurse=False)
        for module, _ in self.modules:
            module.unshard()
        try:
            yield
        finally:
            for module, reshard in self.modules:
                module.reshard()
                module.set_reshard_after_forward(reshard, recurse=False)

    def gather_head(self) -> None:
        """Make the lm_head weight the full tensor before the token loss reads it outside a
        forward (a no-op after a decoder forward, since its group keeps it gathered then)."""
        if self.head is not None:
            self.head.unshard()


def _blocks(decoder: nn.Module) -> nn.ModuleList:
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot find the decoder blocks of {type(decoder).__name__} (expected "
                        "a `layers` ModuleList, as in HF Gemma-2 / Qwen-2 / Llama)")
    return layers


def _checkpoint_blocks(lm: nn.Module) -> None:
    """HF's activation checkpointing of every decoder block, non-reentrant (HF's default in
    transformers 5, and the kind FSDP2's hooks compose with)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # its name in transformers 5.24
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # the older name (older transformers; peft wrappers)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def parallelize(model, ctx: DistContext, *, activation_checkpointing: bool = False,
                param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype = torch.float32) -> ShardPlan:
    """Activation checkpointing (HF's, per decoder block), then FSDP2 over ctx's ranks:
    `fully_shard` per decoder block, then the embedding + lm_head, the decoder, the root.

    Mixed precision: parameters are all-gathered and computed in `param_dtype` (default:
    the dtype they were loaded in: bf16 on CUDA, fp32 on CPU), gradients reduced in
    `reduce_dtype` (fp32). One process: only the checkpointing, and an empty plan."""
    lm = model.lm
    if activation_checkpointing:
        _checkpoint_blocks(lm)
    if not ctx.enabled:
        return ShardPlan()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype or model.dtype,
                                  reduce_dtype=reduce_dtype)
    plan = ShardPlan()

    def shard(modules, reshard_after_forward: bool):
        fully_shard(modules, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
        first = modules[0] if isinstance(modules, list) else modules
        plan.modules.append((first, reshard_after_forward))
        return first

    decoder = model.decoder()
    for block in _blocks(decoder):
        shard(block, True)
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head.weight is embed.weight:  # tied: one group, kept gathered after forward
        plan.head = shard([embed, head], False)
    else:
        shard(embed, True)
        plan.head = shard(head, False)
    shard(decoder, True)  # the final norm (and anything else outside the blocks)
    shard(lm, False)  # the root (FSDP2 keeps a root gathered after forward anyway)
    for module, _ in plan.modules:
        # the losses are normalised by global counts: sum the ranks' gradients, not average;
        # as a plain SUM reduce-scatter (gloo has no PreMulSum, and a factor of 1 needs none)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    # FSDP2's root is the first module to run forward; make it the HF model, not a block
    with torch.no_grad():
        lm(input_ids=torch.zeros((1, 1), dtype=torch.long, device=ctx.device), use_cache=False)
    for module, _ in plan.modules:
        module.reshard()
    return plan


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for plain or FSDP2 (DTensor) gradients: the total
    norm of sharded gradients is a partial sum over ranks; it is completed before clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ----------------------------------------------------------------------------- item table

def encode_items_sharded(model, items, category: str, config, ctx: DistContext,
                         progress: bool = False):
    """`model.encode_items` split over ranks: the same length-sorted budget batches as one
    process (so every row is computed in the same batch, hence the same numbers), batch k
    on rank k mod world; rows are all-gathered so that every rank holds the whole, identical
    table. Call inside `ShardPlan.gathered()` (ranks run different numbers of forwards)."""
    from r2ec_fast.model.encode import (
        DEFAULT_TOKEN_BUDGET, item_texts, iter_hidden, make_batches, tokenize_texts,
    )
    from r2ec_fast.ops.item_table import ItemTable

    dtype = torch.bfloat16 if model.device.type == "cuda" else torch.float32
    token_ids = tokenize_texts(model.tokenizer, item_texts(model.tokenizer, items, category,
                                                          config))
    batches = make_batches([len(t) for t in token_ids], "budget", DEFAULT_TOKEN_BUDGET)
    ids, rows = [], []
    for batch, hidden in iter_hidden(model, token_ids, batches[ctx.rank::ctx.world_size],
                                     progress, desc="encode items"):
        ids += batch
        rows.append(ItemTable(hidden, similarity="cosine", dtype=dtype).weight)  # prepared
    mine = torch.cat(rows) if rows else torch.zeros((0, model.hidden_size), dtype=dtype,
                                                      device=model.device)
    all_ids = ctx.gather_varlen(torch.tensor(ids, dtype=torch.long, device=model.device))
    all_rows = ctx.gather_varlen(mine)
    table = ItemTable(torch.zeros(items.num_items + 1, model.hidden_size, device=model.device),
                      similarity="cosine", dtype=dtype)
    table.weight[all_ids + 1] = all_rows  # item id = index + 1; rows already normalised
    model.item_table = table
    return table


# ----------------------------------------------------------------------------- checkpoints

class FullModelState:
    """What `checkpoint.save_checkpoint` reads from a model (`state_dict()`, and the trainable
    `named_parameters` for adapter checkpoints), served from gathered full CPU tensors."""

    def __init__(self, weights: dict[str, torch.Tensor], trainable: list[str]):
        self.weights, self.trainable = weights, trainable

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights

    def named_parameters(self, remove_duplicate: bool = True):
        for name in self.trainable:
            yield name, nn.Parameter(self.weights[name], requires_grad=True)


class FullOptimizerState:
    """What save_checkpoint reads from an optimizer: `state_dict()` in torch's own format
    (parameters numbered in the optimizer's order), as a one-process run writes it."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _param_names(lm: nn.Module, optimizer) -> list[str]:
    """The FQN of each optimizer parameter, in the optimizer's numbering."""
    names = {id(p): n for n, p in lm.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_index(fqn_state: dict, names: list[str]) -> dict:
    """A full optimizer state dict keyed by parameter FQN (torch.distributed.checkpoint's
    form) in torch's own form: parameters numbered as in `names` (the optimizer's order)."""
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in fqn_state["param_groups"]]
    return {"state": {index[n]: s for n, s in fqn_state["state"].items()},
            "param_groups": groups}


def optimizer_state_by_name(numbered: dict, names: list[str]) -> dict:
    """The inverse of `optimizer_state_by_index`."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in numbered["param_groups"]]
    return {"state": {names[int(i)]: s for i, s in numbered["state"].items()},
            "param_groups": groups}


def full_state(lm: nn.Module, optimizer, ctx: DistContext, adapter_only: bool = False):
    """(FullModelState, FullOptimizerState) of a sharded model: collective (every rank must
    call it); the full tensors land on rank 0's CPU, other ranks get (None, None)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                               ignore_frozen_params=adapter_only)
    weights = get_model_state_dict(lm, options=options)
    optim = get_optimizer_state_dict(lm, optimizer, options=options)
    if not ctx.is_main:
        return None, None
    first: dict[int, str] = {}  # tied names (one parameter) share one tensor, as in
    for name, t in lm.state_dict(keep_vars=True).items():  # lm.state_dict(): saved once
        twin = first.setdefault(id(t), name)
        if twin != name and twin in weights:
            weights[name] = weights[twin]
    trainable = [n for n, p in lm.named_parameters(remove_duplicate=False) if p.requires_grad]
    if adapter_only:
        weights = {n: weights[n] for n in trainable}
    return (FullModelState(weights, trainable),
            FullOptimizerState(optimizer_state_by_index(optim, _param_names(lm, optimizer))))


class _ShardedModelLoader:
    """What `checkpoint.load_checkpoint` needs from a model, for an FSDP2-sharded one: the
    full shapes (DTensor shapes are global) and a load that scatters full tensors."""

    def __init__(self, lm: nn.Module):
        self.lm = lm

    def state_dict(self):
        return self.lm.state_dict()

    def named_parameters(self, remove_duplicate: bool = True):
        return self.lm.named_parameters(remove_duplicate=remove_duplicate)

    def load_state_dict(self, weights: dict, strict: bool = True):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict,
        )

        set_model_state_dict(self.lm, weights,
                             options=StateDictOptions(full_state_dict=True, strict=strict))


class _ShardedOptimizerLoader:
    """What load_checkpoint needs from an optimizer over FSDP2 parameters: a load of the
    numbered full state (as saved) that keeps this rank's shard of each tensor."""

    def __init__(self, lm: nn.Module, optimizer):
        self.lm, self.optimizer = lm, optimizer

    def load_state_dict(self, numbered: dict):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_optimizer_state_dict,
        )

        named = optimizer_state_by_name(numbered, _param_names(self.lm, self.optimizer))
        set_optimizer_state_dict(self.lm, self.optimizer, named,
                                 options=StateDictOptions(full_state_dict=True))


def sharded_loaders(lm: nn.Module, optimizer, ctx: DistContext):
    """(model, optimizer) arguments for `checkpoint.load_checkpoint`: the objects themselves
    in one process, loaders that shard the full checkpoint tensors under FSDP2."""
    if not ctx.enabled:
        return lm, optimizer
    return _ShardedModelLoader(lm), _ShardedOptimizerLoader(lm, optimizer)


def weighted_means(means: dict, count: int, ctx: DistContext) -> dict:
    """Per-rank results (means over `count` users; integers are counts) combined over ranks:
    each float key becomes sum(mean * count) / sum(count), each int key the sum. One process:
    `means` as it is."""
    if not ctx.enabled:
        return means
    floats = [k for k, v in means.items() if isinstance(v, float)]
    ints = [k for k, v in means.items() if isinstance(v, int) and not isinstance(v, bool)]
    values = [means[k] * count if count else 0.0 for k in floats]
    totals = ctx.sum_floats(values + [float(means[k]) for k in ints] + [float(count)])
    n = totals[-1]
    out = dict(means)
    out.update({k: (t / n if n else math.nan) for k, t in zip(floats, totals)})
    out.update({k: int(t) for k, t in zip(ints, totals[len(floats):])})
    return out

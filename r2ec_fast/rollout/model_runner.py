"""Model runner: the `DualHeadModel`'s own decoder, with attention routed to the paged kernels.

Nothing of the model is re-implemented or copied: the runner calls the HF decoder (embeddings,
rotary positions, layers, final norm, LoRA adapters when peft wraps it) on the packed tokens of a
batch, with the model's attention implementation switched to `ATTN_NAME` for the duration of
the call. That name is registered in transformers' attention-backend registry
(`AttentionInterface`, DESIGN §4.4): HF hands the function each layer's rotated q/k/v and its
`scaling`, `softcap` and `sliding_window` (Gemma-2's query_pre_attn_scalar, attention softcap
50 and alternate sliding layers come through unchanged), plus every extra keyword argument of
the forward: here `paged_kv`, the `PagedKVCache` that owns the per-layer cache tensors and this
step's block tables and slot mapping. The function writes k/v into the cache and attends over
it through `r2ec_fast.ops.paged_attention`.

HF builds no attention mask for a name it does not know (it gets `attention_mask=None`); the
paged ops apply causal and sliding-window masking themselves.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from r2ec_fast.ops.paged_attention import decode_attention, prefill_attention
from r2ec_fast.ops.rms_norm import fused_rms_norms

from .graph_runner import DecodeGraphs, final_logits
from .scheduler import Batch, shared_prefixes

ATTN_NAME = "r2ec_paged"


@dataclass
class PagedKVCache:
    """Per-layer K/V blocks and the metadata of the step being run (DESIGN §4.4 layout)."""

    k: list[torch.Tensor]  # per layer [num_blocks, block_size, H_kv, D]
    v: list[torch.Tensor]
    block_table: torch.Tensor | None = None  # [B, max_blocks] int32
    cache_seqlens: torch.Tensor | None = None  # [B] int32, after this step's tokens
    slot_mapping: torch.Tensor | None = None  # [T]
    cu_seqlens_q: torch.Tensor | None = None  # [B + 1] int32; None on decode steps
    # decode steps, cascade: rows sharing prompt pages (`shared_prefixes`); None: no hint
    prefix_members: torch.Tensor | None = None  # [P, G] int32
    prefix_lens: torch.Tensor | None = None  # [B] int32
    backend: str | None = None

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.k[0].device)
        dst = torch.tensor([c[1] for c in copies], device=self.k[0].device)
        for cache in (*self.k, *self.v):
            cache[dst] = cache[src]


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None,
                            dropout=0.0, sliding_window=None, softcap=None, paged_kv=None,
                            **kwargs):
    """The `AttentionInterface` function: query [1, H_q, T, D], key/value [1, H_kv, T, D]
    (one packed row) -> ([1, T, H_q, D], None)."""
    if paged_kv is None:
        raise RuntimeError(f"attention implementation {ATTN_NAME!r} runs only inside the rollout "
                           "engine (it needs the paged_kv cache argument)")
    if query.shape[0] != 1:
        raise ValueError(f"{ATTN_NAME} expects one packed row, got batch {query.shape[0]}")
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    c, layer = paged_kv, module.layer_idx
    common = dict(scale=scaling if scaling is not None else q.shape[-1] ** -0.5, softcap=softcap,
                  sliding_window=sliding_window, backend=c.backend)
    if c.cu_seqlens_q is None:
        out = decode_attention(q, k, v, c.k[layer], c.v[layer], c.block_table, c.cache_seqlens,
                               c.slot_mapping, prefix_members=c.prefix_members,
                               prefix_lens=c.prefix_lens, **common)
    else:
        out = prefill_attention(q, k, v, c.k[layer], c.v[layer], c.block_table, c.cu_seqlens_q,
                                c.cache_seqlens, c.slot_mapping, **common)
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention_forward)


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class ModelRunner:
    def __init__(self, model, block_size: int, num_blocks: int, backend: str | None = None,
                 graph_width: int | None = None, capture: bool = False,
                 fuse_norms: bool = False, group_size: int = 0, step=None):
        """graph_width: decode through `DecodeGraphs` with block tables this wide (None: every
        step eagerly); capture: capture its CUDA graphs (else it runs the padded path
        eagerly); fuse_norms: run the model's RMSNorms as one kernel each; group_size: the
        samples per prompt, > 1 to give decode steps the cascade hint (`shared_prefixes`);
        step: the decode step `DecodeGraphs` runs (a compiled one, say)."""
        _register()
        self.model = model
        cfg = text_config(model)
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.block_size, self.num_blocks, self.backend = block_size, num_blocks, backend
        self.fuse_norms, self.group_size = fuse_norms, group_size
        self.cache: PagedKVCache | None = None
        self.spare_block = num_blocks  # see `allocate`
        self.graphs = (None if graph_width is None
                       else DecodeGraphs(self, graph_width, capture, step))

    @staticmethod
    def bytes_per_block(model, block_size: int) -> int:
        cfg = text_config(model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elem = torch.empty((), dtype=model.dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * head_dim * elem

    def allocate(self) -> None:
        # zeros, not empty: slots past a sequence's length are read (whole pages) and weighted
        # by 0, and 0 x a NaN left in fresh memory is NaN. One block more than the block
        # manager hands out (`spare_block`): the decode graphs' padding rows write and read
        # there, so that every row of a padded step has a real slot (the compiled torch path
        # writes the cache with one unmasked index_copy_)
        shape = (self.num_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        dev, dt = self.model.device, self.model.dtype
        self.cache = PagedKVCache([torch.zeros(shape, device=dev, dtype=dt)
                                   for _ in range(self.num_layers)],
                                  [torch.zeros(shape, device=dev, dtype=dt)
                                   for _ in range(self.num_layers)], backend=self.backend)

    def resize(self, num_blocks: int) -> None:
        """A smaller cache than the one asked for at construction (before `allocate`)."""
        self.num_blocks = self.spare_block = num_blocks

    def release(self) -> None:
        self.cache = None
        self.graphs = None  # they hold the cache's addresses

    @contextmanager
    def attention(self):
        """The model's attention routed to the paged ops, and with `fuse_norms` its RMSNorms
        to the fused kernel (`r2ec_fast.ops.rms_norm`), both restored afterwards (the trainer's
        own forward passes use the model's usual implementations)."""
        lm = self.model.lm
        before = text_config(self.model)._attn_implementation
        lm.set_attn_implementation(ATTN_NAME)
        try:
            if self.fuse_norms:
                with fused_rms_norms(lm):
                    yield
            else:
                yield
        finally:
            lm.set_attn_implementation(before)

    def _metadata(self, batch: Batch):
        dev = self.model.device
        rows = batch.rows
        tokens = [t for r in rows for t in r.tokens]
        positions = [p for r in rows for p in range(r.start, r.start + len(r.tokens))]
        slots = [s for r in rows for s in r.slots]
        width = max(len(r.table) for r in rows)
        tables = [r.table + [0] * (width - len(r.table)) for r in rows]
        seqlens = [r.start + len(r.tokens) for r in rows]
        c = self.cache
        c.block_table = torch.tensor(tables, dtype=torch.int32, device=dev)
        c.cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=dev)
        c.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        c.cu_seqlens_q = c.prefix_members = c.prefix_lens = None
        if not batch.prefill and self.group_size > 1:
            members, lens = shared_prefixes(rows, self.block_size, self.group_size)
            c.prefix_members = torch.tensor(members, dtype=torch.int32,
                                            device=dev).view(-1, self.group_size)
            c.prefix_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        if batch.prefill:
            cu = [0]
            for r in rows:
                cu.append(cu[-1] + len(r.tokens))
            c.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=dev)
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)[None]
        pos = torch.tensor(positions, dtype=torch.long, device=dev)[None]
        return ids, pos

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return final_logits(self.model, hidden)

    def draws(self, batch: Batch) -> bool:
        """Whether `run` can draw this batch's tokens itself (`DecodeGraphs.draws`)."""
        return not batch.prefill and self.graphs is not None and self.graphs.draws

    def run(self, batch: Batch, draw=None):
        """Run a batch's forward; [R, Vocab] logits at the last token of every row that draws
        (in row order). draw = (uniforms, params), only where `draws(batch)`: the rows' tokens
        and log-probs instead, drawn in the same compiled step."""
        self.cache.copy_blocks(batch.copies)
        if not batch.prefill and self.graphs is not None:
            return self.graphs.run(batch, draw)  # one token per row, every row draws
        if draw is not None:
            raise RuntimeError("ModelRunner.run draws only where draws(batch) holds")
        ids, pos = self._metadata(batch)
        out = self.model.decoder()(input_ids=ids, position_ids=pos, use_cache=False,
                                   paged_kv=self.cache)
        hidden = out.last_hidden_state[0]  # [T, d]
        ends, end = [], 0
        for r in batch.rows:
            end += len(r.tokens)
            if r.draw_for:
                ends.append(end - 1)
        if not ends:
            return hidden.new_empty(0, self.model.lm_head_weight.shape[0], dtype=torch.float32)
        if len(ends) == hidden.shape[0]:  # every row draws (decode): no gather
            return self.logits(hidden)
        index = torch.tensor(ends, device=hidden.device)
        return self.logits(hidden.index_select(0, index))

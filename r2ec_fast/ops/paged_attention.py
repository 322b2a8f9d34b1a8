"""Attention over a paged KV cache (DESIGN §4.4): the rollout engine's prefill and decode.

Cache layout (flash-attn's `flash_attn_with_kvcache`): k_cache, v_cache [num_blocks,
block_size, H_kv, D]; block_table [B, max_blocks] holds each sequence's page ids (entries past
its length are never read); the slot of position j is block_table[b, j // block_size] *
block_size + j % block_size.

    s = (q . k) * scale;  s = softcap * tanh(s / softcap)  (softcap given)
    query at position pos sees keys j <= pos and, with sliding_window W, j > pos - W
    (transformers' sliding-window overlay);  out = softmax(s) . v,  fp32 accumulation.

GQA: query head h reads KV head h // (H_q // H_kv) (HF repeat_kv).

`cache_seqlens[b]` counts sequence b's tokens in the cache *after* this call's tokens are
written, so a prefill chunk of q_len rows is the suffix: its row i sits at position
cache_seqlens[b] - q_len + i and attends to everything before it already in the cache (a
group's shared prompt pages, or the earlier chunks of a chunked prefill).

Implementations (DESIGN §3):
- ``reference``: a loop over sequences that materialises each one's context and the full
  score matrix (float64 with upcast=True): the oracle in tests;
- ``torch``: the CPU path. It gathers the pages of every sequence's visible keys into a
  padded [n, L, H_kv, D] batch with a validity mask and runs CPU's fused SDPA on it (batched
  matmuls per KV head with softcap): decode is one batch for all sequences, prefill cuts the
  queries into chunks of at most PREFILL_ROWS, each over the keys it sees, batched by key
  span so that one batch of scores stays under SCORE_ELEMS. Its only host reads are the
  lengths (free on CPU);
- ``triton``: ``r2ec_fast.kernels.paged_attention`` (FlashAttention-2 prefill, flash-decoding
  decode, a scatter kernel for the cache writes);
- ``flash_attn``: `flash_attn_varlen_func(block_table=...)` and `flash_attn_with_kvcache`,
  picked automatically on CUDA when flash-attn is installed, the dtype is fp16/bf16 and
  block_size is a multiple of 256 (its paged-KV requirement); the cache writes stay ours.

Input checks look at shapes, dtypes and devices only, so that a CUDA call never waits for the
device (the triton and flash_attn paths have no host sync at all); on CPU, where reading values
is free, the lengths and slots are checked too. Under torch.compile each call is one custom op
(`r2ec_fast::append_kv`, `::paged_prefill`, `::paged_decode`) that mutates the caches, except
the torch backend's decode, which is traced: its cache write an `index_copy_` (every slot must
be >= 0 there), its attention a host-read-free variant over the whole block-table width, both
fused by inductor.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch

from r2ec_fast.ops._backend import BACKENDS, resolve_backend

FLASH_ATTN = "flash_attn"
# fp32 scores in one batched matmul of the torch path (16 MiB)
SCORE_ELEMS = 1 << 22
# torch prefill: queries in chunks of at most this many rows, each reading only the keys its
# rows see (causal, sliding window), and chunks batched with others of a key span within
# SPAN_GROWTH x (little padding): the tiny test model's prefill of 8 x 256 tokens (window 32
# on one layer) took 37 ms instead of 64 ms on 2 CPU cores
PREFILL_ROWS = 64
SPAN_GROWTH = 1.3

_FLASH_ATTN_INSTALLED: bool | None = None


def _flash_attn_installed() -> bool:
    global _FLASH_ATTN_INSTALLED
    if _FLASH_ATTN_INSTALLED is None:
        _FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None
    return _FLASH_ATTN_INSTALLED


# ----------------------------------------------------------------------------- checks


def _host_checks(device) -> bool:
    """Checks that read tensor values: on CPU only (free there, a sync on CUDA), and not while
    torch.compile traces."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _is_int(t) -> bool:
    return (isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex()
            and t.dtype != torch.bool)


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_cache(k_cache, v_cache):
    if not (isinstance(k_cache, torch.Tensor) and k_cache.is_floating_point()
            and k_cache.dim() == 4):
        raise ValueError(f"k_cache must be a floating-point [num_blocks, block_size, H_kv, D] "
                         f"tensor, got {_shape(k_cache)}")
    if not (isinstance(v_cache, torch.Tensor) and v_cache.shape == k_cache.shape
            and v_cache.dtype == k_cache.dtype and v_cache.device == k_cache.device):
        raise ValueError(f"v_cache must match k_cache {tuple(k_cache.shape)} {k_cache.dtype} on "
                         f"{k_cache.device}, got {_shape(v_cache)}")


def _check_new_kv(key, value, slot_mapping, n_rows, k_cache):
    """key/value [n_rows, H_kv, D] with slot_mapping [n_rows]; both None: nothing to write."""
    if key is None and value is None:
        return
    if key is None or value is None:
        raise ValueError("key and value must both be tensors or both be None")
    want = (n_rows, k_cache.shape[2], k_cache.shape[3])
    for name, t in (("key", key), ("value", value)):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) == want):
            raise ValueError(f"{name} must be a floating-point {list(want)} tensor "
                             f"([T, H_kv, D] of the cache), got {_shape(t)}")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache is on {k_cache.device}")
    if not (_is_int(slot_mapping) and tuple(slot_mapping.shape) == (n_rows,)):
        raise ValueError(f"slot_mapping must be an integer [{n_rows}] tensor, got "
                         f"{_shape(slot_mapping)}")
    if slot_mapping.device != k_cache.device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device}, the cache on "
                         f"{k_cache.device}")
    n_slots = k_cache.shape[0] * k_cache.shape[1]
    if _host_checks(slot_mapping.device) and n_rows and int(slot_mapping.max()) >= n_slots:
        raise ValueError(f"slot_mapping has slots >= num_blocks * block_size = {n_slots}")


def _check_attention(query, k_cache, block_table, cache_seqlens, scale, softcap,
                     sliding_window):
    """Returns the batch size B."""
    if not (isinstance(query, torch.Tensor) and query.is_floating_point() and query.dim() == 3):
        raise ValueError(f"query must be a floating-point [tokens, H_q, D] tensor, got "
                         f"{_shape(query)}")
    n_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if query.shape[2] != head_dim:
        raise ValueError(f"query has D={query.shape[2]} but the cache has D={head_dim}")
    if n_kv_heads == 0 or query.shape[1] % n_kv_heads:
        raise ValueError(f"H_q={query.shape[1]} must be a multiple of H_kv={n_kv_heads}")
    if not (_is_int(cache_seqlens) and cache_seqlens.dim() == 1):
        raise ValueError(f"cache_seqlens must be an integer [B] tensor, got "
                         f"{_shape(cache_seqlens)}")
    batch = cache_seqlens.shape[0]
    if not (_is_int(block_table) and block_table.dim() == 2 and block_table.shape[0] == batch):
        raise ValueError(f"block_table must be an integer [B={batch}, max_blocks] tensor, got "
                         f"{_shape(block_table)}")
    for name, t in (("k_cache", k_cache), ("block_table", block_table),
                    ("cache_seqlens", cache_seqlens)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale)
                                       and scale != 0):
        raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
    if softcap is not None and (isinstance(softcap, bool) or not (
            isinstance(softcap, (int, float)) and softcap > 0)):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not (
            isinstance(sliding_window, int) and sliding_window >= 1)):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    if _host_checks(query.device) and batch:
        capacity = block_table.shape[1] * k_cache.shape[1]
        if int(cache_seqlens.max()) > capacity:
            raise ValueError(f"cache_seqlens exceed the block table's capacity max_blocks x "
                             f"block_size = {capacity}")
    return batch


def _check_cu_seqlens(cu_seqlens_q, batch, n_tokens, cache_seqlens, device):
    if not (_is_int(cu_seqlens_q) and tuple(cu_seqlens_q.shape) == (batch + 1,)):
        raise ValueError(f"cu_seqlens_q must be an integer [B+1={batch + 1}] tensor, got "
                         f"{_shape(cu_seqlens_q)}")
    if cu_seqlens_q.device != device:
        raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device}, query on {device}")
    if not _host_checks(device):
        return
    cu = cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != n_tokens or bool((q_lens < 0).any()):
        raise ValueError(f"cu_seqlens_q must rise from 0 to T={n_tokens}, got "
                         f"{cu_seqlens_q.tolist()}")
    if bool((cache_seqlens.long() < q_lens).any()):
        raise ValueError("cache_seqlens (cache length after this call) must be >= each "
                         "sequence's number of new query tokens")


def _resolve(backend, query, k_cache) -> str:
    requested = backend if backend is not None else (os.environ.get("R2EC_BACKEND") or None)
    if requested is not None and requested not in BACKENDS + (FLASH_ATTN,):
        raise ValueError(f"backend {requested!r} is not a backend of paged attention; choose "
                         f"one of {BACKENDS + (FLASH_ATTN,)}")
    usable = _flash_attn_usable(query, k_cache)
    if requested == FLASH_ATTN:
        if not usable:
            raise ValueError("backend 'flash_attn' needs flash-attn installed, CUDA tensors, "
                             "fp16/bf16 query and cache of one dtype, D <= 256 a multiple of 8 "
                             "and block_size a multiple of 256")
        return FLASH_ATTN
    resolved = resolve_backend(backend, query, k_cache)
    return FLASH_ATTN if requested is None and resolved == "triton" and usable else resolved


def _flash_attn_usable(query, k_cache) -> bool:
    head_dim = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and k_cache.dtype == query.dtype and k_cache.shape[1] % 256 == 0
            and head_dim <= 256 and head_dim % 8 == 0 and _flash_attn_installed())


# ----------------------------------------------------------------------------- reference


def append_kv_reference(key, value, k_cache, v_cache, slot_mapping) -> None:
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = key[t]
            v_cache[slot // block_size, slot % block_size] = value[t]


def prefill_attention_reference(query, key, value, k_cache, v_cache, block_table, cu_seqlens_q,
                                cache_seqlens, slot_mapping, scale, softcap=None,
                                sliding_window=None, upcast=True) -> torch.Tensor:
    """The contract written literally, one sequence at a time: write key/value into the
    caches, gather each sequence's whole context, materialise its scores. float64 with
    upcast, else plain PyTorch in query's dtype."""
    if key is not None:
        append_kv_reference(key, value, k_cache, v_cache, slot_mapping)
    dtype = torch.float64 if upcast else query.dtype
    block_size, n_kv_heads, head_dim = k_cache.shape[1:]
    group = query.shape[1] // n_kv_heads
    out = torch.zeros(query.shape, dtype=dtype, device=query.device)
    cu, lens = cu_seqlens_q.tolist(), cache_seqlens.tolist()
    for b, ctx in enumerate(lens):
        q = query[cu[b]:cu[b + 1]].to(dtype)  # [n, H_q, D]
        if q.shape[0] == 0:
            continue
        pages = block_table[b, :-(-ctx // block_size)].long()
        k = k_cache[pages].reshape(-1, n_kv_heads, head_dim)[:ctx].to(dtype)
        v = v_cache[pages].reshape(-1, n_kv_heads, head_dim)[:ctx].to(dtype)
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [ctx, H_q, D]
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        q_pos = torch.arange(ctx - q.shape[0], ctx, device=query.device)
        k_pos = torch.arange(ctx, device=query.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
        s = s.masked_fill(~visible, float("-inf"))
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    return out


def decode_attention_reference(query, key, value, k_cache, v_cache, block_table,
                               cache_seqlens, slot_mapping, scale, softcap=None,
                               sliding_window=None, upcast=True) -> torch.Tensor:
    """Decode is the prefill of one query token per sequence."""
    cu = torch.arange(query.shape[0] + 1, device=query.device)
    return prefill_attention_reference(query, key, value, k_cache, v_cache, block_table, cu,
                                       cache_seqlens, slot_mapping, scale, softcap,
                                       sliding_window, upcast)


# ----------------------------------------------------------------------------- torch


def _torch_append(key, value, k_cache, v_cache, slot_mapping) -> None:
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    block_size = k_cache.shape[1]
    page, off = slots // block_size, slots % block_size
    k_cache[page, off] = key.to(k_cache.dtype)
    v_cache[page, off] = value.to(v_cache.dtype)


def _torch_append_static(key, value, k_cache, v_cache, slot_mapping) -> None:
    """`_torch_append` for torch.compile: no host read, so no slot may be < 0 (it raises; the
    decode graphs give padding rows a spare block instead)."""
    slots = slot_mapping.long()
    # index_copy_ under inductor wraps a negative index around (Python's rule), which would
    # overwrite the cache's last slot: an asynchronous check instead of a host read
    torch._assert_async((slots >= 0).all(), "decode_attention under torch.compile: a slot "
                        "< 0 (eager skips those rows; here every row must have a slot)")
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def _context(k_cache, v_cache, block_rows, lo, hi):
    """Whole pages of rows i (block tables block_rows [n, max_blocks]) from the one holding key
    lo[i] to the one holding key hi[i] - 1: (k, v [n, L, H_kv, D], key positions [n, L],
    valid [n, L]: lo <= position < hi). Whole pages, because index_select of pages moves
    contiguous block_size x H_kv x D runs (measured 4x faster than a gather of single slots
    on CPU)."""
    block_size = k_cache.shape[1]
    first = lo // block_size
    n_pages = int(((hi + block_size - 1) // block_size - first).max())  # host read
    col = first[:, None] + torch.arange(n_pages, device=lo.device)  # [n, n_pages]
    used = col * block_size < hi[:, None]
    pages = torch.where(used, block_rows.gather(1, col.clamp(max=block_rows.shape[1] - 1)), 0)
    pages = pages.long().view(-1)
    if pages.device.type == "cpu" and not (0 <= int(pages.min())
                                           and int(pages.max()) < k_cache.shape[0]):
        raise ValueError(f"block_table holds page ids outside [0, {k_cache.shape[0]}) within "
                         "the sequences' lengths")
    n, width = col.shape[0], n_pages * block_size
    k_pos = (col[:, :, None] * block_size
             + torch.arange(block_size, device=lo.device)).view(n, width)
    valid = (k_pos >= lo[:, None]) & (k_pos < hi[:, None])
    # one buffer for both: two separate multi-MiB allocations per call page-faulted every
    # time on the CPU box we measured on (1.8 ms against 0.2 ms at the engine's decode shape)
    kv = torch.empty((2, pages.numel()) + tuple(k_cache.shape[1:]), dtype=k_cache.dtype,
                     device=k_cache.device)
    torch.index_select(k_cache, 0, pages, out=kv[0])
    torch.index_select(v_cache, 0, pages, out=kv[1])
    # slots past a sequence's length hold anything, NaN in fresh memory: zero them, since a
    # masked key still multiplies its value by 0, and SDPA adds its mask to the (NaN) score
    # (index_fill of those rows: 0.1 ms where a broadcast masked_fill took 1.3 ms)
    invalid = (~valid).view(-1).nonzero().squeeze(1)
    if invalid.numel():
        kv.view(2, n * width, -1).index_fill_(1, invalid, 0)
    kv = kv.view((2, n, width) + tuple(k_cache.shape[2:]))
    return kv[0], kv[1], k_pos, valid


def _dense_attention(q, k, v, q_pos, k_pos, valid, scale, softcap, window):
    """q [n, Qm, H_q, D] against k, v [n, L, H_kv, D] with positions q_pos [n, Qm] and
    k_pos, valid [n, L]: out [n, Qm, H_q, D] fp32. Rows with no visible key (the callers
    only build padding rows that way, and drop them) give NaN or 0."""
    n, q_max, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    group = n_q_heads // n_kv_heads
    visible = valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [n, Qm, L]
    if window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
    kf, vf = k.float(), v.float()
    if softcap is None:
        # CPU's fused SDPA kernel: 30% faster than the matmuls below at the engine's decode
        # shape (32 sequences x 320 keys, H_q 4, H_kv 2, D 16); a query head's group rows
        # (g, i) attend to the KV head's strided view, no copy of the context
        qg = q.float().reshape(n, q_max, n_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        mask = visible[:, None, None].expand(n, 1, group, q_max, -1)
        o = torch.nn.functional.scaled_dot_product_attention(
            qg.reshape(n, n_kv_heads, group * q_max, head_dim), kf.transpose(1, 2),
            vf.transpose(1, 2), attn_mask=mask.reshape(n, 1, group * q_max, -1), scale=scale)
        return o.view(n, n_kv_heads, group, q_max, head_dim).permute(0, 3, 1, 2, 4).reshape(
            n, q_max, n_q_heads, head_dim)
    hidden = ~visible[:, :, None, :]  # broadcast over the query heads of a group
    out = torch.empty(n, q_max, n_q_heads, head_dim, device=q.device)
    for h in range(n_kv_heads):  # batched matmuls on strided views of one KV head
        heads = slice(h * group, (h + 1) * group)
        qh = q[:, :, heads].float().reshape(n, q_max * group, head_dim)
        s = torch.bmm(qh, kf[:, :, h].transpose(1, 2)).mul_(scale)  # [n, Qm G, L]
        s.div_(softcap).tanh_().mul_(softcap)
        s = s.view(n, q_max, group, -1).masked_fill_(hidden, float("-inf"))
        p = torch.softmax(s, -1).view(n, q_max * group, -1)
        out[:, :, heads] = torch.bmm(p, vf[:, :, h]).view(n, q_max, group, head_dim)
    return out


def _torch_decode(query, k_cache, v_cache, block_table, cache_seqlens, scale, softcap,
                  window):
    """All sequences in one padded batch of their visible contexts [lo, len)."""
    hi = cache_seqlens.long()
    lo = (hi - window).clamp_min(0) if window is not None else torch.zeros_like(hi)
    k, v, k_pos, valid = _context(k_cache, v_cache, block_table, lo, hi)
    out = _dense_attention(query[:, None], k, v, (hi - 1)[:, None], k_pos, valid, scale,
                           softcap, window)
    return out[:, 0].to(query.dtype)


def _torch_decode_static(query, k_cache, v_cache, block_table, cache_seqlens, scale, softcap,
                         window):
    """The torch decode without host reads, for torch.compile (inductor fuses it): every row
    gathers all the pages of its block-table row (width x block_size keys, the padded decode
    batches' fixed width) and masks by length; masked values are zeroed (stale or NaN slots).
    fp32 [B, H_q, D]."""
    n, width = block_table.shape
    _, block_size, n_kv_heads, head_dim = k_cache.shape
    group = query.shape[1] // n_kv_heads
    pages = block_table.long().clamp_min(0)  # -1 pads: page 0, masked below
    keys = width * block_size
    k = k_cache[pages].view(n, keys, n_kv_heads, head_dim).float()
    v = v_cache[pages].view(n, keys, n_kv_heads, head_dim).float()
    pos = torch.arange(keys, device=query.device)
    hi = cache_seqlens.long()[:, None]
    visible = pos < hi  # [n, L]
    if window is not None:
        visible = visible & (pos >= hi - window)
    # products and sums rather than einsum: inductor fuses the page gather into the reductions
    # (einsum's batched matmuls needed the gathered K/V materialised, and cost 0.15 ms each at
    # the tiny model's decode shape on CPU)
    q = query.float().view(n, 1, n_kv_heads, group, head_dim)
    s = (q * k[:, :, :, None, :]).sum(-1) * scale  # [n, L, H_kv, G]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible[:, :, None, None], float("-inf"))
    p = torch.softmax(s, 1)
    v = v.masked_fill(~visible[:, :, None, None], 0.0)
    return (p[..., None] * v[:, :, :, None, :]).sum(1).reshape(n, n_kv_heads * group, head_dim)


def _prefill_chunks(cu, lens, n_q_heads, window):
    """(sequence, first packed row, rows, first position, first key, last key + 1) per query
    chunk; a chunk's scores [H_q, rows, keys] stay under SCORE_ELEMS."""
    chunks = []
    for b, ctx in enumerate(lens):
        q_len = cu[b + 1] - cu[b]
        step = max(1, min(q_len, PREFILL_ROWS, SCORE_ELEMS // max(1, n_q_heads * ctx)))
        for i in range(0, q_len, step):
            rows = min(step, q_len - i)
            first = ctx - q_len + i
            lo = max(0, first - window + 1) if window is not None else 0
            chunks.append((b, cu[b] + i, rows, first, lo, first + rows))
    return chunks


def _batches(chunks, n_q_heads, growth):
    """Consecutive chunks grouped so that each padded batch's scores stay under SCORE_ELEMS
    and no chunk's key span exceeds `growth` x the batch's first one (chunks sorted by span:
    little padding)."""
    batch, q_max, k_max = [], 0, 0
    for chunk in chunks:
        q_new, k_new = max(q_max, chunk[2]), max(k_max, chunk[5] - chunk[4])
        if batch and ((len(batch) + 1) * q_new * k_new * n_q_heads > SCORE_ELEMS
                      or k_new > growth * (batch[0][5] - batch[0][4])):
            yield batch, q_max
            batch, q_new, k_new = [], chunk[2], chunk[5] - chunk[4]
        batch.append(chunk)
        q_max, k_max = q_new, k_new
    if batch:
        yield batch, q_max


def _torch_prefill(query, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, scale,
                   softcap, window):
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    chunks = _prefill_chunks(cu_seqlens_q.tolist(), cache_seqlens.tolist(), query.shape[1],
                             window)
    chunks.sort(key=lambda c: c[5] - c[4])  # similar key spans share a padded batch
    for batch, q_max in _batches(chunks, query.shape[1], SPAN_GROWTH):
        seq, row0, n_rows, first, lo, hi = torch.tensor(
            batch, dtype=torch.long, device=query.device).unbind(1)
        i = torch.arange(q_max, device=query.device)
        real = i < n_rows[:, None]  # [n, Qm]
        rows = row0[:, None] + torch.where(real, i, 0)
        k, v, k_pos, valid = _context(k_cache, v_cache, block_table[seq], lo, hi)
        o = _dense_attention(query[rows], k, v, first[:, None] + i, k_pos, valid, scale,
                             softcap, window)
        out[rows[real]] = o[real].to(query.dtype)
    return out


# ----------------------------------------------------------------------------- flash-attn


def _flash_window(sliding_window):
    # flash-attn keeps keys in [pos - left, pos + right]; ours are pos - W < j <= pos
    return (-1, -1) if sliding_window is None else (sliding_window - 1, 0)


def _flash_prefill(query, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, scale,
                   softcap, sliding_window):
    from flash_attn import flash_attn_varlen_func

    cu_k = torch.nn.functional.pad(torch.cumsum(cache_seqlens, 0, dtype=torch.int32), (1, 0))
    # upper bounds instead of the true maxima: no host sync; flash-attn reads the real lengths
    # from cu_seqlens and only sizes its grid with these
    return flash_attn_varlen_func(
        query, k_cache, v_cache, cu_seqlens_q.int(), cu_k, max_seqlen_q=query.shape[0],
        max_seqlen_k=block_table.shape[1] * k_cache.shape[1], softmax_scale=scale,
        causal=True, window_size=_flash_window(sliding_window), softcap=softcap or 0.0,
        block_table=block_table.int())


def _flash_decode(query, k_cache, v_cache, block_table, cache_seqlens, scale, softcap,
                  sliding_window):
    from flash_attn import flash_attn_with_kvcache

    # the new K/V are already in the cache (our append honours slot_mapping, including
    # skipped slots), so cache_seqlens is the full length, as flash-attn wants without k/v
    out = flash_attn_with_kvcache(
        query[:, None], k_cache, v_cache, cache_seqlens=cache_seqlens.int(),
        block_table=block_table.int(), softmax_scale=scale, causal=True,
        window_size=_flash_window(sliding_window), softcap=softcap or 0.0)
    return out[:, 0]


# ----------------------------------------------------------------------------- public ops


def _append(key, value, k_cache, v_cache, slot_mapping, backend) -> None:
    if backend in ("triton", FLASH_ATTN):
        from r2ec_fast.kernels import paged_attention as kern

        kern.kv_append(key, value, k_cache, v_cache, slot_mapping)
    elif backend == "reference":
        append_kv_reference(key, value, k_cache, v_cache, slot_mapping)
    else:
        _torch_append(key, value, k_cache, v_cache, slot_mapping)


def _prefill(query, key, value, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens,
             slot_mapping, scale, softcap, sliding_window, backend):
    if key is not None:
        _append(key, value, k_cache, v_cache, slot_mapping, backend)
    args = (query, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, scale, softcap,
            sliding_window)
    if backend == "triton":
        from r2ec_fast.kernels import paged_attention as kern

        return kern.paged_prefill(*args)
    if backend == FLASH_ATTN:
        return _flash_prefill(*args)
    if backend == "reference":
        return prefill_attention_reference(query, None, None, *args[1:6], None, scale, softcap,
                                           sliding_window, upcast=False).to(query.dtype)
    return _torch_prefill(*args)


def _decode(query, key, value, k_cache, v_cache, block_table, cache_seqlens, slot_mapping,
            scale, softcap, sliding_window, backend, prefix_members=None, prefix_lens=None):
    if key is not None:
        _append(key, value, k_cache, v_cache, slot_mapping, backend)
    args = (query, k_cache, v_cache, block_table, cache_seqlens, scale, softcap,
            sliding_window)
    if backend == "triton":
        from r2ec_fast.kernels import paged_attention as kern

        prefix = None if prefix_members is None else (prefix_members, prefix_lens)
        return kern.paged_decode(*args, prefix=prefix)
    if backend == FLASH_ATTN:
        return _flash_decode(*args)
    if backend == "reference":
        return decode_attention_reference(query, None, None, k_cache, v_cache, block_table,
                                          cache_seqlens, None, scale, softcap, sliding_window,
                                          upcast=False).to(query.dtype)
    if query.shape[0] == 0:
        return query.new_empty(query.shape)
    return _torch_decode(*args)


# torch.compile: each op is one node of the graph that mutates the caches (Dynamo cannot
# trace the Triton launchers or the torch path's host reads); eager calls skip the
# dispatcher, which costs more than the torch path's own work at small decode shapes.
@torch.library.custom_op("r2ec_fast::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, slot_mapping: torch.Tensor, backend: str) -> None:
    _append(key, value, k_cache, v_cache, slot_mapping, backend)


@torch.library.custom_op("r2ec_fast::paged_prefill", mutates_args=("k_cache", "v_cache"))
def _prefill_op(query: torch.Tensor, key: Optional[torch.Tensor], value: Optional[torch.Tensor],
                k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor,
                slot_mapping: Optional[torch.Tensor], scale: float, softcap: Optional[float],
                sliding_window: Optional[int], backend: str) -> torch.Tensor:
    return _prefill(query, key, value, k_cache, v_cache, block_table, cu_seqlens_q,
                    cache_seqlens, slot_mapping, scale, softcap, sliding_window, backend)


@torch.library.custom_op("r2ec_fast::paged_decode", mutates_args=("k_cache", "v_cache"))
def _decode_op(query: torch.Tensor, key: Optional[torch.Tensor], value: Optional[torch.Tensor],
               k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
               cache_seqlens: torch.Tensor, slot_mapping: Optional[torch.Tensor], scale: float,
               softcap: Optional[float], sliding_window: Optional[int], backend: str,
               prefix_members: Optional[torch.Tensor],
               prefix_lens: Optional[torch.Tensor]) -> torch.Tensor:
    return _decode(query, key, value, k_cache, v_cache, block_table, cache_seqlens,
                   slot_mapping, scale, softcap, sliding_window, backend, prefix_members,
                   prefix_lens)


_append_op.register_fake(lambda *args: None)
_prefill_op.register_fake(lambda query, *args: query.new_empty(query.shape))
_decode_op.register_fake(lambda query, *args: query.new_empty(query.shape))


def _numbers(scale, softcap, sliding_window):
    return float(scale), None if softcap is None else float(softcap), sliding_window


def append_kv(key, value, k_cache, v_cache, slot_mapping, backend=None) -> None:
    """Write key/value [T, H_kv, D] into the caches in place at slot_mapping [T]
    (block_id * block_size + offset; a slot < 0 skips its row)."""
    _check_cache(k_cache, v_cache)
    if not isinstance(key, torch.Tensor):
        raise ValueError("key must be a [T, H_kv, D] tensor")
    _check_new_kv(key, value, slot_mapping, key.shape[0] if key.dim() else -1, k_cache)
    backend = _resolve(backend, key, k_cache)
    append = _append_op if torch.compiler.is_compiling() else _append
    append(key, value, k_cache, v_cache, slot_mapping, backend)


def prefill_attention(query, key, value, k_cache, v_cache, block_table, cu_seqlens_q,
                      cache_seqlens, slot_mapping, scale, softcap=None, sliding_window=None,
                      backend=None) -> torch.Tensor:
    """Write the new tokens' key/value [T, H_kv, D] (None: already cached) at slot_mapping,
    then causal attention of the packed queries [T, H_q, D] (sequence b owns rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1], the last ones of its cache_seqlens[b] positions) over
    each sequence's paged cache. Returns [T, H_q, D] in query's dtype."""
    _check_cache(k_cache, v_cache)
    batch = _check_attention(query, k_cache, block_table, cache_seqlens, scale, softcap,
                             sliding_window)
    _check_cu_seqlens(cu_seqlens_q, batch, query.shape[0], cache_seqlens, query.device)
    _check_new_kv(key, value, slot_mapping, query.shape[0], k_cache)
    backend = _resolve(backend, query, k_cache)
    prefill = _prefill_op if torch.compiler.is_compiling() else _prefill
    return prefill(query, key, value, k_cache, v_cache, block_table, cu_seqlens_q,
                   cache_seqlens, slot_mapping, *_numbers(scale, softcap, sliding_window),
                   backend)


def decode_attention(query, key, value, k_cache, v_cache, block_table, cache_seqlens,
                     slot_mapping, scale, softcap=None, sliding_window=None, backend=None,
                     prefix_members=None, prefix_lens=None) -> torch.Tensor:
    """One new token per sequence: write key/value [B, H_kv, D] (None: already cached) at
    slot_mapping, then its query [B, H_q, D] at position cache_seqlens[b] - 1 attends to the
    sequence's paged cache. Returns [B, H_q, D] in query's dtype.

    prefix_members [P, G] / prefix_lens [B] (int32, both or neither): shared prefixes, a hint
    that changes nothing but the order of fp32 sums. Rows members[p, :] (-1 pads at the end)
    hold their first prefix_lens[b] keys (a multiple of the block size, the same for all of
    them, 0 for rows of no prefix) in the same pages; the triton backend then reads those
    pages once per prefix (cascade decoding, `kernels.paged_attention.paged_decode`), the
    others ignore the hint.

    Under torch.compile the torch backend is traced inline (no host reads): there, no slot may
    be < 0 (an asynchronous assert raises), and the context is every page of each row's block
    table, masked by length."""
    _check_cache(k_cache, v_cache)
    batch = _check_attention(query, k_cache, block_table, cache_seqlens, scale, softcap,
                             sliding_window)
    if query.shape[0] != batch:
        raise ValueError(f"query has {query.shape[0]} rows but cache_seqlens has B={batch}")
    if _host_checks(query.device) and batch and int(cache_seqlens.min()) < 1:
        raise ValueError("cache_seqlens counts the new token: every entry must be >= 1")
    _check_new_kv(key, value, slot_mapping, batch, k_cache)
    _check_prefix(prefix_members, prefix_lens, block_table, cache_seqlens, k_cache.shape[1])
    backend = _resolve(backend, query, k_cache)
    if torch.compiler.is_compiling() and backend == "torch":
        # traced inline so that inductor fuses it, the cache write included (inductor writes
        # the cache in place: measured, no copy of it; the custom op's dispatch took 0.45 ms
        # a call on CPU, a third of the tiny model's compiled step)
        if key is not None:
            _torch_append_static(key, value, k_cache, v_cache, slot_mapping)
        return _torch_decode_static(query, k_cache, v_cache, block_table, cache_seqlens,
                                    *_numbers(scale, softcap, sliding_window)).to(query.dtype)
    decode = _decode_op if torch.compiler.is_compiling() else _decode
    return decode(query, key, value, k_cache, v_cache, block_table, cache_seqlens,
                  slot_mapping, *_numbers(scale, softcap, sliding_window), backend,
                  prefix_members, prefix_lens)


def _check_prefix(members, lens, block_table, cache_seqlens, block_size) -> None:
    if members is None and lens is None:
        return
    batch = cache_seqlens.shape[0]
    if members is None or lens is None:
        raise ValueError("prefix_members and prefix_lens go together")
    if members.dim() != 2 or _shape(lens) != (batch,) or not (_is_int(members)
                                                             and _is_int(lens)):
        raise ValueError(f"prefix_members must be [P, G] and prefix_lens [{batch}] int32, got "
                         f"{_shape(members)} and {_shape(lens)}")
    if not (members.is_contiguous() and lens.is_contiguous()):
        raise ValueError("prefix_members and prefix_lens must be contiguous")
    if members.device != cache_seqlens.device or lens.device != cache_seqlens.device:
        raise ValueError(f"prefix_members / prefix_lens on {members.device} / {lens.device}, "
                         f"the cache lengths on {cache_seqlens.device}")
    if not _host_checks(members.device):
        return
    if any(row != sorted(row, key=lambda b: b < 0) for row in members.tolist()):
        raise ValueError("prefix_members: a row's -1 pads must come after its members (the "
                         "kernel reads the prefix's pages and length from its first entry)")
    pages, listed = block_table.tolist(), [b for row in members.tolist() for b in row if b >= 0]
    if sorted(listed) != [b for b, n in enumerate(lens.tolist()) if n > 0]:
        raise ValueError("every row with prefix_lens > 0 must be in exactly one prefix of "
                         "prefix_members, and every member must have prefix_lens > 0")
    for p, row in enumerate(members.tolist()):
        rows = [b for b in row if b >= 0]
        if not rows:
            continue
        n = int(lens[rows[0]])
        shared = {tuple(pages[b][:n // block_size]) for b in rows}
        if (any(not 0 <= b < batch for b in rows) or n % block_size or len(shared) > 1
                or any(int(lens[b]) != n or n >= int(cache_seqlens[b]) for b in rows)):
            raise ValueError(f"prefix {p}: rows {rows} do not share their first {n} keys' "
                             "pages (prefix_lens must be a multiple of the block size, below "
                             "every member's length, and the same for all members)")

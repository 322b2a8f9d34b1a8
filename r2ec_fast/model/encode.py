"""Encoding many prompts into final hidden states: the item table H_V (DESIGN §1, §5.8).

Item prompts vary a lot in length (a title alone vs a title and a 100-word description). With
a fixed number of prompts per forward, every batch is padded to its longest prompt and the
padding is computed like real tokens. `token_budget_batches` sorts the prompts by length and
fills each batch up to a token budget (batch size x longest prompt), so that a batch holds
prompts of similar length: little padding, and a bounded activation size per forward.

Right padding only: real tokens keep positions 0..L-1, so a prompt's encoding does not depend
on the batch it lands in (`last_hidden` reads the state at its last real token).
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from ..ops.item_table import ItemTable

BATCHINGS = ("budget", "fixed")
DEFAULT_TOKEN_BUDGET = 16384  # tokens (padding included) per forward
DEFAULT_BATCH_SIZE = 32  # prompts per forward for batching="fixed"


def token_budget_batches(lengths: Sequence[int], token_budget: int,
                         max_batch: int | None = None) -> list[list[int]]:
    """Indices into `lengths` grouped so that len(batch) * max length in batch <= token_budget.

    Longest prompts first (sorted by length descending, ties by index), each batch filled
    greedily; a prompt longer than the budget on its own gets a batch of one. Every index
    appears exactly once. `max_batch` caps the prompts per batch.
    """
    if isinstance(token_budget, bool) or int(token_budget) != token_budget or token_budget < 1:
        raise ValueError(f"token_budget must be a positive integer, got {token_budget!r}")
    if max_batch is not None and (isinstance(max_batch, bool) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        # sorted descending: a batch's first prompt is its longest, so adding one more costs
        # one more row of that length
        if batch and ((len(batch) + 1) * lengths[batch[0]] > token_budget
                      or (max_batch is not None and len(batch) >= max_batch)):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    """The naive baseline: indices 0..n-1 in their original order, `batch_size` per batch."""
    if isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def padding_fraction(lengths: Sequence[int], batches: list[list[int]]) -> float:
    """Share of the computed token slots that are padding: 1 - real / sum(batch x max len)."""
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / slots if slots else 0.0


def make_batches(lengths: Sequence[int], batching: str = "budget",
                 token_budget: int = DEFAULT_TOKEN_BUDGET, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch: int | None = None) -> list[list[int]]:
    if batching == "budget":
        return token_budget_batches(lengths, token_budget, max_batch)
    if batching == "fixed":
        return fixed_batches(len(lengths), batch_size)
    raise ValueError(f"batching={batching!r}; choose one of {BATCHINGS}")


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int | None = None,
                   add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids per text, unpadded. `add_special_tokens=False` by default: chat-rendered
    texts already carry the template's bos (Gemma's tokenizer would add a second one).
    `max_length` truncates on the tokenizer's truncation side (right by default)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens,
                    truncation=max_length is not None, max_length=max_length)["input_ids"]
    empty = next((i for i, row in enumerate(ids) if not row), None)
    if empty is not None:
        raise ValueError(f"text {empty} encodes to no tokens: nothing to take a hidden state of")
    return ids


def iter_hidden(model, token_ids: list[list[int]], batches: list[list[int]],
                progress: bool = True, desc: str = "encode"
                ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """For each batch: (its indices, their last-token hidden states [b, d] on the model's
    device; fp32, or fp64 for a float64 model such as a benchmark's reference).

    The forward runs under inference_mode; the yielded tensors are plain tensors, so callers
    may write them into tables that are later updated outside inference mode."""
    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id  # masked out either way
    device = model.device
    was_training = model.training
    model.eval()  # no dropout in encodings, also when called from the training loop
    try:
        with tqdm(total=sum(len(b) for b in batches), desc=desc, unit="prompt",
                  disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            for batch in batches:
                width = max(len(token_ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # right padding
                    input_ids[row, :len(token_ids[i])] = torch.tensor(token_ids[i])
                    mask[row, :len(token_ids[i])] = 1
                with torch.inference_mode():
                    hidden = model.last_hidden(input_ids.to(device), mask.to(device))
                hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
                yield batch, hidden.clone()  # clone: a normal tensor, not an inference one
                bar.update(len(batch))
    finally:
        model.train(was_training)


def encode_texts(model, texts: Sequence[str], token_budget: int = DEFAULT_TOKEN_BUDGET,
                 batching: str = "budget", batch_size: int = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, progress: bool = True,
                 max_batch: int | None = None, add_special_tokens: bool = False) -> torch.Tensor:
    """[n, d] fp32 final hidden states of `texts` at their last token, in input order, on the
    model's device (fp64 for a float64 model). batching="budget" (default) groups by length
    under `token_budget` tokens per forward; "fixed" takes `batch_size` texts per forward in
    input order (the baseline)."""
    token_ids = tokenize_texts(model.tokenizer, texts, max_length, add_special_tokens)
    batches = make_batches([len(t) for t in token_ids], batching, token_budget, batch_size,
                           max_batch)
    out = torch.empty(len(token_ids), model.hidden_size, device=model.device,
                      dtype=torch.promote_types(model.dtype, torch.float32))
    for batch, hidden in iter_hidden(model, token_ids, batches, progress):
        out[torch.tensor(batch, device=out.device)] = hidden
    return out


def item_texts(tokenizer, items, category: str = "", config=None) -> list[str]:
    """The chat-rendered prompt of every real item, ids 1..num_items (index 0 = item 1)."""
    from ..data.prompts import item_prompt, render_chat

    return [render_chat(tokenizer, item_prompt(items, item, category, config))
            for item in range(1, items.num_items + 1)]


def encode_items(model, items, category: str = "", config=None,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, dtype: torch.dtype | None = None,
                 similarity: str = "cosine", progress: bool = True, batching: str = "budget",
                 batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 max_batch: int | None = None) -> ItemTable:
    """An `ItemTable` of num_items + 1 rows on the model's device: row 0 (the padding item) is
    zeros, row i the final hidden state of item i's chat-rendered prompt. dtype: bf16 on CUDA,
    fp32 elsewhere. Rows are written batch by batch, so no fp32 copy of the whole catalog is
    ever held (1e6 items x d 2304 would be 9 GB)."""
    if dtype is None:
        dtype = torch.bfloat16 if model.device.type == "cuda" else torch.float32
    texts = item_texts(model.tokenizer, items, category, config)
    token_ids = tokenize_texts(model.tokenizer, texts, max_length)
    batches = make_batches([len(t) for t in token_ids], batching, token_budget, batch_size,
                           max_batch)
    table = ItemTable(torch.zeros(items.num_items + 1, model.hidden_size, device=model.device),
                      similarity=similarity, dtype=dtype)  # cosine keeps zero rows zero
    for batch, hidden in iter_hidden(model, token_ids, batches, progress, desc="encode items"):
        ids = torch.tensor(batch, dtype=torch.long, device=model.device) + 1  # item id = index + 1
        table.refresh_rows(ids, hidden)
    return table

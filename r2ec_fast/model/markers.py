"""The answer markers as single tokens of a pretrained model's vocabulary.

R²ec's item action happens at the answer-start marker: the rollout stops when it samples it
and its final hidden state scores the catalog, so the marker must be one token. A pretrained
tokenizer (SmolLM2's, Llama's, Qwen's) splits "<answer>" into several pieces; `add_markers`
adds each missing marker as a special token and grows the embedding table (and an untied
lm_head) by one row per marker where it has no spare rows (tables are often padded past the
tokenizer's length; then the new ids take spare rows).

A new row is the mean of the existing rows of the pieces the marker was split into before
(`"<answer>"` -> `"<", "answer", ">"`): deterministic, distinct per marker, and inside the
distribution of the trained rows, so that with a frozen embedding (LoRA) the marker still
means "answer" to the model. (Initialising new tokens from their sub-token embeddings is the
usual practice, e.g. Hewitt 2021, "Initializing new word embeddings for pretrained language
models".) transformers' own `mean_resizing` draws a random row around the mean of every row
instead, which two calls would not reproduce.
"""
from __future__ import annotations

import torch


def marker_ids(tokenizer, markers) -> dict[str, int | None]:
    """Each marker's single token id, or None where the tokenizer splits it."""
    out = {}
    for marker in markers:
        tid = tokenizer.convert_tokens_to_ids(marker)
        out[marker] = None if tid is None or tid == tokenizer.unk_token_id else int(tid)
    return out


@torch.no_grad()
def add_markers(lm, tokenizer, markers=("<answer>", "</answer>")) -> list[str]:
    """Make every marker one token of `tokenizer` and `lm` (in place); returns the markers that
    were added (empty when all were already single tokens)."""
    missing = [m for m, tid in marker_ids(tokenizer, markers).items() if tid is None]
    if not missing:
        return []
    pieces = {m: tokenizer(m, add_special_tokens=False)["input_ids"] for m in missing}
    for marker, ids in pieces.items():
        if not ids:
            raise ValueError(f"the tokenizer encodes the marker {marker!r} as no token")
    known = len(tokenizer)
    tokenizer.add_tokens(missing, special_tokens=True)  # never split, in every version
    rows = lm.get_input_embeddings().weight.shape[0]
    tied = lm.get_output_embeddings() is not None and (
        lm.get_output_embeddings().weight is lm.get_input_embeddings().weight)
    if len(tokenizer) > rows:  # a table padded past the tokenizer may already have the rows
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tables = [lm.get_input_embeddings().weight]
    if not tied and lm.get_output_embeddings() is not None:
        tables.append(lm.get_output_embeddings().weight)
    for marker in missing:
        tid = tokenizer.convert_tokens_to_ids(marker)
        if not known <= tid < tables[0].shape[0]:
            raise RuntimeError(f"the added marker {marker!r} got id {tid}, not a new id in "
                               f"{known}..{tables[0].shape[0] - 1}")
        for table in tables:
            table[tid] = table[pieces[marker]].float().mean(0).to(table.dtype)
    return missing

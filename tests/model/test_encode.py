"""Encoding prompts into the item table: batching, padding invariance, order (DESIGN §5.8)."""
import random

import pytest
import torch
import torch.nn.functional as F

from r2ec_fast.model.encode import (
    encode_texts,
    fixed_batches,
    item_texts,
    padding_fraction,
    token_budget_batches,
)
from r2ec_fast.ops.item_table import ItemTable
from r2ec_fast.testing import assert_close_verbose, rel_error

ARCHS = ("gemma2", "qwen2")


@pytest.mark.parametrize("seed", range(20))
def test_token_budget_batches_invariants(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 7, 50, 333])
    lengths = [rng.choice([1, 2, 5, 17, 64, 200, 513]) for _ in range(n)]
    budget = rng.choice([1, 64, 100, 512, 4096])
    max_batch = rng.choice([None, 1, 3, 16])
    batches = token_budget_batches(lengths, budget, max_batch)
    assert sorted(i for b in batches for i in b) == list(range(n))  # every index once
    for b in batches:
        assert b, "empty batch"
        width = max(lengths[i] for i in b)
        assert len(b) * width <= budget or len(b) == 1, (b, width, budget)
        assert max_batch is None or len(b) <= max_batch
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)  # longest first


def test_token_budget_batches_fill_greedily():
    assert token_budget_batches([3, 10, 3, 4], 12) == [[1], [3, 0, 2]]
    assert token_budget_batches([3, 10, 3, 4], 12, max_batch=2) == [[1], [3, 0], [2]]
    assert token_budget_batches([50, 1], 10) == [[0], [1]]  # over budget alone
    assert token_budget_batches([], 10) == []
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="token_budget"):
            token_budget_batches([1], bad)
    with pytest.raises(ValueError, match="max_batch"):
        token_budget_batches([1], 8, max_batch=0)


def test_fixed_batches_and_padding_fraction():
    assert fixed_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert fixed_batches(0, 3) == []
    with pytest.raises(ValueError, match="batch_size"):
        fixed_batches(4, 0)
    lengths = [4, 2, 2, 1]
    assert padding_fraction(lengths, [[0, 1], [2, 3]]) == pytest.approx(1 - 9 / 12)
    assert padding_fraction(lengths, [[0], [1, 2], [3]]) == 0.0
    assert padding_fraction([], []) == 0.0


def test_budget_batches_pad_less_than_fixed_on_varied_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(2000)]
    budget = token_budget_batches(lengths, 4096)
    fixed = fixed_batches(len(lengths), round(len(lengths) / len(budget)))  # same batch count
    assert padding_fraction(lengths, budget) < 0.05
    assert padding_fraction(lengths, fixed) > 0.3


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_texts_equals_each_text_alone(models, dataset, arch):
    model = models[arch]
    texts = item_texts(model.tokenizer, dataset.items, dataset.category)
    lengths = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert max(lengths) > 2 * min(lengths)  # the fixture's prompts really vary
    batched = encode_texts(model, texts, token_budget=4 * max(lengths), progress=False)
    fixed = encode_texts(model, texts, batching="fixed", batch_size=7, progress=False)
    alone = torch.cat([encode_texts(model, [t], progress=False) for t in texts])
    assert batched.shape == (len(texts), 64) and batched.dtype == torch.float32
    assert rel_error(batched, alone) < 1e-5
    assert rel_error(fixed, alone) < 1e-5
    assert_close_verbose(batched, alone, rtol=1e-4, atol=1e-5, name=f"{arch} batched vs alone")
    # input order: every row differs from its neighbours (the encodings are not all alike)
    assert (batched[1:] - batched[:-1]).abs().amax(1).min() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_items_table(models, dataset, arch):
    model = models[arch]
    texts = item_texts(model.tokenizer, dataset.items, dataset.category)
    alone = torch.cat([encode_texts(model, [t], progress=False) for t in texts])  # [V, d]
    table = model.encode_items(dataset.items, category=dataset.category, token_budget=512,
                               progress=False)
    assert model.item_table is table and isinstance(table, ItemTable)
    assert table.num_items == dataset.items.num_items + 1 and table.dim == 64
    assert table.dtype == torch.float32 and table.similarity == "cosine"
    assert torch.equal(table.weight[0], torch.zeros(64))  # the padding item
    assert rel_error(table.weight[1:], F.normalize(alone, dim=-1)) < 1e-5
    # the table is a plain tensor: it can be refreshed outside inference mode
    model.refresh_rows(torch.tensor([2]), alone[:1])
    assert_close_verbose(table.weight[2], F.normalize(alone[0], dim=0), rtol=1e-6, atol=1e-7)

    dot = model.encode_items(dataset.items, category=dataset.category, similarity="dot",
                             dtype=torch.bfloat16, batching="fixed", batch_size=5,
                             progress=False)
    assert dot.dtype == torch.bfloat16 and model.item_table is dot
    assert rel_error(dot.weight[1:], alone) < 1e-2


def test_progress_bar_and_training_mode(models, capsys):
    model = models["qwen2"]
    encode_texts(model, ["one", "two words"], progress=False)
    assert capsys.readouterr().err == ""
    model.train()
    try:
        encode_texts(model, ["one", "two words"], progress=True)
        assert "2/2" in capsys.readouterr().err
        assert model.training  # restored after encoding in eval mode
    finally:
        model.eval()


def test_encode_texts_errors(models):
    model = models["gemma2"]
    with pytest.raises(ValueError, match="text 1 encodes to no tokens"):
        encode_texts(model, ["fine", ""], progress=False)
    with pytest.raises(ValueError, match="batching"):
        encode_texts(model, ["fine"], batching="sorted", progress=False)
    with pytest.raises(TypeError, match="not one string"):
        encode_texts(model, "fine", progress=False)

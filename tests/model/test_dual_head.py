"""DualHeadModel: loading, the hidden state it hands the two heads, its errors (DESIGN §1)."""
import json
import shutil

import pytest
import torch

from r2ec_fast.model.dual_head import DualHeadModel, last_token_index
from r2ec_fast.testing import assert_close_verbose

ARCHS = ("gemma2", "qwen2")


def _right_padded(tokenizer, texts):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return ids, mask


TEXTS = ["short", "a somewhat longer text about a retro arcade controller",
         "three words here " * 12, "x"]


@pytest.mark.parametrize("arch", ARCHS)
def test_last_hidden_is_hf_final_hidden_state(models, arch):
    model = models[arch]
    ids, mask = _right_padded(model.tokenizer, TEXTS)
    assert len(set(mask.sum(1).tolist())) == len(TEXTS)  # all lengths differ
    ours = model.last_hidden(ids, mask)  # [B, d]
    with torch.no_grad():
        out = model.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    last = mask.sum(1) - 1
    rows = torch.arange(len(TEXTS))
    hf = out.hidden_states[-1][rows, last]
    assert ours.shape == (len(TEXTS), model.hidden_size)
    assert_close_verbose(ours, hf, rtol=1e-5, atol=1e-6, name=f"{arch} last_hidden")
    # hidden_states[-1] is after the final norm: it is what lm_head (and the softcap) reads
    logits = ours @ model.lm_head_weight.T
    if model.softcap:
        logits = model.softcap * torch.tanh(logits / model.softcap)
    assert_close_verbose(logits, out.logits[rows, last], rtol=1e-4, atol=1e-5,
                         name=f"{arch} logits from last_hidden")


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_does_not_change_the_state(models, arch):
    model = models[arch]
    ids, mask = _right_padded(model.tokenizer, TEXTS)
    batched = model.last_hidden(ids, mask)
    for r, n in enumerate(mask.sum(1).tolist()):
        alone = model.last_hidden(ids[r:r + 1, :n])
        assert_close_verbose(batched[r], alone[0], rtol=1e-5, atol=1e-6, name=f"row {r}")


def test_mask_errors(models):
    model = models["qwen2"]
    ids = torch.ones((2, 4), dtype=torch.long)
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="row 1 .*not right-padded"):
        model.last_hidden(ids, left)
    with pytest.raises(ValueError, match="not right-padded"):
        last_token_index(torch.tensor([[1, 0, 1, 0]]))  # a hole
    with pytest.raises(ValueError, match="row 0 .*all padding"):
        model.last_hidden(ids, torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        model.last_hidden(ids, torch.ones((2, 3), dtype=torch.long))
    assert last_token_index(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])).tolist() == [1, 2, 0]


def test_facts(models):
    gemma, qwen = models["gemma2"], models["qwen2"]
    assert gemma.softcap == 30.0 and qwen.softcap is None
    for model in (gemma, qwen):
        assert model.lm_head_weight.shape == (model.config.vocab_size, 64)
        assert model.lm_head_weight is model.lm.get_input_embeddings().weight  # tied
        assert model.dtype == torch.float32 and model.device.type == "cpu"
        assert model.item_table is None or model.item_table.dim == 64
        assert model.tokenizer.pad_token_id is not None
    assert not gemma.lm.training  # loaded for inference


def test_dtype_and_item_table_arguments(tiny_dirs):
    from r2ec_fast.ops.item_table import ItemTable

    table = ItemTable(torch.randn(31, 64))
    model = DualHeadModel.from_pretrained(tiny_dirs["qwen2"], dtype=torch.bfloat16, device="cpu",
                                          item_table=table)
    assert model.dtype == torch.bfloat16 and model.item_table is table
    ids, mask = _right_padded(model.tokenizer, TEXTS)
    assert model(ids, mask).dtype == torch.bfloat16
    fresh = torch.randn(2, 64)
    model.refresh_rows(torch.tensor([3, 5]), fresh)
    assert_close_verbose(table.weight[3], torch.nn.functional.normalize(fresh[0], dim=0),
                         rtol=1e-6, atol=1e-7)


def test_refresh_rows_needs_a_table(models):
    bare = DualHeadModel(models["qwen2"].lm, models["qwen2"].tokenizer)
    with pytest.raises(RuntimeError, match="no item table"):
        bare.refresh_rows(torch.tensor([1]), torch.randn(1, 64))


def test_load_errors(tmp_path, tiny_dirs):
    with pytest.raises(FileNotFoundError, match="does not exist.*never downloads"):
        DualHeadModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DualHeadModel.from_pretrained(tmp_path)
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="'t5' model, which is not a decoder-only causal LM"):
        DualHeadModel.from_pretrained(tmp_path / "t5")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a transformers model config"):
        DualHeadModel.from_pretrained(tmp_path / "junk")
    # a checkpoint whose tokenizer lacks a chat template
    bare = shutil.copytree(tiny_dirs["gemma2"], tmp_path / "no_template")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        DualHeadModel.from_pretrained(bare, device="cpu")


def test_no_network(tiny_dirs, monkeypatch):
    """Loading touches no socket (local_files_only everywhere)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the code itself must not need it
    model = DualHeadModel.from_pretrained(tiny_dirs["gemma2"], device="cpu")
    assert model.softcap == 30.0

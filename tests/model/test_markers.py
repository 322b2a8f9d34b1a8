"""add_markers: answer markers a tokenizer splits become single tokens, their new embedding
rows the mean of the rows of the pieces they were split into."""
import pytest
import torch


def test_markers_become_single_tokens_with_mean_rows(tmp_path):
    from r2ec_fast.model import DualHeadModel
    from r2ec_fast.model.markers import add_markers, marker_ids
    from r2ec_fast.model.tiny import make_tiny_model

    texts = ["a user bought a teal tent and a crimson skillet", "think about it"] * 20
    path = make_tiny_model("qwen2", texts, tmp_path / "m", seed=0)
    model = DualHeadModel.from_pretrained(path, device="cpu")
    lm, tok = model.lm, model.tokenizer
    markers = ("<think>", "</think>")
    assert marker_ids(tok, markers) == {m: None for m in markers}  # split by this tokenizer
    pieces = {m: tok(m, add_special_tokens=False)["input_ids"] for m in markers}
    assert all(len(p) > 1 for p in pieces.values())
    before = lm.get_input_embeddings().weight.detach().clone()
    out_before = lm.get_output_embeddings().weight.detach().clone()
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    known = len(tok)
    assert add_markers(lm, tok, markers) == list(markers)
    ids = marker_ids(tok, markers)
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    # this table is padded past the tokenizer (4096 rows): the new ids take spare rows
    assert emb.shape[0] == before.shape[0] == 4096 and head.shape[0] == emb.shape[0]
    assert len(tok) == known + 2 and sorted(ids.values()) == [known, known + 1]
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[list(ids.values())] = False
    assert torch.equal(emb[others], before[others])  # every other row untouched
    for m in markers:
        assert tok(f"x {m} y", add_special_tokens=False)["input_ids"].count(ids[m]) == 1
        want = before[pieces[m]].double().mean(0)
        assert torch.allclose(emb[ids[m]].double(), want, atol=1e-6)
        if not tied:
            want = out_before[pieces[m]].double().mean(0)
            assert torch.allclose(head[ids[m]].double(), want, atol=1e-6)
    assert not torch.equal(emb[ids["<think>"]], emb[ids["</think>"]])
    assert add_markers(lm, tok, markers) == []  # nothing left to add
    with torch.no_grad():  # the grown model runs and scores the new tokens
        logits = lm(torch.tensor([[ids["<think>"], 3, ids["</think>"]]])).logits
    assert logits.shape[-1] == 4096 and torch.isfinite(logits).all()


def test_a_marker_that_encodes_to_nothing_is_refused(tmp_path):
    from r2ec_fast.model import DualHeadModel
    from r2ec_fast.model.markers import add_markers
    from r2ec_fast.model.tiny import make_tiny_model

    path = make_tiny_model("gemma2", ["some text here"] * 10, tmp_path / "m", seed=0)
    model = DualHeadModel.from_pretrained(path, device="cpu")
    with pytest.raises(ValueError, match="as no token"):
        add_markers(model.lm, model.tokenizer, ("",))

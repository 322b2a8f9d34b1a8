"""`r2ec-fast make-tiny-model`: a small random Gemma-2 / Qwen-2 checkpoint for CPU runs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_make_tiny_model(args: argparse.Namespace) -> int:
    from r2ec_fast.data.dataset import load_dataset
    from r2ec_fast.model.tiny import make_tiny_model, texts_for_tokenizer

    try:
        data = load_dataset(args.data)
        out = make_tiny_model(args.arch, texts_for_tokenizer(data), args.out,
                              vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                              num_layers=args.layers, seed=args.seed)
        from transformers import AutoTokenizer

        num_tokens = len(AutoTokenizer.from_pretrained(out, local_files_only=True,
                                                       trust_remote_code=False))
    except (ValueError, ImportError, OSError) as exc:
        print(f"r2ec-fast make-tiny-model: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: random-init {args.arch}, hidden {args.hidden_size}, {args.layers} "
          f"layers, vocabulary {args.vocab_size} rows ({num_tokens} tokens trained on the "
          f"{data.items.num_items} items of {args.data}), seed {args.seed}")
    print("  files: " + ", ".join(sorted(p.name for p in Path(out).iterdir())))
    return 0


def add_make_tiny_model(subparsers) -> None:
    p = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random Gemma-2/Qwen-2 checkpoint with a tokenizer trained on a dataset",
        description=(
            "Write an ordinary HF model folder (config.json, model.safetensors, tokenizer files\n"
            "with a chat template) holding a randomly initialised decoder in the Gemma-2 or\n"
            "Qwen-2 architecture, and a byte-level BPE tokenizer trained offline on the\n"
            "dataset's item and user prompts. For tests and CPU runs of the whole pipeline;\n"
            "nothing is downloaded."),
        epilog=(
            "example:\n"
            "  r2ec-fast make-tiny-model --arch gemma2 --data data/synth --out models/tiny-gemma2"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=["gemma2", "qwen2"],
                   help="architecture (and chat-template style) of the model")
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="a dataset folder (the reference DatasetDict format) to train the "
                        "tokenizer on")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to write the model to")
    p.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                   help="rows of the embedding table; the tokenizer gets at most N tokens "
                        "(default: 4096)")
    p.add_argument("--hidden-size", type=int, default=64, metavar="N",
                   help="model width, a multiple of 4 heads (default: 64)")
    p.add_argument("--layers", type=int, default=2, metavar="N",
                   help="decoder layers (default: 2)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the random initialisation (default: 0)")
    p.set_defaults(func=_run_make_tiny_model)

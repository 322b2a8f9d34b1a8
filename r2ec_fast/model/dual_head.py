"""`DualHeadModel`: one HF decoder-only LM with two heads on its final hidden state (DESIGN §1).

- the token head is the LM's own `lm_head` (`lm_head_weight`, with `softcap` from the config:
  Gemma-2's `final_logit_softcapping` = 30), consumed by the fused token op (DESIGN §4.3);
- the rec head is an `ItemTable` H_V whose row v is this model's final hidden state on item v's
  prompt (`encode_items`), consumed by the catalog ops (DESIGN §4.1-4.2).

The HF model is wrapped, never re-implemented: `last_hidden` runs its inner decoder (embeddings,
layers, final norm) and skips the lm_head, whose [B, L, Vocab] logits are what the fused ops
exist to avoid. Any architecture that `AutoModelForCausalLM` loads works; Gemma-2 and Qwen-2
are the tested ones. Every loader gets `trust_remote_code` explicitly (default False), so
transformers never runs a folder's own Python by itself, nor asks about it on the terminal: a
folder whose config needs its code (an `auto_map` for a model type transformers has no class
for) is refused, naming the file and `--set model.trust_remote_code=true`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..ops.item_table import ItemTable


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (what the models are trained in), fp32 on CPU (bf16 matmuls there are
    slow and the CPU path is for tests, where fp32 exactness is the point)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def hf_dtype_kwarg() -> str:
    """transformers >= 4.56 names the load dtype `dtype`; older versions `torch_dtype`."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


REMOTE_CODE_FLAG = "--set model.trust_remote_code=true"


def _read_json(file: Path) -> dict:
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}): the model folder is damaged; "
                         "fetch it again") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(values).__name__}")
    return values


def _check_files(path: Path) -> None:
    """Before transformers reads anything: the JSON files parse and every safetensors file's
    header is whole (a copy cut short shows up here, naming the file, instead of as a bare
    SafetensorError from inside HF)."""
    from safetensors import SafetensorError, safe_open

    for name in ("config.json", "tokenizer_config.json"):
        if (path / name).is_file():
            _read_json(path / name)
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                f.keys()
        except SafetensorError as exc:
            raise ValueError(f"{file} is truncated or corrupt (safetensors: {exc}); fetch the "
                             "model again") from exc


def _remote_code_error(file: Path, exc: ValueError) -> ValueError:
    """transformers' refusal (with trust_remote_code=False it raises, never asks and never
    runs the code) as a message that names the file and the option."""
    auto_map = _read_json(file).get("auto_map") if file.is_file() else None
    return ValueError(
        f"{file} needs custom code to load (auto_map: {auto_map}); r2ec-fast does not run "
        "Python from a model folder unless trust_remote_code is on: read that code, then pass "
        f"{REMOTE_CODE_FLAG} (DualHeadModel.from_pretrained(trust_remote_code=...)), or use a "
        f"folder that plain transformers loads (transformers: {str(exc).splitlines()[0]})")


def _needs_remote_code(exc: Exception, trust_remote_code: bool) -> bool:
    return not trust_remote_code and isinstance(exc, ValueError) and \
        "trust_remote_code" in str(exc)


def _check_checkpoint(path: Path, trust_remote_code: bool = False):
    """The folder's config, after checking that it is there and describes a decoder-only
    causal LM; errors say what was found instead."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not path.exists():
        raise FileNotFoundError(
            f"model folder {path} does not exist (r2ec-fast never downloads: fetch the checkpoint "
            "yourself, e.g. `huggingface-cli download <repo> --local-dir DIR`, and pass DIR; "
            "`r2ec-fast make-tiny-model` writes a small random one)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a HF model folder: it has no config.json")
    _check_files(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if _needs_remote_code(exc, trust_remote_code):
            raise _remote_code_error(path / "config.json", exc) from exc
        raise ValueError(f"{path}/config.json is not a transformers model config: {exc}") from exc
    custom = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None)
                                                              or {})
    if not custom and (getattr(config, "is_encoder_decoder", False) or
                       config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise ValueError(
            f"{path} holds a {config.model_type!r} model, which is not a decoder-only causal LM "
            "(AutoModelForCausalLM cannot load it); R2ec needs one, e.g. Gemma-2 or Qwen-2")
    return config


class DualHeadModel(nn.Module):
    """A causal LM (`self.lm`), its tokenizer and an optional item table (`self.item_table`).

    It is an `nn.Module` so that `.parameters()`, `.train()`, FSDP and optimisers see the LM;
    the item table is deliberately not a parameter or buffer (it is refreshed from detached
    encodings, DESIGN §5.8).
    """

    def __init__(self, lm: nn.Module, tokenizer, item_table: ItemTable | None = None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.item_table = item_table

    @property
    def item_table(self) -> ItemTable | None:
        return self.__dict__.get("_item_table")

    @item_table.setter
    def item_table(self, table: ItemTable | None) -> None:
        """Its rows are this model's final hidden states: a table of another width (from
        another model, or a file of another run) is refused, naming both widths."""
        if table is not None and table.dim != self.hidden_size:
            raise ValueError(f"{table.describe()} has width {table.dim} but the model's hidden "
                             f"size is {self.hidden_size}: it was encoded by another model; "
                             "re-encode the catalog with this one (encode_items)")
        self.__dict__["_item_table"] = table

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None,
                        item_table: ItemTable | None = None,
                        attn_implementation: str | None = None,
                        trust_remote_code: bool = False) -> "DualHeadModel":
        """Load a local HF checkpoint folder (never the hub: `local_files_only=True`).

        dtype: default bf16 on CUDA, fp32 on CPU. attn_implementation: passed to HF; None keeps
        HF's default for the architecture (transformers 5.24: eager for Gemma-2, whose model
        class declares no sdpa support because sdpa cannot apply its attention softcap; sdpa
        for Qwen-2). trust_remote_code: let a folder with an `auto_map` run its own Python
        (off: such a folder is refused with a ValueError; HF's own default would instead ask
        on the terminal).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        trust_remote_code = bool(trust_remote_code)
        _check_checkpoint(path, trust_remote_code)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype if dtype is not None else default_dtype(device)
        kwargs = {hf_dtype_kwarg(): dtype, "local_files_only": True,
                  "trust_remote_code": trust_remote_code}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:  # the tokenizer first: it is cheap, and checked before loading the weights
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                      trust_remote_code=trust_remote_code)
        except ValueError as exc:
            if _needs_remote_code(exc, trust_remote_code):
                raise _remote_code_error(path / "tokenizer_config.json", exc) from exc
            raise
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer in {path} has no chat template; R2ec prompts are rendered with "
                "it (use an instruction-tuned checkpoint, or add `chat_template` to its "
                "tokenizer_config.json / a chat_template.jinja file)")
        if tokenizer.pad_token_id is None:
            # padded positions are masked out, so any id works; eos is the usual stand-in
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # what last_hidden reads (real tokens at 0..L-1)
        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        lm.to(device)
        lm.eval()
        model = cls(lm, tokenizer)
        if item_table is not None:
            model.item_table = item_table.to(device)  # checked against the hidden size
        return model

    # ------------------------------------------------------------------------- facts

    @property
    def config(self):
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.lm_head_weight.shape[1]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The token table [Vocab, d] that the fused token op multiplies (DESIGN §4.3); with
        tied embeddings this is the input embedding matrix itself."""
        return self.lm.get_output_embeddings().weight

    @property
    def softcap(self) -> float | None:
        """Final-logit softcap (Gemma-2: 30.0), None for models without one."""
        config = self.config.get_text_config() if hasattr(self.config, "get_text_config") \
            else self.config
        cap = getattr(config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def decoder(self) -> nn.Module:
        """The LM without its lm_head: embeddings, decoder layers, final norm."""
        decoder = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else None
        if decoder is None or decoder is self.lm:
            decoder = getattr(self.lm, "model", None)
        if decoder is None:
            raise TypeError(f"cannot find the inner decoder of {type(self.lm).__name__}")
        return decoder

    # ------------------------------------------------------------------------- hidden states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.last_hidden(input_ids, attention_mask)

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """[B, d]: the final hidden state (after the final norm) at each row's last real token.

        Rows must be right-padded (real tokens first, so that they keep positions 0..L-1 and
        their states do not depend on the padding); the last real token is at
        attention_mask.sum(1) - 1. Left padding, holes in the mask or an all-pad row raise.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")
        last = last_token_index(attention_mask)  # [B]
        out = self.decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # [B, L, d], after the final norm
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]

    # ------------------------------------------------------------------------- item table

    def encode_items(self, items, category: str = "", config=None, token_budget: int = 16384,
                     dtype: torch.dtype | None = None, similarity: str = "cosine",
                     progress: bool = True, **kwargs) -> ItemTable:
        """Encode every item's chat-rendered prompt into a new `ItemTable` (row 0, the padding
        item, is zeros) and make it this model's `item_table`. See `encode.encode_items`."""
        from .encode import encode_items

        self.item_table = encode_items(self, items, category=category, config=config,
                                       token_budget=token_budget, dtype=dtype,
                                       similarity=similarity, progress=progress, **kwargs)
        return self.item_table

    def refresh_rows(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Overwrite item rows `ids` [B] with fresh encodings `hidden` [B, d] (DESIGN §5.8)."""
        if self.item_table is None:
            raise RuntimeError("this model has no item table yet: call encode_items first "
                               "(or pass item_table= to from_pretrained)")
        self.item_table.refresh_rows(ids, hidden)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each right-padded row's last real token: attention_mask.sum(1) - 1."""
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(1)  # [B]
    # right padding: within a row the mask never goes from 0 back to 1
    rises = mask[:, 1:] & ~mask[:, :-1]  # [B, L-1]
    if bool((lengths == 0).any() | rises.any()):  # one host sync for both checks
        if bool((lengths == 0).any()):
            row = int((lengths == 0).nonzero()[0])
            raise ValueError(f"row {row} of the attention mask is all padding: nothing to encode")
        row = int(rises.any(1).nonzero()[0])
        raise ValueError(
            f"row {row} of the attention mask is not right-padded (left padding or a hole); "
            "last_hidden reads the last real token at mask.sum(1) - 1 and needs real tokens at "
            "positions 0..L-1: pad on the right (tokenizer.padding_side = 'right')")
    return lengths - 1

"""The dual-head model: HF decoder + lm_head + item table, attention backends."""
from .dual_head import DualHeadModel
from .encode import (encode_items, encode_texts, fixed_batches, padding_fraction,
                     token_budget_batches)
from .tiny import make_tiny_model, texts_for_tokenizer

__all__ = ["DualHeadModel", "encode_items", "encode_texts", "fixed_batches", "make_tiny_model",
           "padding_fraction", "texts_for_tokenizer", "token_budget_batches"]

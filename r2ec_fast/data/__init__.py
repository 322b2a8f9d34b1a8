"""Datasets, prompts and synthetic data (DESIGN §6). Knows tokenizers only."""
from r2ec_fast.data.dataset import (
    DatasetError,
    ItemCatalog,
    RecDataset,
    Split,
    load_dataset,
    save_dataset,
)
from r2ec_fast.data.prompts import PromptConfig, item_prompt, render_chat, user_prompt

__all__ = ["DatasetError", "ItemCatalog", "PromptConfig", "RecDataset", "Split", "item_prompt",
           "load_dataset", "render_chat", "save_dataset", "user_prompt"]

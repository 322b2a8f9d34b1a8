"""Fixtures of the model tests: a hand-made catalog and tiny Gemma-2 / Qwen-2 checkpoints.

The checkpoints are built once per session (about a second each) into a temporary folder.
Nothing here may reach a model hub: HF_HUB_OFFLINE is set before transformers is imported
by these tests, and the code under test passes local_files_only=True everywhere.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from r2ec_fast.data.dataset import ItemCatalog, RecDataset, split_from_rows  # noqa: E402


ARCHS = ("gemma2", "qwen2")
WORDS = ("retro arcade puzzle racing quest dragon castle wireless controller headset charger "
         "cable memory card edition deluxe bundle classic remastered strategy shooter "
         "adventure soundtrack collector guide keyboard mouse").split()


def make_catalog(num_items: int = 30, seed: int = 0) -> ItemCatalog:
    """Items whose prompts range from a title alone to a ~90-word description."""
    rng = np.random.default_rng(seed)
    title, desc = [""], [""]
    for item in range(1, num_items + 1):
        title.append(" ".join(rng.choice(WORDS, size=1 + item % 4)) + f" {item}")
        words = int(rng.choice([0, 3, 10, 40, 90]))
        desc.append(" ".join(rng.choice(WORDS, size=words)))
    avg = np.concatenate([[0.0], rng.uniform(1, 5, num_items)]).astype(np.float32)
    num = np.concatenate([[0], rng.integers(1, 5000, num_items)]).astype(np.int64)
    cats = [""] + [str(rng.choice(["Games", "Accessories", ""])) for _ in range(num_items)]
    return ItemCatalog(title, desc, avg, num, cats)


def make_dataset(num_items: int = 30, num_users: int = 8, seed: int = 0) -> RecDataset:
    items = make_catalog(num_items, seed)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for user in range(num_users):
        history = rng.integers(1, num_items + 1, size=int(rng.integers(2, 6))).tolist()
        rows.append({"user_id": f"u{user}", "history": history,
                     "history_rating": [4.0] * len(history),
                     "history_timestamp": list(range(len(history))),
                     "item_id": int(rng.integers(1, num_items + 1)), "rating": 5.0,
                     "timestamp": len(history), "interaction_id": user})
    split = split_from_rows(rows)
    return RecDataset(items, {"train": split, "valid": split, "test": split},
                      category="Video Games")


@pytest.fixture(scope="session")
def dataset() -> RecDataset:
    return make_dataset()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, dataset) -> dict:
    """arch -> folder of a tiny random checkpoint (hidden 64, 2 layers)."""
    from r2ec_fast.model.tiny import make_tiny_model, texts_for_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, texts_for_tokenizer(dataset), root / arch, seed=0)
            for arch in ARCHS}


@pytest.fixture(scope="session")
def models(tiny_dirs) -> dict:
    """arch -> DualHeadModel (fp32, CPU)."""
    from r2ec_fast.model.dual_head import DualHeadModel

    return {arch: DualHeadModel.from_pretrained(path, device="cpu")
            for arch, path in tiny_dirs.items()}

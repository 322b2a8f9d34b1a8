"""Fixtures of the rollout tests: tiny random Gemma-2 (sliding window 32, both softcaps) and
Qwen-2 (GQA) checkpoints, fp32 on CPU, and prompts that are longer than the window."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

TEXT = ("retro arcade puzzle racing quest dragon castle wireless controller headset charger "
        "cable memory card edition deluxe bundle classic remastered strategy shooter")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict:
    from r2ec_fast.model.dual_head import DualHeadModel
    from r2ec_fast.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-rollout")
    out = {}
    for arch in ("gemma2", "qwen2"):
        path = make_tiny_model(arch, [TEXT] * 4, root / arch, vocab_size=512, seed=1)
        out[arch] = DualHeadModel.from_pretrained(path, device="cpu")
    return out


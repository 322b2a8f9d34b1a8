"""One whole RecPO step (issue 14, DESIGN §5): seconds per phase, peak memory and tokens/s of
`Trainer.train_step`, beside a reference-style step in the same run.

Rows (both the same `Trainer`, data, model, seed and batch):
- "ours": as configured by default: the paged rollout engine, every op on its automatic
  backend (triton on CUDA, torch on CPU);
- "reference-style": what the reference trainer computes: HF `generate` for the rollout
  (rollout.engine = "hf") and every op on its `reference` backend (R2EC_BACKEND=reference,
  set for the call only): materialised T x |Vocab| logits and N x |V| scores.
One timed call is one training step, then an item refresh: the catalog re-encoded, or on CUDA
REFRESH_SAMPLE items of it with the time scaled to the whole catalog (all 1e6 item prompts
through a 2B model would take minutes; the table's other rows stay random). The checks under
each table give the median seconds per phase (the trainer's own PhaseTimer: rollout, scoring,
forward_backward, optimizer, encode_items), tokens/s (reasoning tokens sampled per second of
the step) and the prompt and reasoning lengths. There is no float64 reference for a step, so
no error column; peak memory is the harness's (a fresh process's peak RSS on CPU; on CUDA
max_memory_allocated beyond the inputs, which include both trainers' weights and tables).

Cases: CPU a tiny Gemma-2 (d 64, 2 layers) on a small synthetic catalog; CUDA random weights
in Gemma-2-2B's shape (built from its config, no download; LoRA r 4, bf16), B = 4 users x
G = 4, 640 reasoning tokens, catalogs of 1e5 and 1e6 items ("quick", the GPU suite's: 1e5
items and 128 tokens). The synthetic
prompts (20 history items) are shorter than the issue's 1,024 tokens; their length is
printed. Not yet run on a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import statistics
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .harness import Case, Impl, register

REFRESH_SAMPLE = 4096  # CUDA: items re-encoded per timed refresh (scaled to the catalog)
SAMPLED_REFRESH = None  # None: on the GPU shape only; True / False force it (tests)
PHASES = ("rollout", "scoring", "forward_backward", "optimizer", "encode_items")
GEMMA2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 query_pre_attn_scalar=256, sliding_window=4096, max_position_embeddings=8192)


@dataclass(frozen=True)
class Spec:
    model: str  # "tiny" or "gemma2-2b"
    items: int  # catalog size
    users: int  # B
    group: int  # G
    new_tokens: int  # reasoning tokens per trajectory (at most)


def _shapes(device: str, mode: str) -> list[Spec]:
    if mode == "smoke":
        return [Spec("tiny", 300, 2, 2, 4)]
    if device == "cuda":  # quick (the GPU suite's): one catalog, 128 reasoning tokens
        if mode == "quick":
            return [Spec("gemma2-2b", 100_000, 4, 4, 128)]
        return [Spec("gemma2-2b", v, 4, 4, 640) for v in (100_000, 1_000_000)]
    return [Spec("tiny", 2000, 4, 4, 16)]


def _config(spec: Spec, root: Path, style: str):
    from ..train.config import TrainConfig

    gpu = spec.model != "tiny"
    return TrainConfig.from_dict({
        "max_steps": 10 ** 6, "item_refresh_steps": 0, "save_every": 10 ** 6,
        "data": {"path": str(root / "data"), "synth_items": spec.items,
                 "synth_users": max(64, 4 * spec.users), "synth_history_max": 20},
        "model": {"path": str(root / "model"), "lora_r": 4 if gpu else 0,
                  "dtype": "bfloat16" if gpu else "float32"},
        "rollout": {"group_size": spec.group, "max_new_tokens": spec.new_tokens,
                    "engine": "paged" if style == "ours" else "hf"},
        "optim": {"users_per_step": spec.users, "lr": 1e-5, "warmup_steps": 0},
    })


def _build_model(spec: Spec, root: Path, seed: int) -> None:
    """The tiny model, or random weights in Gemma-2-2B's shape with a tokenizer trained on
    the first item prompts (the model's other vocabulary rows are never produced)."""
    from ..data.dataset import load_dataset
    from ..model.tiny import make_tiny_model, texts_for_tokenizer

    data = load_dataset(root / "data")
    if spec.model == "tiny":
        make_tiny_model("gemma2", texts_for_tokenizer(data), root / "model", seed=seed)
        return
    texts = itertools.islice(texts_for_tokenizer(data), 20_000)
    make_tiny_model("gemma2", texts, root / "model", vocab_size=256_000, seed=seed,
                    tokenizer_vocab=8192, config_overrides=GEMMA2_2B, dtype=torch.bfloat16,
                    hidden_size=GEMMA2_2B["hidden_size"],
                    num_layers=GEMMA2_2B["num_hidden_layers"])


def _trainer_class():
    from ..train.trainer import Trainer

    class StepTrainer(Trainer):
        """On CUDA: the set-up fills the item table with random rows instead of encoding
        the whole catalog, and a refresh re-encodes REFRESH_SAMPLE items (see the module
        docstring)."""

        sample: int | None = None

        def refresh_table(self) -> None:
            if self.sample is None:
                return super().refresh_table()
            from ..ops.item_table import ItemTable

            n = self.data.items.num_items
            if self.model.item_table is None:
                gen = torch.Generator().manual_seed(0)
                rows = torch.randn(n + 1, self.model.hidden_size, generator=gen)
                self.model.item_table = ItemTable(rows.to(self.device), similarity="cosine")
                return
            ids = torch.arange(1, min(n, self.sample) + 1, device=self.device)
            with self.timer("encode_items"):
                hidden = self._encode_no_grad(ids.tolist())
                self.model.refresh_rows(ids, hidden.float())
    return StepTrainer


class _Folder:
    """A temporary folder removed when the case's inputs are dropped."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="r2ec-bench-step-"))
        weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)


def _make_inputs(spec: Spec, seed: int, device: torch.device, sink: dict) -> dict:
    from ..data.dataset import save_with_progress
    from ..data.synthetic import make_synthetic

    folder = _Folder()
    root = folder.path
    save_with_progress(make_synthetic(spec.items, max(64, 4 * spec.users), seed=seed,
                                      history_len=(5, 20)), root / "data", progress=False)
    _build_model(spec, root, seed)
    cls = _trainer_class()
    sampled = spec.model != "tiny" if SAMPLED_REFRESH is None else SAMPLED_REFRESH
    cls.sample = REFRESH_SAMPLE if sampled else None
    trainers = {style: cls(_config(spec, root, style), root / f"run-{style}", progress=False,
                           device=str(device)) for style in ("ours", "reference-style")}
    return {"trainers": trainers, "spec": spec, "sink": sink, "folder": folder}


@contextlib.contextmanager
def _backend(name: str | None):
    saved = os.environ.get("R2EC_BACKEND")
    if name is None:
        os.environ.pop("R2EC_BACKEND", None)
    else:
        os.environ["R2EC_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("R2EC_BACKEND", None)
        else:
            os.environ["R2EC_BACKEND"] = saved


def _step(x: dict, style: str) -> dict:
    trainer, spec = x["trainers"][style], x["spec"]
    trainer.pop_times()  # nothing of the set-up or of another row
    with _backend("reference" if style == "reference-style" else None):
        metrics = trainer.train_step()
        trainer.refresh_table()
    times = trainer.pop_times()
    times = {k.removeprefix("time_"): v for k, v in times.items()}
    if trainer.sample is not None and "encode_items" in times:  # scaled to the catalog
        times["encode_items"] *= trainer.data.items.num_items / min(
            trainer.data.items.num_items, trainer.sample)
    prompts = trainer.user_prompt_ids("train", list(range(spec.users)))
    x["sink"].setdefault(style, []).append({
        "times": times, "tokens": metrics["reasoning_len"] * spec.users * spec.group,
        "prompt_len": statistics.mean(len(p) for p in prompts),
        "reasoning_len": metrics["reasoning_len"]})
    return {"loss": torch.tensor(metrics["loss"])}


def _reference(x):
    return {}, {"note": "nothing (a training step has no float64 reference)"}


def _checks(sink: dict):
    def checks(results: dict[str, dict]) -> list[dict]:
        out = []
        for style in ("ours", "reference-style"):
            runs = sink.get(style, [])[1:]  # after the warmup run
            if not runs:
                continue
            phases = {k: statistics.median(r["times"].get(k, 0.0) for r in runs) for k in PHASES}
            step_s = sum(v for k, v in phases.items() if k != "encode_items")
            tokens = statistics.median(r["tokens"] for r in runs)
            rate = f"{tokens / step_s:.0f}" if step_s > 0 else "n/a"
            out.append({"name": f"{style} seconds per phase (median of {len(runs)} steps)",
                        "passed": None,
                        "value": ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
                        + f"; the step without the refresh {step_s:.3f} s, {rate} reasoning "
                          "tokens/s"})
            out.append({"name": f"{style} lengths", "passed": None,
                        "value": f"prompt {runs[-1]['prompt_len']:.0f} tokens, reasoning "
                                 f"{runs[-1]['reasoning_len']:.1f} tokens per trajectory"})
        return out
    return checks


def _case(spec: Spec, seed: int) -> Case:
    sink: dict = {}
    dtype = torch.float32 if spec.model == "tiny" else torch.bfloat16
    about = {"ours": "Trainer.train_step + refresh: paged engine, automatic backends",
             "reference-style": "the same with rollout.engine=hf and R2EC_BACKEND=reference"}
    return Case(
        key=f"{spec.model} V={spec.items} B={spec.users} G={spec.group} "
            f"N={spec.new_tokens} {str(dtype).replace('torch.', '')}",
        shape={"V": spec.items, "B": spec.users, "G": spec.group, "N": spec.new_tokens},
        dtype=dtype, bytes_read=0,
        make_inputs=lambda device: _make_inputs(spec, seed, device, sink),
        reference=_reference, errors=lambda out, ref: {},
        impls=[Impl("reference-style", functools.partial(_step, style="reference-style"),
                    0.0, about=about["reference-style"]),
               Impl("ours", functools.partial(_step, style="ours"), 0.0,
                    baseline="reference-style", about=about["ours"])],
        checks=_checks(sink))


@register("step")
def step_cases(device: str, mode: str) -> list[Case]:
    return [_case(spec, seed=0) for spec in _shapes(device, mode)]

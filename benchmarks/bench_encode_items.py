"""Item-table encoding benchmark (DESIGN §5.8, §7): token-budget vs fixed-size batching.

Encoding the catalog (every item's chat-rendered prompt through the decoder, last-token state)
is redone every `item_refresh_steps` and before each evaluation. Two rows per case, the same
prompts through the same tiny random checkpoint (`make_tiny_model`, tokenizer trained on the
catalog), both `encode_texts` (tokenization included):
- "fixed": batching="fixed", prompts in catalog order, B per forward, where B is the budget
  run's mean prompts per batch (n / number of budget batches), so both rows run the same number
  of forwards and differ only in how prompts are grouped;
- "budget": batching="budget", longest first, batches filled up to the token budget.

Prompts: the synthetic catalog (`make_synthetic`), whose descriptions vary in length as a real
catalog's do (r2ec_fast/data/synthetic.py: 70-180 tokens with the tiny Gemma-2 tokenizer).
The acceptance check (CPU, 2,000 items): budget batching pads < 10% and encodes >= 1.5x the
items per second of fixed batching.

Errors: relative Frobenius error of the encodings against the same checkpoint in float64
(budget batching, padding-invariant by the tests) on the first REF_ROWS items.
Formulas, known once the prompts are tokenized (make_inputs fills them into the case):
flops = 2 x (decoder-layer weights) x real prompt tokens, the useful matmul work (attention
scores excluded, padding not counted: a row's TFLOP/s is its effective rate); bytes = the
decoder weights read once per forward x number of forwards (the same for both rows).
"""
from __future__ import annotations

import copy
import functools
import tempfile

import torch

from ..model.encode import (
    encode_texts,
    fixed_batches,
    item_texts,
    padding_fraction,
    token_budget_batches,
    tokenize_texts,
)
from ..testing import rel_error
from .harness import Case, Impl, register

REF_ROWS = 256
ACCEPTANCE = ("gemma2", 2000)  # arch, items: the CPU target
ACCEPT_PADDING = 0.10
ACCEPT_SPEEDUP = 1.5


@functools.lru_cache(maxsize=None)
def _catalog(num_items: int, seed: int):
    from ..data.synthetic import make_synthetic

    return make_synthetic(num_items, max(20, num_items // 10), seed=seed)


@functools.lru_cache(maxsize=None)
def _model(arch: str, num_items: int, hidden: int, layers: int, dtype, device: str,
           seed: int):
    """The tiny checkpoint (tokenizer trained on this catalog), loaded; its folder is removed
    once loaded."""
    from ..model.dual_head import DualHeadModel
    from ..model.tiny import make_tiny_model, texts_for_tokenizer

    data = _catalog(num_items, seed)
    with tempfile.TemporaryDirectory(prefix="r2ec-bench-") as tmp:
        make_tiny_model(arch, texts_for_tokenizer(data), tmp, hidden_size=hidden,
                        num_layers=layers, seed=seed)
        return DualHeadModel.from_pretrained(tmp, dtype=dtype, device=device)


def _layer_params(model) -> int:
    return sum(p.numel() for name, p in model.lm.named_parameters() if ".layers." in name)


def _shapes(device: str, mode: str):
    """(arch, items, hidden, layers, token budget, dtype) per case."""
    if mode == "smoke":
        return [("gemma2", 200, 32, 1, 2048, torch.float32)]
    if device == "cuda":
        n = 4000 if mode == "quick" else 20000
        return [("gemma2", n, 512, 4, 65536, torch.bfloat16),
                ("qwen2", n, 512, 4, 65536, torch.bfloat16)]
    if mode == "quick":
        return [("gemma2", 500, 64, 2, 8192, torch.float32)]
    return [("gemma2", 2000, 64, 2, 8192, torch.float32),
            ("qwen2", 2000, 64, 2, 8192, torch.float32)]


def _make_inputs(case: Case, spec, seed: int, device):
    arch, n, hidden, layers, budget, dtype = spec
    model = _model(arch, n, hidden, layers, dtype, str(device), seed)
    data = _catalog(n, seed)
    texts = item_texts(model.tokenizer, data.items, data.category)
    token_lengths = [len(t) for t in tokenize_texts(model.tokenizer, texts)]
    budget_batches = token_budget_batches(token_lengths, budget)
    batch_size = max(1, round(n / len(budget_batches)))
    fixed = fixed_batches(n, batch_size)
    # figures known only now that the prompts are tokenized (see the module docstring)
    real_tokens = sum(token_lengths)
    for impl in case.impls:
        impl.flops = 2.0 * _layer_params(model) * real_tokens
    case.bytes_read = (_layer_params(model) * torch.empty(0, dtype=dtype).element_size()
                       * len(budget_batches))
    case.shape.update(batch_size=batch_size, forwards=len(budget_batches),
                      min_tokens=min(token_lengths), max_tokens=max(token_lengths))
    case.stats = {"padding": {"budget": padding_fraction(token_lengths, budget_batches),
                              "fixed": padding_fraction(token_lengths, fixed)},
                  "batch_size": batch_size, "forwards": len(budget_batches), "items": n}
    return {"model": model, "texts": texts, "budget": budget, "batch_size": batch_size}


def _budget(x):
    return encode_texts(x["model"], x["texts"], token_budget=x["budget"], batching="budget",
                        progress=False)


def _fixed(x):
    return encode_texts(x["model"], x["texts"], batching="fixed", batch_size=x["batch_size"],
                        progress=False)


def _reference(x):
    model64 = copy.deepcopy(x["model"]).to(torch.float64)
    rows = min(REF_ROWS, len(x["texts"]))
    ref = encode_texts(model64, x["texts"][:rows], token_budget=x["budget"], progress=False)
    del model64
    return ({"hidden": ref.cpu()},
            {"dtype": "float64", "rows": rows, "subset": rows < len(x["texts"]),
             "note": f"the same checkpoint in float64 on the first {rows} of "
                     f"{len(x['texts'])} items"})


def _errors(out, ref):
    rows = ref["hidden"].shape[0]
    return {"hidden": rel_error(out[:rows], ref["hidden"])}


def _checks(case: Case, acceptance: bool):
    def checks(results: dict[str, dict]) -> list[dict]:
        stats = getattr(case, "stats", None)
        if stats is None:
            return []
        pad = stats["padding"]
        rate = {name: stats["items"] / (results[name]["time_ms"]["median"] * 1e-3)
                for name in ("budget", "fixed") if "time_ms" in results.get(name, {})}
        speedup = rate["budget"] / rate["fixed"] if len(rate) == 2 else None
        rates = ("not measured" if speedup is None else
                 f"{rate['budget']:.0f} vs {rate['fixed']:.0f} items/s = {speedup:.2f}x")
        pads = (f"budget {100 * pad['budget']:.1f}%, fixed {100 * pad['fixed']:.1f}% "
                f"({stats['forwards']} forwards each, fixed B={stats['batch_size']})")
        if not acceptance:
            return [{"name": "padding and items/s (no target on this case)", "passed": None,
                     "value": f"{pads}; {rates}"}]
        return [
            {"name": f"budget batching pads < {100 * ACCEPT_PADDING:.0f}% of the token slots",
             "passed": pad["budget"] < ACCEPT_PADDING, "value": pads},
            {"name": f"budget batching items/s >= {ACCEPT_SPEEDUP}x fixed's",
             "passed": None if speedup is None else speedup >= ACCEPT_SPEEDUP, "value": rates},
        ]
    return checks


def _case(spec, seed: int, device: str) -> Case:
    arch, n, hidden, layers, budget, dtype = spec
    acceptance = device == "cpu" and (arch, n) == ACCEPTANCE
    case = Case(
        key=f"{arch} items={n} d={hidden} layers={layers} budget={budget} "
            f"{str(dtype).replace('torch.', '')}",
        shape={"items": n, "d": hidden, "layers": layers, "token_budget": budget},
        dtype=dtype, bytes_read=0, make_inputs=None, reference=_reference, errors=_errors,
        impls=[
            Impl("fixed", _fixed, 0.0,
                 about="encode_texts(batching='fixed'), catalog order, B = the budget run's "
                       "mean prompts per batch (same number of forwards)"),
            Impl("budget", _budget, 0.0, baseline="fixed",
                 about=f"encode_texts(batching='budget', token_budget={budget}): longest "
                       "first, batches filled up to the budget"),
        ])
    case.make_inputs = lambda device_: _make_inputs(case, spec, seed, device_)
    case.checks = _checks(case, acceptance)
    return case


@register("encode_items")
def encode_items_cases(device: str, mode: str) -> list[Case]:
    return [_case(spec, seed=0, device=device) for spec in _shapes(device, mode)]

"""Evaluation (DESIGN §5 step 10): greedy reasoning, then full-catalog scoring with the
history excluded; Hit@K and NDCG@K for K in 5, 10, 20, 50."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

KS = (5, 10, 20, 50)


def rank_metrics(rank: torch.Tensor, ks=KS) -> dict[str, float]:
    """Hit@K = rank < K; NDCG@K = 1 / log2(rank + 2) when rank < K (one relevant item)."""
    rank = rank.double().cpu()
    out = {}
    for k in ks:
        hit = rank < k
        out[f"hit@{k}"] = hit.double().mean().item() if rank.numel() else math.nan
        gain = torch.where(hit, 1.0 / torch.log2(rank + 2.0), 0.0)
        out[f"ndcg@{k}"] = gain.mean().item() if rank.numel() else math.nan
    return out


@torch.no_grad()
def evaluate(model, rollout, prompts: list[list[int]], targets: torch.Tensor,
             histories: torch.Tensor, temperature: float = 0.02, batch_size: int = 32,
             progress: bool = True, desc: str = "eval") -> dict[str, float]:
    """Metrics of the greedy trajectories of `prompts` (token ids) against `targets` [R] with
    `histories` [R, W] (-1 pads) excluded; the model's item table must be current."""
    from r2ec_fast.ops import score_catalog
    from r2ec_fast.train.step import exclusion, trajectory_batch

    if model.item_table is None:
        raise RuntimeError("evaluate needs the model's item table: call encode_items first")
    was_training = model.training
    model.eval()
    ranks, lengths = [], []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress,
                          unit="batch"):
            trajs = rollout.greedy(prompts[start:start + batch_size])
            batch = trajectory_batch(trajs, model.tokenizer.pad_token_id, model.device)
            h = model.last_hidden(batch.input_ids, batch.attention_mask)
            sl = slice(start, start + len(trajs))
            scores = score_catalog(h.float(), model.item_table, targets[sl].to(model.device),
                                   exclude=exclusion(histories[sl].to(model.device)),
                                   temperature=temperature)
            ranks.append(scores.rank.cpu())
            lengths += [t.sampled for t in trajs]
    finally:
        model.train(was_training)
    out = rank_metrics(torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long))
    out["users"] = len(prompts)
    out["reasoning_len"] = sum(lengths) / max(1, len(lengths))
    return out


def popularity_ranks(train_targets, num_items: int, targets, histories) -> torch.Tensor:
    """Ranks [R] of `targets` when items are ordered by how often they are a train target
    (ties: smaller id first), with each row's history [R, W] (-1 pads) and the padding item 0
    excluded: the popularity baseline on the same footing as `evaluate`."""
    import numpy as np

    counts = np.bincount(np.asarray(train_targets), minlength=num_items + 1).astype(np.int64)
    # one key per item: higher count first, then smaller id
    key = counts * (num_items + 2) + (num_items + 1 - np.arange(num_items + 1))
    order_key = np.sort(key[1:])
    ranks = []
    for target, hist in zip(np.asarray(targets).tolist(), np.asarray(histories).tolist()):
        above = len(order_key) - np.searchsorted(order_key, key[target], side="right")
        seen = {i for i in hist if i > 0 and i != target}
        above -= sum(1 for i in seen if key[i] > key[target])
        ranks.append(above)
    return torch.tensor(ranks, dtype=torch.long)


def format_table(columns: dict[str, dict], ks=KS) -> str:
    """Hit@K / NDCG@K rows, one column per named result."""
    names = list(columns)
    lines = ["metric    " + "".join(f"{n:>14}" for n in names)]
    for kind in ("hit", "ndcg"):
        for k in ks:
            key = f"{kind}@{k}"
            lines.append(f"{key:<10}" + "".join(f"{columns[n].get(key, math.nan):>14.4f}"
                                                for n in names))
    return "\n".join(lines)

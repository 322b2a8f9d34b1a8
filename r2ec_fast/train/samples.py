"""What the policy writes: one user's prompt, its G sampled reasoning chains and the items each
chain's final state recommends (`TrainConfig.sample_every`).

Printed above the progress bar and appended to `samples.jsonl` in the run folder, one JSON
object per report: {"step", "row", "prompt", "target", "chains": [{"reasoning", "reward",
"target_rank", "top5": [[item id, title], ...]}, ...]}.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SAMPLES_FILE = "samples.jsonl"


@torch.no_grad()
def sample_report(model, items, prompt: str, target: int, trajs, h: torch.Tensor,
                  reward: torch.Tensor, exclude: torch.Tensor, temperature: float,
                  k: int = 5) -> dict:
    """The report of one user: `trajs` its G trajectories, `h` [G, d] their answer states,
    `reward` [G], `exclude` [G, W] the ids dropped from the ranking (its history)."""
    from r2ec_fast.ops import score_catalog

    tok = model.tokenizer
    scores = score_catalog(h.float(), model.item_table,
                           torch.full((len(trajs),), target, device=h.device),
                           exclude=exclude, temperature=temperature, topk=k)
    chains = []
    for g, traj in enumerate(trajs):
        reasoning = tok.decode(traj.completion[:traj.sampled], skip_special_tokens=True)
        ids = scores.topk_ids[g].tolist()
        chains.append({"reasoning": reasoning.strip(), "reward": float(reward[g]),
                       "target_rank": int(scores.rank[g]),
                       "top5": [[i, items.title[i]] for i in ids]})
    return {"prompt": prompt, "target": [target, items.title[target]], "chains": chains}


def format_report(report: dict) -> str:
    lines = [f"--- step {report['step']}, train row {report['row']} ---", report["prompt"],
             f"target: {report['target'][1]} (item {report['target'][0]})"]
    for g, chain in enumerate(report["chains"]):
        lines.append(f"[chain {g}] reward {chain['reward']:.3f}, target rank "
                     f"{chain['target_rank']}: {chain['reasoning'] or '(no reasoning)'}")
        lines += [f"    {n + 1}. {title} (item {i})" for n, (i, title) in
                  enumerate(chain["top5"])]
    return "\n".join(lines)


def write_report(run_dir: str | Path, report: dict) -> None:
    with open(Path(run_dir) / SAMPLES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(report) + "\n")

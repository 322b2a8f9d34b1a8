"""`r2ec-fast ablate`: every variant and seed trained from scratch, the table's means, stds
and paired differences computed from the runs' own metrics, the curves plotted."""
import json
import math

import pytest

from r2ec_fast.cli import main
from r2ec_fast.commands.ablate import CURVE_KEY, VARIANTS, mean_std, summarise, variant_config


def test_summary_numbers_are_the_runs_numbers():
    runs = lambda *v: {s: {"test": {"hit@5": x, "hit@10": x, "ndcg@10": x, "ndcg@20": x}}  # noqa
                       for s, x in enumerate(v)}
    results = {"R2ec": runs(0.30, 0.20, 0.25), "w/o reasoning": runs(0.10, 0.20, 0.15)}
    text = summarise(results, "test")
    assert "| R2ec | 0.2500 ± 0.0500 |" in text
    assert "| w/o reasoning | 0.1500 ± 0.0500 |" in text
    # paired differences -0.2, 0.0, -0.1: mean -0.1, std 0.1, standard error 0.1 / sqrt(3)
    assert f"-0.1000 ± {0.1 / math.sqrt(3):.4f} |" in text
    assert "warm start" not in text
    for name, curves in (("R2ec", ([(0, .0), (4, .1), (8, .3)], [(0, .0), (4, .2), (8, .3)],
                                   [(0, .0), (4, .1), (8, .1)])),
                         ("w/o reasoning", ([(0, .0), (8, .2)],) * 3)):
        for seed, curve in enumerate(curves):
            results[name][seed]["curve"] = curve
    text = summarise(results, "test", warm_step=4)
    # gains 0.2, 0.1, 0.0: mean 0.1, std 0.1; w/o reasoning has no step 4, no row
    assert ("| R2ec | 0.1000 -> 0.3000 | 0.2000 -> 0.3000 | 0.1000 -> 0.1000 | "
            f"+0.1000 ± {0.1 / math.sqrt(3):.4f} |") in text
    assert text.count("| w/o reasoning |") == 1
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (
        2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))


def test_variants_change_only_what_they_name():
    from r2ec_fast.train.config import get_preset

    base = get_preset("tiny")
    assert variant_config(base, "w/o reasoning", 1).algo == "contrastive"
    assert variant_config(base, "warm start only", 0).warm_start_steps == base.max_steps
    assert variant_config(base, "w/o R_c", 0).recpo.beta == 0.0
    assert variant_config(base, "w/o R_d", 0).recpo.beta == 1.0
    assert variant_config(base, "RLOO", 0).recpo.advantage == "rloo"
    r2ec = variant_config(base, "R2ec", 2)
    assert r2ec.seed == 2 and r2ec.model.path == base.model.path + "-seed2"
    same = r2ec.to_dict()
    for key in ("seed", "model"):
        same.pop(key)
    base_dict = base.to_dict()
    for key in ("seed", "model"):
        base_dict.pop(key)
    assert same == base_dict
    assert variant_config(base, "w/o anchor", 0).recpo.anchor_weight == 0.0
    anchor_only = variant_config(base, "anchor only", 0).recpo
    assert anchor_only.token_loss_weight == anchor_only.item_loss_weight == 0.0
    assert anchor_only.anchor_weight == base.recpo.anchor_weight > 0
    assert set(VARIANTS) == {"R2ec", "w/o anchor", "anchor only", "w/o reasoning", "warm start only", "w/o R_c", "w/o R_d",
                             "RLOO"}


def test_ablate_runs_every_variant_and_seed(tmp_path, capsys):
    values = {"max_steps": 4, "warm_start_steps": 2, "eval_every": 2, "save_every": 0,
              "item_refresh_steps": 0, "warm_start_reasoning": "target_description",
              "data": {"path": str(tmp_path / "data"), "synth_items": 120, "synth_users": 30,
                       "synth_genres": 4, "synth_attributes": 4, "eval_users": 6},
              "model": {"path": str(tmp_path / "model"), "tiny_arch": "gemma2"},
              "rollout": {"group_size": 2, "max_new_tokens": 6, "eval_max_new_tokens": 6},
              "optim": {"lr": 1e-3, "warmup_steps": 1, "users_per_step": 4}}
    config = tmp_path / "base.json"
    config.write_text(json.dumps(values))
    out = tmp_path / "ab"
    code = main(["ablate", "--config", str(config), "--seeds", "0,1", "--variant", "R2ec",
                 "--variant", "w/o reasoning", "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads((out / "ablation.json").read_text())
    results = data["results"]
    assert set(results) == {"R2ec", "w/o reasoning"} and data["split"] == "test"
    for name, runs in results.items():
        assert set(runs) == {"0", "1"}
        for seed, run in runs.items():
            # the curve: step 0, the eval every 2 steps (the last at the end)
            assert [s for s, _ in run["curve"]] == [0, 2, 4]
            assert all(0 <= v <= 1 for _, v in run["curve"])
            assert run["users"] == 6 and set(run["test"]) >= {"hit@5", CURVE_KEY}
            folder = out / f"{name.replace('/', '').replace(' ', '-')}-s{seed}"
            assert (folder / "metrics.jsonl").is_file()
    table = (out / "ablation.md").read_text()
    assert "at the end of the warm start (step 2)" in table
    gains = [results["R2ec"][k]["curve"][2][1] - results["R2ec"][k]["curve"][1][1]
             for k in ("0", "1")]
    assert f"| {mean_std(gains)[0]:+.4f} ± " in table.split("| R2ec |")[2]
    m, s = mean_std([results["R2ec"][k]["test"]["hit@5"] for k in ("0", "1")])
    assert f"| R2ec | {m:.4f} ± {s:.4f} |" in table
    assert (out / "ablation_valid_ndcg.png").stat().st_size > 1000
    assert "w/o reasoning, seed 1: test NDCG@10" in capsys.readouterr().out
    assert (tmp_path / "model-seed0").is_dir() and (tmp_path / "model-seed1").is_dir()
    assert main(["ablate", "--config", str(config), "--out", str(out)]) == 2  # not empty
    assert main(["ablate", "--config", str(config), "--variant", "nope",
                 "--out", str(tmp_path / "x")]) == 2
    values["data"].update(path=str(tmp_path / "d2"), synth_genres=16, synth_attributes=12)
    config.write_text(json.dumps(values))  # 120 items cannot fill 16 x 12 cells: refused
    assert main(["ablate", "--config", str(config), "--out", str(tmp_path / "y")]) == 2
    assert "need an integer >= num_genres * num_attributes" in capsys.readouterr().err

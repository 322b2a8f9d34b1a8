"""synth-data: the generative process of r2ec_fast/data/synthetic.py at small sizes."""
from __future__ import annotations

import argparse
import contextlib
import io

import numpy as np
import pytest

from r2ec_fast.commands.synth_data import add_synth_data
from r2ec_fast.data.dataset import SPLITS, load_dataset, save_dataset
from r2ec_fast.data.synthetic import (ATTRIBUTES, CATEGORY, GENRES, baselines, item_facets,
                                      make_synthetic, rule_cell)

SMALL = dict(num_items=240, num_users=150, num_genres=6, num_attributes=4)  # 10 items a cell


@pytest.fixture(scope="module")
def small():
    return make_synthetic(seed=3, **SMALL)


def arrays(data):
    out = {"avg": data.items.average_rating, "num": data.items.rating_number}
    for s in SPLITS:
        for col in ("history_offsets", "history_item_id", "history_rating", "history_timestamp",
                    "item_id", "rating", "timestamp", "interaction_id"):
            out[f"{s}.{col}"] = getattr(data[s], col)
    return out


def test_deterministic_given_seed(small):
    again, other = make_synthetic(seed=3, **SMALL), make_synthetic(seed=4, **SMALL)
    assert again.items.title == small.items.title
    assert again.items.description == small.items.description
    assert again.meta == small.meta
    a, b = arrays(small), arrays(again)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    assert other.items.title != small.items.title
    assert not np.array_equal(other["train"].item_id, small["train"].item_id)


def test_catalog_text_names_genre_and_attribute(small):
    items = small.items
    assert small.category == CATEGORY and items.num_items == SMALL["num_items"]
    assert len(set(items.title[1:])) == items.num_items  # unique names
    genre, attribute = item_facets(items)
    cells = np.bincount(np.asarray(genre[1:]) * SMALL["num_attributes"] + attribute[1:])
    assert cells.tolist() == [10] * 24
    for i in (1, 77, 240):
        g, a = GENRES[genre[i]][0], ATTRIBUTES[attribute[i]]
        assert items.categories[i] == g and items.title[i].startswith(a + " ")
        assert g.lower() in items.description[i] and a.lower() in items.description[i]
        assert 2 <= len(items.description[i].split("\n")) <= 16  # 2 + 0..14 fillers
    fillers = np.array([len(d.split("\n")) - 2 for d in items.description[1:]])
    assert 0.3 < (fillers == 0).mean() < 0.5 and fillers.max() == 14  # lengths vary
    # ratings come from the generated interactions
    assert items.rating_number.sum() == small.meta["interactions"]
    rated = items.rating_number > 0
    assert ((items.average_rating[rated] >= 1) & (items.average_rating[rated] <= 5)).all()


def test_histories_newest_last_nonempty_and_temporal_split(small):
    sizes = [len(small[s]) for s in SPLITS]
    total = sum(sizes)
    assert sizes[0] == int(np.floor(0.8 * total + 0.5))
    assert sizes[0] + sizes[1] == int(np.floor(0.9 * total + 0.5))
    assert small["train"].timestamp.max() <= small["valid"].timestamp.min()
    assert small["valid"].timestamp.max() <= small["test"].timestamp.min()
    ids = np.concatenate([small[s].interaction_id for s in SPLITS])
    assert ids.tolist() == list(range(total))
    for s in SPLITS:
        split = small[s]
        lengths = np.diff(split.history_offsets)
        assert lengths.min() >= 1 and lengths.max() <= 20
        for r in range(0, len(split), 7):
            ts = split.history_timestamp[split.history_offsets[r]:split.history_offsets[r + 1]]
            assert (np.diff(ts) > 0).all() and ts[-1] < split.timestamp[r]
    # samples per user: every interaction after the first, for users with 6..21 interactions
    per_user = {}
    for s in SPLITS:
        for u in small[s].user_id:
            per_user[u] = per_user.get(u, 0) + 1
    assert len(per_user) == SMALL["num_users"] and 5 <= min(per_user.values())
    assert max(per_user.values()) <= 20 and total == small.meta["interactions"] - 150


def test_history_window_truncates(small):
    data = make_synthetic(seed=3, history_window=4, **SMALL)
    assert np.diff(data["train"].history_offsets).max() == 4
    # the newest history item is the user's previous interaction (same log as the default)
    assert data.meta["interactions"] == small.meta["interactions"]


def test_round_trip_through_load_dataset(small, tmp_path):
    save_dataset(small, tmp_path / "synth")
    loaded = load_dataset(tmp_path / "synth")
    assert loaded.category == CATEGORY and loaded.meta["seed"] == 3
    assert loaded.items.title == small.items.title
    assert loaded.items.categories == small.items.categories
    a, b = arrays(small), arrays(loaded)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert loaded["test"].user_id == small["test"].user_id


def test_rule_beats_popularity_by_a_clear_margin(small):
    scores = baselines(small, "test", k=10)
    rule, pop = scores["rule"], scores["popularity"]
    assert scores["rows"] == len(small["test"])
    assert rule["hit@10"] > 0.6 and rule["hit@10"] <= small.meta["rule_fraction"] + 0.1
    assert rule["hit@10"] > 5 * pop["hit@10"] and rule["ndcg@10"] > 5 * pop["ndcg@10"]
    # the rule ranks its cell's candidates (<= 10 here) first, so it hits every rule target;
    # without noise a user stays in one cell and only its exhaustion breaks the rule
    clean = make_synthetic(seed=3, noise=0.0, **SMALL)
    assert clean.meta["rule_fraction"] > 0.9
    for data in (small, clean):
        hit = baselines(data, "test")["rule"]["hit@10"]
        assert hit == pytest.approx(data.meta["rule_fraction"], abs=0.05)


def test_rule_cell_ties_go_to_the_first_genre():
    genre = [-1, 0, 1, 1, 0, 2]
    attribute = [-1, 3, 2, 1, 0, 5]
    assert rule_cell([1, 2, 3, 4], genre, attribute) == (0, 0)  # 0 and 1 tie: 0 came first
    assert rule_cell([2, 1, 3, 4, 5], genre, attribute) == (1, 5)
    assert rule_cell([5], genre, attribute) == (2, 5)


def test_baselines_reject_a_foreign_catalog():
    data = make_synthetic(seed=3, **SMALL)  # a fresh one: the test edits it
    data.items.categories[5] = "Video Games"
    with pytest.raises(ValueError, match="item 5 .* not a synthetic item"):
        baselines(data)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_items=100, num_users=10), r"num_items=100.*>= num_genres \* num_attributes = 192"),
    (dict(num_items=24, num_users=10, num_genres=6, num_attributes=5), "num_items=24"),
    (dict(num_items=500, num_users=0), "num_users"),
    (dict(num_items=500, num_users=-3), "num_users"),
    (dict(num_items=500, num_users=10, history_len=(5, 2)), "history_len"),
    (dict(num_items=500, num_users=10, noise=1.0), "noise"),
    (dict(num_items=500, num_users=10, num_genres=17), "num_genres"),
    (dict(num_items=500, num_users=10, history_window=0), "history_window"),
    (dict(num_items=12, num_users=10, num_genres=3, num_attributes=4), "exceed history_window"),
    (dict(num_items=500, num_users=1, history_len=(5, 5)), "5 samples are too few"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(**kwargs)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="r2ec-fast")
    add_synth_data(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = args.func(args)
    return status, stdout.getvalue(), stderr.getvalue()


def test_cli(tmp_path):
    out = tmp_path / "synth"
    status, stdout, _ = run_cli(["synth-data", "--out", str(out), "--items", "240", "--users",
                                 "120", "--seed", "1", "--genres", "6", "--attributes", "4"])
    assert status == 0
    data = load_dataset(out)
    assert data.meta["seed"] == 1 and data.items.num_items == 240
    assert "items: 240" in stdout and "users with samples: 120" in stdout
    assert "popularity" in stdout and "rule on the history text" in stdout
    assert "Hit@10" in stdout and "NDCG@10" in stdout
    status, stdout, stderr = run_cli(["synth-data", "--out", str(tmp_path / "bad"), "--items",
                                      "10", "--users", "5"])
    assert status == 2 and "num_items=10" in stderr and not stdout
    assert not (tmp_path / "bad").exists()

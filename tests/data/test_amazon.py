"""prepare-data on small hand-made Amazon Reviews 2023 files (written into tmp_path).

The protocol is in r2ec_fast/data/amazon.py: window widened backwards by YEAR_MS until
min_items items, optional K-core, per-user histories newest last, temporal 80/10/10 split.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json

import numpy as np
import pytest

from r2ec_fast.commands.prepare_data import add_prepare_data
from r2ec_fast.data.amazon import YEAR_MS, kcore_mask, prepare_amazon
from r2ec_fast.data.dataset import SPLITS, load_dataset

T_END = 1_700_000_000_000  # ms, the newest review of the base log
DAY = 24 * 3600 * 1000


def write_jsonl(path, objects, gz=False):
    text = "".join(json.dumps(o) + "\n" for o in objects)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def review(user, asin, ts, rating=5.0):
    return {"rating": rating, "title": "ok", "text": "fine", "parent_asin": asin,
            "asin": asin + "-v", "user_id": user, "timestamp": ts, "verified_purchase": True,
            "helpful_vote": 0}


def item_meta(asin, title=None):
    return {"parent_asin": asin, "title": f"Thing {asin}" if title is None else title,
            "main_category": "Toys", "average_rating": 4.5, "rating_number": 7,
            "description": [f"About {asin}.", "Second paragraph."], "features": [],
            "categories": ["Toys", "Blocks"], "details": {}, "price": None}


def base_log():
    """Three years of reviews: items I00-I04 only in the newest year, I05-I07 only in the year
    before, I08-I09 only in the oldest; 10 users with 3-6 reviews each. I01 and I03 have two
    reviews each, so a 3-core drops them (and then more)."""
    pools = ([0, 1, 2, 3, 4], [5, 6, 7], [8, 9, 8])
    reviews = []
    for u in range(10):
        for j in range(3 + u % 4):
            year = (u + j) % 3  # 0: the newest year
            ts = T_END - year * YEAR_MS - (1 + (37 * u + 11 * j) % 300) * DAY
            pool = pools[year]
            reviews.append(review(f"U{u}", f"I{pool[(u + 2 * j) % len(pool)]:02d}", ts,
                                  float(1 + (u + j) % 5)))
    reviews.append(review("U0", "I00", T_END))  # pins the newest timestamp
    return reviews


@pytest.fixture
def raw(tmp_path):
    """The base log: reviews plain, meta gzipped (+ one item without meta, one untitled)."""
    reviews = base_log() + [review("U1", "NOMETA", T_END - DAY),
                            review("U2", "UNTITLED", T_END - 2 * DAY)]
    metas = [item_meta(f"I{i:02d}") for i in range(10)] + [item_meta("UNTITLED", title="  ")]
    return (write_jsonl(tmp_path / "reviews.jsonl", reviews),
            write_jsonl(tmp_path / "meta.jsonl.gz", metas, gz=True))


def prepare(raw, out, **kw):
    return prepare_amazon(raw[0], raw[1], "Toys", out, progress=False, **kw)


def interactions(data):
    """The whole kept interaction log recovered from the samples: {user: [(ts, item), ...]}."""
    log = {}
    for split in data.splits.values():
        for r in range(len(split)):
            o = split.history_offsets
            hist = list(zip(split.history_timestamp[o[r]:o[r + 1]].tolist(),
                            split.history(r).tolist()))
            log.setdefault(split.user_id[r], set()).update(
                hist + [(int(split.timestamp[r]), int(split.item_id[r]))])
    return log


def test_window_widens_until_min_items(raw, tmp_path):
    data = prepare(raw, tmp_path / "out", min_items=7)  # newest year 5 items, two years 8
    meta = data.meta
    assert meta["window_years"] == 2 and meta["min_items_reached"]
    assert meta["window_end_ms"] == T_END and meta["window_start_ms"] == T_END - 2 * YEAR_MS
    assert meta["items_in_window"] == 8 and data.items.num_items == 8
    assert "I08" not in " ".join(data.items.title[1:])
    for split in data.splits.values():
        assert split.history_timestamp.min() >= meta["window_start_ms"]
        assert split.timestamp.min() >= meta["window_start_ms"]


def test_window_stops_at_first_year_when_enough(raw, tmp_path):
    # 6 samples in the newest year: a 50/25/25 split keeps every split non-empty
    data = prepare(raw, tmp_path / "out", min_items=5, split_fractions=(0.5, 0.25, 0.25))
    assert data.meta["window_years"] == 1 and data.items.num_items == 5
    assert [len(data[s]) for s in SPLITS] == [3, 2, 1]
    with pytest.raises(ValueError, match=r"6 samples are too few.*higher min_items"):
        prepare(raw, tmp_path / "out80", min_items=5)


def test_window_uses_everything_when_min_items_not_reached(raw, tmp_path):
    data = prepare(raw, tmp_path / "out", min_items=1000)
    meta = data.meta
    assert not meta["min_items_reached"] and meta["window_covers_all_data"]
    assert "1000" in meta["note"] and data.items.num_items == 10
    assert meta["counts"]["interactions"] == len(base_log())


def test_items_without_titled_meta_are_dropped(raw, tmp_path):
    data = prepare(raw, tmp_path / "out", min_items=1000)
    titles = data.items.title[1:]
    assert titles == sorted(titles) and titles == [f"Thing I{i:02d}" for i in range(10)]
    assert data.meta["counts"]["reviews_without_titled_meta"] == 2
    assert data.items.description[1] == "About I00.\nSecond paragraph."
    assert data.items.categories[1] == "Toys" and data.items.rating_number[1] == 7


def test_history_window_truncates_newest_last_with_file_order_ties(tmp_path):
    # one long user; two reviews share a timestamp: the file order decides
    reviews = [review("A", f"I{j:02d}", T_END - (30 - j) * DAY) for j in range(30)]
    reviews[10]["timestamp"] = reviews[11]["timestamp"]
    reviews += [review("B", "I00", T_END - 5 * DAY), review("B", "I01", T_END - 4 * DAY)]
    raw = (write_jsonl(tmp_path / "r.jsonl", reviews),
           write_jsonl(tmp_path / "m.jsonl", [item_meta(f"I{j:02d}") for j in range(30)]))
    data = prepare(raw, tmp_path / "out", history_window=5)
    rows = [(s, r) for s in data.splits.values() for r in range(len(s)) if s.user_id[r] == "A"]
    assert len(rows) == 29
    for split, r in rows:
        target = int(split.item_id[r])  # item "Ijj" has id jj + 1: ids follow sorted asins
        assert split.history(r).tolist() == list(range(max(1, target - 5), target))
        ts = split.history_timestamp[split.history_offsets[r]:split.history_offsets[r + 1]]
        assert (np.diff(ts) >= 0).all() and ts[-1] <= split.timestamp[r]


def test_temporal_split_boundaries(raw, tmp_path):
    data = prepare(raw, tmp_path / "out", min_items=1000)
    sizes = [len(data[s]) for s in SPLITS]
    total = sum(sizes)
    assert sizes[0] == int(np.floor(0.8 * total + 0.5))
    assert sizes[0] + sizes[1] == int(np.floor(0.9 * total + 0.5))
    ids = np.concatenate([data[s].interaction_id for s in SPLITS])
    assert ids.tolist() == list(range(total))
    assert data["train"].timestamp.max() <= data["valid"].timestamp.min()
    assert data["valid"].timestamp.max() <= data["test"].timestamp.min()
    for s in SPLITS:
        assert (np.diff(data[s].timestamp) >= 0).all()
        assert (np.diff(data[s].history_offsets) >= 1).all()


def test_kcore_mask_matches_naive_loop():
    rng = np.random.default_rng(0)
    user, item = rng.integers(0, 30, 300), rng.integers(0, 40, 300)
    for k in (2, 5, 9):
        alive = set(range(300))
        while True:
            uc, ic = {}, {}
            for i in alive:
                uc[user[i]] = uc.get(user[i], 0) + 1
                ic[item[i]] = ic.get(item[i], 0) + 1
            dead = {i for i in alive if uc[user[i]] < k or ic[item[i]] < k}
            if not dead:
                break
            alive -= dead
        assert np.flatnonzero(kcore_mask(user, item, k)).tolist() == sorted(alive)


def test_kcore_end_to_end(raw, tmp_path):
    full = prepare(raw, tmp_path / "full", min_items=1000)
    data = prepare(raw, tmp_path / "k3", min_items=1000, kcore=3)
    log = interactions(data)
    kept, before = data.meta["counts"]["interactions"], full.meta["counts"]["interactions"]
    assert data.meta["kcore"] == 3 and kept < before - 4  # more than I01's and I03's reviews
    assert "Thing I01" not in data.items.title and "Thing I03" not in data.items.title
    per_item = {}
    for pairs in log.values():
        assert len(pairs) >= 3
        for _, i in pairs:
            per_item[i] = per_item.get(i, 0) + 1
    assert min(per_item.values()) >= 3 and len(per_item) == data.items.num_items


def test_deterministic_and_round_trip(raw, tmp_path):
    a = prepare(raw, tmp_path / "a", min_items=7)
    b = prepare(raw, tmp_path / "b", min_items=7)
    loaded = load_dataset(tmp_path / "a")
    for other in (b, loaded):
        assert other.items.title == a.items.title
        assert other.items.description == a.items.description
        assert other.items.categories == a.items.categories
        for name in ("average_rating", "rating_number"):
            x, y = getattr(a.items, name), getattr(other.items, name)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
        for s in SPLITS:
            assert other[s].user_id == a[s].user_id
            for col in ("history_offsets", "history_item_id", "history_rating",
                        "history_timestamp", "item_id", "rating", "timestamp", "interaction_id"):
                x, y = getattr(a[s], col), getattr(other[s], col)
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (s, col)
    assert loaded.category == "Toys" and loaded.meta["window_years"] == 2


@pytest.mark.parametrize("which", ["reviews", "meta"])
def test_malformed_line_names_file_and_line(raw, tmp_path, which):
    reviews = [json.dumps(review("U1", "I00", T_END)), json.dumps(review("U1", "I01", T_END)),
               '{"user_id": "U2", "parent_asin": ']
    metas = [json.dumps(item_meta("I00")), "", "not json", json.dumps(item_meta("I01"))]
    path = tmp_path / ("r.jsonl" if which == "reviews" else "m.jsonl.gz")
    if which == "reviews":
        path.write_text("\n".join(reviews) + "\n")
        files = (path, raw[1])
        line = 3
    else:
        with gzip.open(path, "wt") as f:
            f.write("\n".join(metas) + "\n")
        files = (raw[0], path)
        line = 3  # blank lines count
    with pytest.raises(ValueError, match=rf"{path.name}: line {line}: malformed JSON"):
        prepare(files, tmp_path / "out")


def test_review_without_a_needed_field(raw, tmp_path):
    bad = review("U1", "I00", T_END)
    del bad["timestamp"]
    path = write_jsonl(tmp_path / "r.jsonl", [review("U1", "I01", T_END), bad])
    with pytest.raises(ValueError, match=r"line 2: no 'timestamp' field"):
        prepare((path, raw[1]), tmp_path / "out")


def test_bad_inputs_raise_clear_errors(raw, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="does not exist"):
        prepare((tmp_path / "nope.jsonl", raw[1]), out)
    with pytest.raises(ValueError, match="min_items"):
        prepare(raw, out, min_items=0)
    with pytest.raises(ValueError, match="kcore"):
        prepare(raw, out, kcore=-1)
    with pytest.raises(ValueError, match="history_window"):
        prepare(raw, out, history_window=0)
    with pytest.raises(ValueError, match="split_fractions"):
        prepare(raw, out, split_fractions=(0.5, 0.5, 0.5))
    other = write_jsonl(tmp_path / "other.jsonl", [item_meta("Z1")])
    with pytest.raises(ValueError, match="'Toys'.*none of the"):
        prepare((raw[0], other), out)
    with pytest.raises(ValueError, match="leaves no interaction"):
        prepare(raw, out, kcore=50)
    assert not out.exists()


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="r2ec-fast")
    add_prepare_data(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = args.func(args)
    return status, stdout.getvalue(), stderr.getvalue()


def test_cli(raw, tmp_path):
    out = tmp_path / "cli"
    status, stdout, _ = run_cli(["prepare-data", "--reviews", str(raw[0]), "--meta", str(raw[1]),
                                 "--category", "Toys", "--out", str(out), "--min-items", "7",
                                 "--no-progress"])
    assert status == 0
    data = load_dataset(out)
    assert f"items: {data.items.num_items}" in stdout and "users with samples:" in stdout
    assert f"train {len(data['train'])}, valid {len(data['valid'])}" in stdout
    status, stdout, stderr = run_cli(["prepare-data", "--reviews", str(tmp_path / "missing"),
                                      "--meta", str(raw[1]), "--category", "Toys",
                                      "--out", str(out), "--no-progress"])
    assert status == 2 and "missing" in stderr and "does not exist" in stderr and not stdout

"""Build the reference format (DESIGN §6) from Amazon Reviews 2023 raw JSONL.

Amazon Reviews 2023 ships, per category, a reviews file (one review a line: ``rating``,
``parent_asin``, ``user_id``, ``timestamp`` in milliseconds, ...) and a meta file (one item a
line: ``parent_asin``, ``title``, ``description``, ``main_category``, ``average_rating``,
``rating_number``, ...); either may be gzipped. `prepare_amazon` turns them into a `RecDataset`
with the R²ec protocol:

1. Items are identified by ``parent_asin``. A review is dropped when its item has no meta entry
   or an empty title.
2. Time window, widened backwards: with ``end`` = the newest review, the window is
   ``[end - years * YEAR_MS, end]`` for years = 1, 2, ... until it holds ``min_items`` distinct
   items. When even the whole data holds fewer, all of it is used and ``meta`` says so
   (``min_items_reached: false``). Items are counted before the K-core step.
3. Optional K-core (``kcore > 0``): users and items with fewer than ``kcore`` interactions
   are dropped, repeatedly, until none is left.
4. Samples (`build_splits`): each user's interactions are ordered by (timestamp, line in the
   reviews file); every interaction after the user's first is a sample whose history is the
   previous ``history_window`` interactions, newest last. Users with one interaction give no
   sample but their item stays in the catalog.
5. Temporal split over samples: all samples sorted by (timestamp, user id, position in the
   user's sequence), cut at the 80% and 90% counts (rounded half up); ``interaction_id`` is
   the index in that order, so train holds 0..n_train-1 and so on.
6. Item ids 1..n follow sorted ``parent_asin`` over the items left; 0 is padding.

Everything is ordered by explicit keys, so the same input files give byte-identical arrays.
A user who reviewed one item twice keeps both interactions (no de-duplication is done),
so a target can appear in its own history; the first titled meta entry of a ``parent_asin``
wins.
"""
from __future__ import annotations

import gzip
import json
import math
from array import array
from pathlib import Path

import numpy as np

from r2ec_fast.data.dataset import ItemCatalog, RecDataset, save_with_progress
from r2ec_fast.data.splits import SPLIT_FRACTIONS, build_splits

# The window grows by this step. 365 days: the window is a span of time, not calendar years,
# so leap days are ignored (a widened window can start a day off a calendar date).
YEAR_MS = 365 * 24 * 3600 * 1000
_GZIP_MAGIC = b"\x1f\x8b"


# ----------------------------------------------------------------------------- reading


def open_jsonl(path: str | Path):
    """A text handle on a JSONL file, gzipped or not (decided by its first two bytes, so a
    gzipped file without the .gz suffix works too)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: str | Path, progress: bool = False, desc: str | None = None):
    """Yield (line number from 1, object) for every non-blank line; a line that is not a JSON
    object raises ValueError naming the file and line."""
    from tqdm.auto import tqdm

    with open_jsonl(path) as f:
        lines = tqdm(f, desc=desc or f"reading {Path(path).name}", unit=" lines",
                     unit_scale=True, disable=not progress, mininterval=1.0)
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: malformed JSON ({exc.msg} at column "
                                 f"{exc.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: line {lineno}: expected a JSON object, got "
                                 f"{type(obj).__name__}")
            yield lineno, obj


def _field(obj: dict, key: str, kind, path, lineno: int):
    value = obj.get(key)
    if key not in obj or value is None:
        raise ValueError(f"{path}: line {lineno}: no {key!r} field")
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: line {lineno}: {key!r} must be a non-empty string, got "
                             f"{value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: line {lineno}: {key!r} must be a number, got {value!r}")
    return kind(value)


class _Reviews:
    """The reviews as columns: user and item codes in first-seen order, plus the names."""

    def __init__(self):
        self.user, self.item = array("q"), array("q")
        self.timestamp, self.rating = array("q"), array("d")
        self.user_codes: dict[str, int] = {}
        self.item_codes: dict[str, int] = {}

    def add(self, user_id: str, asin: str, timestamp: int, rating: float) -> None:
        self.user.append(self.user_codes.setdefault(user_id, len(self.user_codes)))
        self.item.append(self.item_codes.setdefault(asin, len(self.item_codes)))
        self.timestamp.append(timestamp)
        self.rating.append(rating)


def read_reviews(path: str | Path, progress: bool = False) -> _Reviews:
    reviews = _Reviews()
    for lineno, obj in iter_jsonl(path, progress, "reading reviews"):
        reviews.add(_field(obj, "user_id", str, path, lineno),
                    _field(obj, "parent_asin", str, path, lineno),
                    _field(obj, "timestamp", int, path, lineno),
                    _field(obj, "rating", float, path, lineno))
    return reviews


def read_meta(path: str | Path, wanted: dict[str, int], progress: bool = False) -> dict:
    """Item fields for the ``parent_asin``s in `wanted` that have a non-empty title, keyed by
    their code in `wanted`. Only wanted items are kept: a big category's meta file holds
    millions of long descriptions."""
    fields = {}
    for lineno, obj in iter_jsonl(path, progress, "reading meta"):
        code = wanted.get(_field(obj, "parent_asin", str, path, lineno))
        if code is None or code in fields:
            continue
        title = obj.get("title")
        title = title.strip() if isinstance(title, str) else ""
        if not title:
            continue
        desc = obj.get("description") or []
        desc = [str(p) for p in desc] if isinstance(desc, list) else [str(desc)]
        fields[code] = (title, "\n".join(desc), float(obj.get("average_rating") or 0.0),
                        int(obj.get("rating_number") or 0), str(obj.get("main_category") or ""))
    return fields


# ----------------------------------------------------------------------------- protocol


def widen_window(timestamp: np.ndarray, item: np.ndarray, min_items: int) -> dict:
    """The narrowest window [end - years * YEAR_MS, end] holding `min_items` distinct items,
    or the whole data when none does (`reached` False). Returns start, end, years, reached,
    items (distinct items in the window)."""
    end, first = int(timestamp.max()), int(timestamp.min())
    newest = np.full(int(item.max()) + 1, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(newest, item, timestamp)  # an item is in the window iff its newest review is
    newest = np.sort(newest[newest > np.iinfo(np.int64).min])  # [distinct items]
    years = 1
    while True:
        start = end - years * YEAR_MS
        count = len(newest) - int(np.searchsorted(newest, start, side="left"))
        if count >= min_items or start <= first:
            return {"start": start, "end": end, "years": years, "reached": count >= min_items,
                    "items": count}
        years += 1


def kcore_mask(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    """[n] bool: the interactions left after repeatedly dropping users and items with fewer
    than k interactions (k <= 1 keeps everything)."""
    keep = np.ones(len(user), dtype=bool)
    if k <= 1:
        return keep
    num_users, num_items = int(user.max(initial=-1)) + 1, int(item.max(initial=-1)) + 1
    while True:
        user_count = np.bincount(user[keep], minlength=num_users)
        item_count = np.bincount(item[keep], minlength=num_items)
        drop = keep & ((user_count[user] < k) | (item_count[item] < k))
        if not drop.any():
            return keep
        keep &= ~drop


# ----------------------------------------------------------------------------- entry point


def _check_options(category, min_items, kcore, history_window, split_fractions) -> None:
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not isinstance(category, str) or not category.strip():
        raise ValueError(f"category must be a non-empty name (e.g. 'Video Games'), got "
                         f"{category!r}")
    if not is_int(min_items) or min_items < 1:
        raise ValueError(f"min_items must be an integer >= 1, got {min_items!r}")
    if not is_int(kcore) or kcore < 0:
        raise ValueError(f"kcore must be an integer >= 0 (0: no K-core), got {kcore!r}")
    if not is_int(history_window) or history_window < 1:
        raise ValueError(f"history_window must be an integer >= 1, got {history_window!r}")
    fr = tuple(split_fractions)
    if len(fr) != 3 or any(not isinstance(f, (int, float)) or not f > 0 for f in fr) \
            or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be three positive numbers summing to 1 "
                         f"(train, valid, test), got {split_fractions!r}")


def _catalog(fields: dict, codes: np.ndarray, asins: list[str]) -> tuple[ItemCatalog, np.ndarray]:
    """The catalog of the item codes left, ids by sorted parent_asin, and [codes] -> id."""
    kept = sorted(set(codes.tolist()), key=lambda c: asins[c])
    to_id = np.zeros(len(asins), dtype=np.int64)
    to_id[kept] = np.arange(1, len(kept) + 1)
    rows = [("", "", 0.0, 0, "")] + [fields[c] for c in kept]
    title, desc, avg, num, cat = (list(col) for col in zip(*rows))
    return ItemCatalog(title=title, description=desc,
                       average_rating=np.asarray(avg, dtype=np.float32),
                       rating_number=np.asarray(num, dtype=np.int64), categories=cat), to_id


def prepare_amazon(reviews_path, meta_path, category: str, out_dir, min_items: int = 10000,
                   kcore: int = 0, history_window: int = 20, split_fractions=SPLIT_FRACTIONS,
                   progress: bool = True) -> RecDataset:
    """Build the dataset of one Amazon Reviews 2023 category (see the module docstring), save
    it to `out_dir` with `save_dataset` and return it."""
    _check_options(category, min_items, kcore, history_window, split_fractions)
    for label, p in (("reviews", reviews_path), ("meta", meta_path)):
        if not Path(p).is_file():
            raise ValueError(f"the {label} file {p} does not exist")
    raw = read_reviews(reviews_path, progress)
    fields = read_meta(meta_path, raw.item_codes, progress)
    user = np.frombuffer(raw.user, dtype=np.int64)
    item = np.frombuffer(raw.item, dtype=np.int64)
    timestamp = np.frombuffer(raw.timestamp, dtype=np.int64)
    has_meta = np.zeros(len(raw.item_codes), dtype=bool)
    has_meta[list(fields)] = True
    usable = has_meta[item] if len(item) else np.zeros(0, dtype=bool)
    if not usable.any():
        raise ValueError(f"category {category!r}: none of the {len(item)} reviews in "
                         f"{reviews_path} is of an item with a titled entry in {meta_path}")
    window = widen_window(timestamp[usable], item[usable], min_items)
    keep = usable & (timestamp >= window["start"])
    keep[keep] = kcore_mask(user[keep], item[keep], kcore)
    if not keep.any():
        raise ValueError(f"category {category!r}: kcore={kcore} leaves no interaction; "
                         "lower --kcore")
    rows = np.flatnonzero(keep)  # file order, the per-user tie-break
    asins = list(raw.item_codes)
    items, to_id = _catalog(fields, item[rows], asins)
    user_names = list(raw.user_codes)
    by_name = np.argsort(np.asarray(user_names, dtype=object), kind="stable")
    user_rank = np.empty(len(user_names), dtype=np.int64)
    user_rank[by_name] = np.arange(len(user_names))
    ranked_names = [user_names[c] for c in by_name.tolist()]
    rating = np.frombuffer(raw.rating, dtype=np.float64)
    try:
        splits = build_splits(user_rank[user[rows]], to_id[item[rows]], timestamp[rows],
                              rating[rows], ranked_names, history_window, split_fractions,
                              tiebreak=rows)
    except ValueError as exc:
        raise ValueError(f"category {category!r}: {exc}; widen the window (a higher "
                         "min_items) or lower kcore") from None
    meta = {
        "builder": "prepare-data", "source": "Amazon Reviews 2023",
        "reviews_file": str(reviews_path), "meta_file": str(meta_path),
        "window_start_ms": window["start"], "window_end_ms": window["end"],
        "window_years": window["years"], "window_covers_all_data":
            window["start"] <= int(timestamp[usable].min()),
        "min_items": min_items, "min_items_reached": window["reached"],
        "items_in_window": window["items"], "kcore": kcore, "history_window": history_window,
        "split_fractions": list(split_fractions),
        "counts": {
            "reviews": int(len(item)), "reviews_without_titled_meta": int((~usable).sum()),
            "reviews_in_window": int((usable & (timestamp >= window["start"])).sum()),
            "interactions": int(len(rows)), "items": items.num_items,
            "users": int(len(np.unique(user[rows]))),
            **{f"{name}_samples": len(s) for name, s in splits.items()}},
    }
    if not window["reached"]:
        meta["note"] = (f"the whole data holds {window['items']} items, fewer than "
                        f"min_items={min_items}; all of it is used")
    data = RecDataset(items, splits, category=category.strip(), meta=meta)
    save_with_progress(data, out_dir, progress)
    return data

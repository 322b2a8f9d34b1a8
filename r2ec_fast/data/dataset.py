"""The reference trainer's dataset format (DESIGN §6) and its compact in-memory form.

On disk: a HF `DatasetDict` (`save_to_disk`) with splits ``train``, ``valid``, ``test`` of
interactions and ``item_info`` of items. Item ids start at 1; 0 is the padding item.

In memory (`RecDataset`): item fields in arrays indexed by item id (row 0 = padding), and per
split the histories as one flat id array with offsets, so that a split of a million
interactions is a handful of numpy arrays rather than a million Python lists.

Loading validates everything first and raises `DatasetError` naming the folder, split, row
and column of the first problem (or the damaged file); nothing half-loaded is ever returned.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
ITEM_SPLIT = "item_info"
INTERACTION_COLUMNS = ("user_id", "history_item_id", "history_item_title", "history_rating",
                       "history_timestamp", "item_id", "item_title", "rating", "timestamp",
                       "interaction_id")
ITEM_COLUMNS = ("item_id", "title", "description", "average_rating", "rating_number")
META_FILE = "r2ec_meta.json"  # our own small sidecar: category name, how the data was made


class DatasetError(ValueError):
    """A dataset on disk does not follow the format; the message names where."""


@dataclass
class ItemCatalog:
    """Item fields indexed by item id; index 0 is the padding item (empty strings, zeros)."""
    title: list[str]  # [num_items + 1]
    description: list[str]  # [num_items + 1] paragraphs joined by newlines
    average_rating: np.ndarray  # [num_items + 1] float32
    rating_number: np.ndarray  # [num_items + 1] int64
    categories: list[str] = field(default_factory=list)  # [num_items + 1], "" when unknown

    def __post_init__(self):
        n = len(self.title)
        if not self.categories:
            self.categories = [""] * n
        for name in ("description", "average_rating", "rating_number", "categories"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ItemCatalog.{name} has {len(getattr(self, name))} entries, "
                                 f"title has {n}")

    @property
    def num_items(self) -> int:
        """Real items, ids 1..num_items."""
        return len(self.title) - 1


@dataclass
class Split:
    """One split's interactions; histories are newest last."""
    user_id: list[str]  # [R]
    history_offsets: np.ndarray  # [R + 1] int64: row r's history is [offsets[r], offsets[r+1])
    history_item_id: np.ndarray  # [sum of lengths] int64
    history_rating: np.ndarray  # [sum of lengths] float32
    history_timestamp: np.ndarray  # [sum of lengths] int64
    item_id: np.ndarray  # [R] int64, the target
    rating: np.ndarray  # [R] float32
    timestamp: np.ndarray  # [R] int64
    interaction_id: np.ndarray  # [R] int64

    def __len__(self) -> int:
        return len(self.item_id)

    def history(self, row: int) -> np.ndarray:
        return self.history_item_id[self.history_offsets[row]:self.history_offsets[row + 1]]

    def history_ratings(self, row: int) -> np.ndarray:
        return self.history_rating[self.history_offsets[row]:self.history_offsets[row + 1]]

    def padded_history(self, window: int | None = None, pad: int = -1) -> np.ndarray:
        """[R, window] int64: the newest `window` history ids per row, right-padded with
        `pad` (-1 is what the catalog ops' `exclude` takes)."""
        lengths = np.diff(self.history_offsets)
        width = int(lengths.max(initial=0)) if window is None else window
        out = np.full((len(self), width), pad, dtype=np.int64)
        for r in range(len(self)):
            h = self.history(r)[-width:] if width else self.history(r)[:0]
            out[r, :len(h)] = h
        return out


@dataclass
class RecDataset:
    items: ItemCatalog
    splits: dict[str, Split]
    category: str = ""  # e.g. "Video Games"; used by the prompts
    meta: dict = field(default_factory=dict)  # how the data was made (prepare/synth options)

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; have {sorted(self.splits)}")
        return self.splits[split]


# ----------------------------------------------------------------------------- loading


def _require_datasets():
    try:
        import datasets
    except ImportError as exc:  # an optional extra
        raise ImportError("reading or writing the on-disk format needs the `datasets` package: "
                          "pip install 'r2ec-fast[data]'") from exc
    return datasets


def _columns(table, split: str, needed) -> dict:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DatasetError(f"split {split!r} lacks column(s) {missing}; it has "
                           f"{table.column_names}")
    if table.num_rows == 0:  # (and `datasets` cannot even convert an empty table to lists)
        raise DatasetError(_no_rows(split))
    return table.select_columns(list(needed)).to_dict()  # plain lists, one pass over arrow


def _no_rows(split: str) -> str:
    return f"split {split!r} has no rows (" + (
        "the catalog is empty)" if split == ITEM_SPLIT else "every split needs at least one "
        "interaction: training draws from train, evaluation reads valid and test)")


def _items_from_columns(cols: dict, categories) -> ItemCatalog:
    ids = cols["item_id"]
    n = len(ids)
    seen = np.zeros(n + 1, dtype=bool)
    for row, item in enumerate(ids):
        if not isinstance(item, (int, np.integer)) or not 1 <= item <= n:
            raise DatasetError(f"split 'item_info' row {row} column 'item_id': {item!r} is not "
                               f"an id in 1..{n} (ids start at 1, 0 is padding, no gaps"
                               f"{_missing_ids(ids, n)})")
        if seen[item]:
            raise DatasetError(f"split 'item_info' row {row} column 'item_id': id {item} "
                               f"appears twice (ids are 1..{n}, each once{_missing_ids(ids, n)})")
        seen[item] = True
    title, desc = [""] * (n + 1), [""] * (n + 1)
    cats = [""] * (n + 1)
    avg = np.zeros(n + 1, dtype=np.float32)
    num = np.zeros(n + 1, dtype=np.int64)
    for row, item in enumerate(ids):
        title[item] = str(cols["title"][row] or "")
        d = cols["description"][row]
        desc[item] = "\n".join(str(p) for p in d) if isinstance(d, (list, tuple)) else str(d or "")
        avg[item] = float(cols["average_rating"][row] or 0.0)
        num[item] = int(cols["rating_number"][row] or 0)
        if categories is not None:
            c = categories[row]
            cats[item] = " > ".join(c) if isinstance(c, (list, tuple)) else str(c or "")
    return ItemCatalog(title, desc, avg, num, cats)


def _missing_ids(ids, n: int) -> str:
    """"; missing: [3, 7]": the ids of 1..n that `ids` lacks (the first few), for the error
    of a catalog whose ids skip."""
    missing = sorted(set(range(1, n + 1)) - {i for i in ids if isinstance(i, (int, np.integer))})
    if not missing:
        return ""
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"; missing: {missing[:5]}{more}"


def _split_from_columns(name: str, cols: dict, num_items: int) -> Split:
    hist_ids, hist_ratings, hist_times = cols["history_item_id"], cols["history_rating"], \
        cols["history_timestamp"]
    rows = len(cols["item_id"])
    offsets = np.zeros(rows + 1, dtype=np.int64)
    for r in range(rows):
        h = hist_ids[r]
        if not h:
            raise DatasetError(f"split {name!r} row {r} column 'history_item_id': empty history")
        for col in ("history_rating", "history_timestamp", "history_item_title"):
            if len(cols[col][r]) != len(h):
                raise DatasetError(f"split {name!r} row {r} column {col!r}: {len(cols[col][r])} "
                                   f"entries for a history of {len(h)}")
        offsets[r + 1] = offsets[r] + len(h)
    flat_ids = np.fromiter((i for h in hist_ids for i in h), dtype=np.int64, count=offsets[-1])
    flat_times = np.fromiter((t for h in hist_times for t in h), dtype=np.int64,
                             count=offsets[-1])
    flat_ratings = np.fromiter((x for h in hist_ratings for x in h), dtype=np.float32,
                               count=offsets[-1])
    target = np.asarray(cols["item_id"], dtype=np.int64)
    for column, values, starts in (("history_item_id", flat_ids, offsets),
                                   ("item_id", target, None)):
        bad = np.flatnonzero((values < 1) | (values > num_items))
        if bad.size:
            at = int(bad[0])
            row = at if starts is None else int(np.searchsorted(starts, at, side="right") - 1)
            raise DatasetError(f"split {name!r} row {row} column {column!r}: item id "
                               f"{int(values[at])} refers to no item (ids are 1..{num_items})")
    # timestamps must not decrease inside a history (and the target comes at or after it)
    step = np.diff(flat_times)
    inside = np.ones(step.shape, dtype=bool)
    inside[offsets[1:-1] - 1] = False  # steps across two rows' histories
    bad = np.flatnonzero(inside & (step < 0))
    if bad.size:
        row = int(np.searchsorted(offsets, int(bad[0]), side="right") - 1)
        raise DatasetError(f"split {name!r} row {row} column 'history_timestamp': timestamps "
                           "decrease inside the history (it must be oldest first, newest last)")
    ts = np.asarray(cols["timestamp"], dtype=np.int64)
    bad = np.flatnonzero(ts < flat_times[offsets[1:] - 1])
    if bad.size:
        raise DatasetError(f"split {name!r} row {int(bad[0])} column 'timestamp': the target "
                           "comes before the last history item")
    return Split(
        user_id=[str(u) for u in cols["user_id"]], history_offsets=offsets,
        history_item_id=flat_ids, history_rating=flat_ratings, history_timestamp=flat_times,
        item_id=target, rating=np.asarray(cols["rating"], dtype=np.float32), timestamp=ts,
        interaction_id=np.asarray(cols["interaction_id"], dtype=np.int64))


def load_dataset(path: str | Path, splits=SPLITS) -> RecDataset:
    """Read the reference trainer's `DatasetDict` folder into a `RecDataset`, validating it."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path} is not a folder (expected a DatasetDict saved with "
                           "save_to_disk)")
    datasets = _require_datasets()
    meta = {}
    if (path / META_FILE).is_file():
        meta = _read_json(path / META_FILE)
    try:
        dd = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DatasetError(f"{path} is not a saved DatasetDict: {exc}") from exc
    except (ValueError, OSError, IndexError) as exc:  # a damaged JSON or arrow file; or an
        raise _damage(path, exc) from exc  # empty split, which `datasets` saves but cannot load
    if not isinstance(dd, datasets.DatasetDict):
        raise DatasetError(f"{path} holds one Dataset, not a DatasetDict with splits")
    for split in (ITEM_SPLIT, *splits):
        if split not in dd:
            raise DatasetError(f"{path} lacks the split {split!r}; it has {sorted(dd)}")
    try:
        info = dd[ITEM_SPLIT]
        cat_col = next((c for c in ("main_category", "categories") if c in info.column_names),
                       None)
        cats = info.select_columns([cat_col]).to_dict()[cat_col] if cat_col else None
        items = _items_from_columns(_columns(info, ITEM_SPLIT, ITEM_COLUMNS), cats)
        loaded = {s: _split_from_columns(s, _columns(dd[s], s, INTERACTION_COLUMNS),
                                         items.num_items) for s in splits}
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path / META_FILE} must hold a JSON object, got "
                           f"{type(meta).__name__}")
    return RecDataset(items, loaded, category=meta.get("category", ""), meta=meta)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}): the dataset folder is damaged; "
                           "write it again (r2ec-fast synth-data / prepare-data)") from None


def _damage(path: Path, exc: Exception) -> DatasetError:
    """The error for a DatasetDict folder that `datasets` could not read: the first JSON file
    that does not parse, else the first split folder that does not load."""
    import datasets

    for file in [path / "dataset_dict.json", *sorted(path.glob("*/state.json")),
                 *sorted(path.glob("*/dataset_info.json"))]:
        if file.is_file():
            _read_json(file)  # raises, naming the file
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        state = folder / "state.json"
        if state.is_file() and _read_json(state).get("_data_files") == []:
            return DatasetError(f"{path}: {_no_rows(folder.name)}")  # saved with 0 rows
        try:
            datasets.load_from_disk(str(folder))
        except (ValueError, OSError) as split_exc:  # pyarrow's ArrowInvalid is a ValueError
            return DatasetError(f"split folder {folder} could not be read ({split_exc}): a file "
                                "in it is truncated or corrupt; write the dataset again")
    return DatasetError(f"{path} could not be read as a saved DatasetDict ({exc})")


# ----------------------------------------------------------------------------- writing


def save_dataset(data: RecDataset, path: str | Path) -> Path:
    """Write `data` in the reference trainer's format (plus our small META_FILE sidecar).

    The folder is written under a temporary name beside `path` and renamed into place once
    whole, so that a crash never leaves a half-written dataset at `path` (the trainer builds
    synthetic data when `data.path` is missing, and would otherwise find a broken one)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_dataset(data, tmp)
        _move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`; an existing `path` is set aside first and
    deleted after."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.with_name(f".old-{path.name}-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _write_dataset(data: RecDataset, path: Path) -> None:
    datasets = _require_datasets()
    items = data.items
    n = items.num_items
    info = {
        "item_id": list(range(1, n + 1)),
        "title": items.title[1:],
        "description": [d.split("\n") if d else [] for d in items.description[1:]],
        "average_rating": items.average_rating[1:].tolist(),
        "rating_number": items.rating_number[1:].tolist(),
        "main_category": items.categories[1:],
    }
    dd = {ITEM_SPLIT: datasets.Dataset.from_dict(info)}
    for name, split in data.splits.items():
        rows = range(len(split))
        o = split.history_offsets
        hist = [split.history_item_id[o[r]:o[r + 1]].tolist() for r in rows]
        dd[name] = datasets.Dataset.from_dict({
            "user_id": list(split.user_id),
            "history_item_id": hist,
            "history_item_title": [[items.title[i] for i in h] for h in hist],
            "history_rating": [split.history_rating[o[r]:o[r + 1]].tolist() for r in rows],
            "history_timestamp": [split.history_timestamp[o[r]:o[r + 1]].tolist() for r in rows],
            "item_id": split.item_id.tolist(),
            "item_title": [items.title[i] for i in split.item_id],
            "rating": split.rating.tolist(),
            "timestamp": split.timestamp.tolist(),
            "interaction_id": split.interaction_id.tolist(),
        })
    datasets.DatasetDict(dd).save_to_disk(str(path))
    meta = dict(data.meta, category=data.category)
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def split_from_rows(rows: list[dict]) -> Split:
    """A `Split` from per-interaction dicts with keys user_id, history (item ids),
    history_rating, history_timestamp, item_id, rating, timestamp, interaction_id; used by
    the builders (prepare-data, synth-data)."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    for r, row in enumerate(rows):
        offsets[r + 1] = offsets[r] + len(row["history"])
    cat = (lambda key, dtype: np.asarray([x for row in rows for x in row[key]], dtype=dtype)
           .reshape(-1))
    return Split(
        user_id=[str(row["user_id"]) for row in rows], history_offsets=offsets,
        history_item_id=cat("history", np.int64), history_rating=cat("history_rating", np.float32),
        history_timestamp=cat("history_timestamp", np.int64),
        item_id=np.asarray([row["item_id"] for row in rows], dtype=np.int64),
        rating=np.asarray([row["rating"] for row in rows], dtype=np.float32),
        timestamp=np.asarray([row["timestamp"] for row in rows], dtype=np.int64),
        interaction_id=np.asarray([row["interaction_id"] for row in rows], dtype=np.int64))


def save_with_progress(data: RecDataset, out_dir, progress: bool = True):
    """`save_dataset`, with the `datasets` library's per-split progress bars shown only when
    `progress` (its global switch is put back afterwards)."""
    import datasets

    quiet = contextlib.nullcontext()
    if not progress and not datasets.are_progress_bars_disabled():
        quiet = contextlib.ExitStack()
        datasets.disable_progress_bars()
        quiet.callback(datasets.enable_progress_bars)
    with quiet:
        return save_dataset(data, out_dir)

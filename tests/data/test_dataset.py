"""The reference DatasetDict format: round trip, and every validation error names where."""
import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from r2ec_fast.data.dataset import (  # noqa: E402
    DatasetError, ItemCatalog, RecDataset, load_dataset, save_dataset, split_from_rows,
)
from r2ec_fast.data.prompts import PromptConfig, item_prompt, user_prompt  # noqa: E402


def small_dataset() -> RecDataset:
    items = ItemCatalog(
        title=["", "Red Kettle", "Blue Mug", "Green Teapot", "Tea Towel"],
        description=["", "A kettle.\nBoils water fast.", "", "A teapot " * 80, "Cotton."],
        average_rating=np.array([0, 4.5, 3.0, 5.0, 4.0], np.float32),
        rating_number=np.array([0, 10, 3, 1, 7]),
        categories=["", "Kitchen", "Kitchen", "Tea", ""])
    rows = [dict(user_id="u1", history=[1, 2], history_rating=[5, 4], history_timestamp=[1, 2],
                 item_id=3, rating=5, timestamp=3, interaction_id=0),
            dict(user_id="u2", history=[4, 3, 1], history_rating=[1, 2, 3],
                 history_timestamp=[5, 5, 7], item_id=2, rating=2, timestamp=9,
                 interaction_id=1)]
    split = split_from_rows(rows)
    return RecDataset(items, {"train": split, "valid": split, "test": split},
                      category="Home & Kitchen", meta={"source": "test"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_dataset(small_dataset(), tmp_path_factory.mktemp("ds") / "kitchen")


def test_round_trip(saved):
    data = load_dataset(saved)
    ref = small_dataset()
    assert data.category == "Home & Kitchen" and data.meta["source"] == "test"
    assert data.items.title == ref.items.title
    assert data.items.description == ref.items.description
    assert data.items.categories == ref.items.categories
    assert np.array_equal(data.items.average_rating, ref.items.average_rating)
    assert np.array_equal(data.items.rating_number, ref.items.rating_number)
    for name in ("train", "valid", "test"):
        got, exp = data[name], ref[name]
        for field in ("history_offsets", "history_item_id", "history_rating",
                      "history_timestamp", "item_id", "rating", "timestamp", "interaction_id"):
            assert np.array_equal(getattr(got, field), getattr(exp, field)), field
    assert data["train"].history(1).tolist() == [4, 3, 1]
    assert data["train"].padded_history(2).tolist() == [[1, 2], [3, 1]]  # newest kept
    with pytest.raises(KeyError, match="no split"):
        data["dev"]


def rewrite(saved, tmp_path, split, column, fn):
    """Copy of the saved dataset with `fn(list of values)` applied to one column."""
    dd = datasets.load_from_disk(str(saved))
    table = dd[split].to_dict()
    if fn is None:
        del table[column]
    else:
        table[column] = fn(table[column])
    dd = datasets.DatasetDict({**dd, split: datasets.Dataset.from_dict(table)})
    dd.save_to_disk(str(tmp_path / "bad"))
    return tmp_path / "bad"


def set_at(index, value):
    def fn(col):
        col = [list(c) if isinstance(c, list) else c for c in col]
        if isinstance(index, tuple):
            col[index[0]][index[1]] = value
        else:
            col[index] = value
        return col
    return fn


@pytest.mark.parametrize("split,column,fn,match", [
    ("valid", "history_rating", None, r"split 'valid' lacks column\(s\) \['history_rating'\]"),
    ("item_info", "title", None, r"split 'item_info' lacks column"),
    ("train", "item_id", set_at(1, 9), r"split 'train' row 1 column 'item_id': item id 9 refers"),
    ("test", "history_item_id", set_at((1, 2), 0),
     r"split 'test' row 1 column 'history_item_id': item id 0 refers to no item"),
    ("train", "history_item_id", set_at(0, []), r"split 'train' row 0 .* empty history"),
    ("valid", "history_timestamp", set_at((1, 2), 4),
     r"split 'valid' row 1 column 'history_timestamp': timestamps decrease"),
    ("train", "timestamp", set_at(0, 1), r"split 'train' row 0 column 'timestamp'"),
    ("train", "history_item_title", set_at((0, 0), None) , None),
    ("item_info", "item_id", set_at(2, 1), r"split 'item_info' row 2 .* id 1 appears twice"),
    ("item_info", "item_id", set_at(0, 7), r"split 'item_info' row 0 column 'item_id': 7"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_validation_errors_name_split_row_and_column(saved, tmp_path, split, column, fn, match):
    bad = rewrite(saved, tmp_path, split, column, fn)
    if match is None:  # a None title inside a history is not an error: titles come from items
        load_dataset(bad)
        return
    with pytest.raises(DatasetError, match=match):
        load_dataset(bad)


def test_history_lengths_must_agree(saved, tmp_path):
    bad = rewrite(saved, tmp_path, "test", "history_rating", set_at(0, [5.0]))
    with pytest.raises(DatasetError, match=r"split 'test' row 0 column 'history_rating': 1 "
                                           r"entries for a history of 2"):
        load_dataset(bad)


def test_not_a_dataset_folder(tmp_path, saved):
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        load_dataset(tmp_path / "empty")
    dd = datasets.load_from_disk(str(saved))
    datasets.DatasetDict({k: v for k, v in dd.items() if k != "valid"}).save_to_disk(
        str(tmp_path / "two"))
    with pytest.raises(DatasetError, match="lacks the split 'valid'"):
        load_dataset(tmp_path / "two")


def test_prompts():
    data = small_dataset()
    text = user_prompt(data["train"], 1, data.items, data.category)
    lines = text.splitlines()
    assert "Home & Kitchen products" in lines[0]
    assert lines[1:4] == ["1. Tea Towel (rating: 1.0)", "2. Green Teapot (rating: 2.0)",
                          "3. Red Kettle (rating: 3.0)"]  # newest last
    assert "<answer>" in lines[-1] and "</answer>" in lines[-1]
    short = user_prompt(data["train"], 1, data.items, config=PromptConfig(
        history_window=2, answer_start="[A]", answer_end="[/A]"))
    assert "Tea Towel" not in short and "2. Red Kettle" in short and "[A]" in short
    item = item_prompt(data.items, 3, data.category)
    assert "Title: Green Teapot" in item and "Number of buyers: 1" in item
    assert "Average rating: 5.0" in item and "Category: Tea" in item
    desc = item.split("Description: ")[1]
    assert len(desc.split()) == 100 + 1 and desc.endswith("...")  # 100 words, then "..."
    assert "Description" not in item_prompt(data.items, 2)  # empty description: no line
    with pytest.raises(ValueError, match="item id 0"):
        item_prompt(data.items, 0)
    with pytest.raises(ValueError, match="markers"):
        PromptConfig(answer_start="x", answer_end="x")


def test_interrupted_save_leaves_no_half_written_folder(tmp_path, monkeypatch):
    """The folder appears at its name only once whole: a save that dies after some splits
    leaves nothing there (a fresh path) or the previous dataset (an overwrite), and no
    temporary folder."""
    import r2ec_fast.data.dataset as mod

    real = datasets.DatasetDict.save_to_disk

    def dies_after_writing(self, path, *a, **k):
        real(self, path, *a, **k)
        raise OSError("injected: killed mid-save")

    path = tmp_path / "kitchen"
    with monkeypatch.context() as m:
        m.setattr(datasets.DatasetDict, "save_to_disk", dies_after_writing)
        with pytest.raises(OSError, match="injected"):
            save_dataset(small_dataset(), path)
    assert list(tmp_path.iterdir()) == []
    save_dataset(small_dataset(), path)
    data = small_dataset()
    data.meta["source"] = "second"
    with monkeypatch.context() as m:
        m.setattr(mod, "_move_into_place", lambda tmp, final: (_ for _ in ()).throw(
            OSError("injected: killed before the rename")))
        with pytest.raises(OSError, match="injected"):
            save_dataset(data, path)
    assert [p.name for p in tmp_path.iterdir()] == ["kitchen"]
    assert load_dataset(path).meta["source"] == "test"
    save_dataset(data, path)  # an overwrite that completes
    assert [p.name for p in tmp_path.iterdir()] == ["kitchen"]
    assert load_dataset(path).meta["source"] == "second"

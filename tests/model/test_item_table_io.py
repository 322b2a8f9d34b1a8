"""ItemTable.save / ItemTable.load: a bit-exact safetensors round trip with its metadata."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from r2ec_fast.ops.item_table import ItemTable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_round_trip_is_bit_exact(tmp_path, dtype, similarity):
    rows = torch.randn(123, 48, generator=torch.Generator().manual_seed(0)) * 3
    table = ItemTable(rows, similarity=similarity, dtype=dtype)
    table.refresh_rows(torch.tensor([0]), torch.zeros(1, 48))  # a padding row of zeros
    path = table.save(tmp_path / "items.safetensors")
    loaded = ItemTable.load(path)
    assert loaded.similarity == similarity and loaded.dtype == dtype
    assert loaded.weight.shape == (123, 48) and loaded.device.type == "cpu"
    # bit for bit (also NaN-free and without re-normalising the cosine rows)
    assert torch.equal(loaded.weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       table.weight.view(torch.int16 if dtype != torch.float32 else torch.int32))
    loaded.refresh_rows(torch.tensor([5]), rows[:1])  # a usable, writable table
    assert torch.equal(loaded.weight[5], ItemTable(rows[:1], similarity, dtype).weight[0])


def test_metadata_and_device(tmp_path):
    from safetensors import safe_open

    path = ItemTable(torch.randn(10, 8)).save(tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "r2ec_fast.ItemTable" and meta["version"] == "1"
    assert meta["similarity"] == "cosine" and meta["dtype"] == "float32"
    assert meta["num_items"] == "10" and meta["dim"] == "8"
    assert ItemTable.load(path, device="cpu").device.type == "cpu"


def test_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no item table file"):
        ItemTable.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        ItemTable.load(junk)
    other = tmp_path / "model.safetensors"  # a safetensors file, but not a table
    save_file({"lm_head.weight": torch.randn(4, 4)}, str(other))
    with pytest.raises(ValueError, match="not an ItemTable file"):
        ItemTable.load(other)
    newer = tmp_path / "newer.safetensors"
    save_file({"weight": torch.randn(4, 4)}, str(newer),
              metadata={"format": "r2ec_fast.ItemTable", "version": "99", "similarity": "dot"})
    with pytest.raises(ValueError, match="format version '99'"):
        ItemTable.load(newer)
    bad = tmp_path / "bad.safetensors"
    save_file({"weight": torch.randn(4)}, str(bad),
              metadata={"format": "r2ec_fast.ItemTable", "version": "1", "similarity": "dot"})
    with pytest.raises(ValueError, match="corrupt ItemTable file"):
        ItemTable.load(bad)
    # a header that claims more bytes than the file has
    header = json.dumps({"weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})
    short = tmp_path / "short.safetensors"
    short.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8)
    with pytest.raises(ValueError):
        ItemTable.load(short)


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """A save that dies half-way (here: after writing half the bytes) leaves the old table
    whole at its name and no temporary file behind."""
    import safetensors.torch as st

    path = tmp_path / "items.safetensors"
    old = ItemTable(torch.randn(10, 4), similarity="dot")
    old.save(path)

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("injected: disk full")

    monkeypatch.setattr(st, "save_file", dies_half_way)
    with pytest.raises(OSError, match="injected"):
        ItemTable(torch.randn(10, 4), similarity="dot").save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.safetensors"]
    assert torch.equal(ItemTable.load(path).weight, old.weight)

"""Bad input (issue 13 item 5): each gives one clear error that names the file, field or flag,
and nothing is left half-written or half-loaded. Also (item 6) trust_remote_code stays off
unless the config turns it on.

What was tried (input; where it is caught; what the message names):

input                                        caught in                 message names
-------------------------------------------  ------------------------  -------------------------
checkpoint model.safetensors: cut in half,   checkpoint._read_weights  the file, "truncated or
  random bytes, deleted                        / load_checkpoint         corrupt" / "is missing"
checkpoint item_table.safetensors: cut,      ItemTable.load            the file, "not a
  random bytes                                                           safetensors file"
checkpoint trainer_state.json: cut, random   checkpoint._read_state    the file, "not valid
  bytes, a list, a field missing, a wrong                                JSON" / the field and
  type                                                                   the type it needs
checkpoint optimizer.pt, scheduler.pt,       checkpoint._read_torch    the file, "truncated or
  rng.pt: cut, random bytes                                              corrupt" (never torch's
                                                                         "weights_only=False")
  (all of the above: model, optimizer and    load_checkpoint reads     -
  scheduler are left as they were)             every file, then loads
ItemTable.load: cut, random bytes, empty,    ItemTable.load            the file
  metadata dim != the tensor's
an item table of width 32, model width 64    DualHeadModel.item_table  both widths and the file
  (from_pretrained, assignment, a resumed      (the setter)
  checkpoint's table)
an item table of another item count; a      ItemTable.check_rows,     both counts and the
  checkpoint without its item table            checkpoint_item_table     file / the missing file
model folder: model.safetensors cut or       dual_head._check_files    the file
  random, config.json cut
model folder whose config.json needs custom  dual_head._check_         the file, trust_remote_
  code (auto_map, a model_type transformers    checkpoint              code, "--set model.
  lacks)                                                                 trust_remote_code=true";
                                                                         the code never runs
  ... with model.trust_remote_code=true       DualHeadModel.            passed to AutoConfig,
                                                from_pretrained           AutoTokenizer, AutoModel
model folder whose tokenizer_config.json     (transformers uses its    loads; the code never
  has an auto_map                              own class)                runs
dataset: item_info ids 1, 2, 4, 5; 1, 2, 4,  dataset._items_from_      folder, split, row,
  4; 1, 2, 2, 4                                columns                   column, missing ids
dataset: a target / a history id that is     dataset._split_from_      folder, split, row,
  no item                                      columns                   column, the id
dataset: empty train, valid, test,           dataset.load_dataset      folder, split, "has no
  item_info                                    (_damage / _columns)      rows"
dataset: r2ec_meta.json, dataset_dict.json,  dataset.load_dataset      the file / split folder
  train/state.json cut; an arrow file cut      (_read_json, _damage)
config file: unknown key at the top, nested, config._merge             the file, the dotted key,
  of another section                           (_unknown_key)            "did you mean ..."
config file: "8" for an int, 2.5 for an      config._coerce / _merge   the file, the dotted
  int, "yes" for a bool, a list for a float,                             field, the type
  a number for a section, a list
--set: unknown key, a section, a value with  config.apply_overrides    "--set 'ITEM'", the key,
  a subkey, "four" for an int, no "="          (_override)               "did you mean ..."
train --set unknown key; --config file with  commands/train.py         "--set" / the file; no
  an unknown key                                                         --out folder made
train --out a file                           commands/train.py         "--out", "a file"
train --out DIR holding a run, no --resume   commands/train.py         "--out", "not empty",
                                                                         "--resume"
train --out DIR --resume, another config     run_dir.check_run_dir     "--out", every differing
                                                                         key with both values;
                                                                         DIR unchanged
train --resume, the same config (--max-steps -                         accepted
  may change; no --config: DIR/config.json)
run_dir.check_run_dir (for Trainer):         run_dir                   "already holds a run",
  a run without resume, another config,                                  the key, the file
  a damaged config.json
train whose dataset has an empty split       commands/train.py         the folder and split; the
                                               (remove_unstarted_run)    new --out is removed
train --resume from a checkpoint with model  load_checkpoint /         the file; the run folder
  weights cut, optimizer random, state cut,    item_table setter         is unchanged
  an item table of width 32
Trainer (library) whose data path is         trainer.ensure_data,      "data.path", the folder;
  missing: new folder, and a resume            before any write          no folder made / the
                                                                         config.json unchanged
"""
import json
import os
import re
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from r2ec_fast.ops.item_table import ItemTable  # noqa: E402
from r2ec_fast.testing import train_config  # noqa: E402
from r2ec_fast.train.checkpoint import (  # noqa: E402
    CheckpointError, load_checkpoint, save_checkpoint,
)
from r2ec_fast.train.config import (  # noqa: E402
    ConfigError, TrainConfig, apply_overrides, get_preset, load_config,
)

datasets = pytest.importorskip("datasets")


def cut(path):
    """Keep the first half of the file (a copy interrupted half-way)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def garble(path):
    """Same size, random bytes."""
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ----------------------------------------------------------------------------- checkpoints

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.proj = nn.Linear(4, 4)


def small_run(seed: int = 0):
    torch.manual_seed(seed)
    model = Small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model.proj.weight.sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


@pytest.fixture()
def ckpt(tmp_path):
    model, opt, sched = small_run()
    table = ItemTable(torch.randn(5, 4))
    return save_checkpoint(tmp_path / "run", 3, model=model, optimizer=opt, scheduler=sched,
                           item_table=table, trainer_state={"epoch": 0, "position": 3})


def load_into_fresh(path):
    """Load `path` into a fresh model, optimizer and scheduler, and check, however the load
    ends, that none of them was changed (use where the load must fail)."""
    model, opt, sched = small_run(seed=1)
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              json.dumps(opt.state_dict()["param_groups"]), sched.state_dict())
    try:
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    finally:  # called where the load fails: whatever went wrong, nothing was half-loaded
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[0].items()), "model changed"
        assert json.dumps(opt.state_dict()["param_groups"]) == before[1]
        assert sched.state_dict() == before[2]


def test_a_good_checkpoint_loads(ckpt):
    model, opt, sched = small_run(seed=1)
    out = load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    assert out["step"] == 3 and out["item_table"].num_items == 5


@pytest.mark.parametrize("name,damage,match", [
    ("model.safetensors", cut, r"model\.safetensors is truncated or corrupt"),
    ("model.safetensors", garble, r"model\.safetensors is truncated or corrupt"),
    ("model.safetensors", os.remove, r"model\.safetensors is missing"),
    ("item_table.safetensors", cut, r"item_table\.safetensors is not a safetensors file"),
    ("item_table.safetensors", garble, r"item_table\.safetensors is not a safetensors file"),
    ("trainer_state.json", cut, r"trainer_state\.json is not valid JSON"),
    ("trainer_state.json", garble, r"trainer_state\.json is not valid JSON"),
    ("optimizer.pt", cut, r"optimizer\.pt is truncated or corrupt"),
    ("optimizer.pt", garble, r"optimizer\.pt is truncated or corrupt"),
    ("scheduler.pt", cut, r"scheduler\.pt is truncated or corrupt"),
    ("rng.pt", cut, r"rng\.pt is truncated or corrupt"),
    ("rng.pt", garble, r"rng\.pt is truncated or corrupt"),
], ids=lambda x: getattr(x, "__name__", None))
def test_damaged_checkpoint_file(ckpt, name, damage, match):
    damage(ckpt / name)
    with pytest.raises(ValueError, match=match) as err:
        load_into_fresh(ckpt)
    assert "weights_only=False" not in str(err.value)  # torch's advice would run pickles


@pytest.mark.parametrize("state,match", [
    ([1, 2], r"trainer_state\.json is not an r2ec-fast checkpoint"),
    ({"format": "r2ec_fast.checkpoint", "version": 1, "step": 3, "trainer_state": {}},
     r"trainer_state\.json: field 'adapter_only' is missing"),
    ({"format": "r2ec_fast.checkpoint", "version": 1, "step": "3", "adapter_only": False,
      "trainer_state": {}}, r"trainer_state\.json: field 'step' must be a non-negative int"),
    ({"format": "r2ec_fast.checkpoint", "version": 1, "step": 3, "adapter_only": False,
      "trainer_state": None}, r"trainer_state\.json: field 'trainer_state' must be an object"),
])
def test_trainer_state_fields(ckpt, state, match):
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=match):
        load_into_fresh(ckpt)


def test_resumed_item_table_must_fit_the_catalog(ckpt):
    """checkpoint_item_table: what Trainer._resume checks of the loaded table."""
    from r2ec_fast.train.checkpoint import checkpoint_item_table

    model, opt, sched = small_run(seed=1)
    loaded = load_checkpoint(ckpt, model=model)
    assert checkpoint_item_table(loaded, ckpt, num_items=4) is loaded["item_table"]
    with pytest.raises(ValueError, match=r"item_table\.safetensors has 5 rows but the catalog "
                                         r"\(30 items \+ the padding row\) has 31"):
        checkpoint_item_table(loaded, ckpt, num_items=30)
    (ckpt / "item_table.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no item_table\.safetensors"):
        checkpoint_item_table(load_checkpoint(ckpt, model=model), ckpt, num_items=4)


# ----------------------------------------------------------------------------- item tables

@pytest.mark.parametrize("damage", [cut, garble, lambda p: p.write_bytes(b"")],
                         ids=["cut", "random", "empty"])
def test_item_table_file_damaged(tmp_path, damage):
    path = ItemTable(torch.randn(9, 8)).save(tmp_path / "items.safetensors")
    damage(path)
    with pytest.raises(ValueError, match=r"items\.safetensors is not a safetensors file"):
        ItemTable.load(path)


def test_item_table_metadata_disagrees_with_tensor(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "items.safetensors"
    save_file({"weight": torch.randn(9, 8)}, str(path), metadata={
        "format": "r2ec_fast.ItemTable", "version": "1", "similarity": "cosine",
        "dtype": "float32", "num_items": "9", "dim": "16"})
    with pytest.raises(ValueError, match=r"items\.safetensors: corrupt ItemTable file .*dim 16"):
        ItemTable.load(path)


def test_item_table_item_count(tmp_path):
    table = ItemTable.load(ItemTable(torch.randn(9, 8)).save(tmp_path / "items.safetensors"))
    table.check_rows(9, "the catalog (8 items + padding)")
    with pytest.raises(ValueError, match=r"items\.safetensors has 9 rows but the catalog "
                                         r"\(30 items \+ padding\) has 31"):
        table.check_rows(31, "the catalog (30 items + padding)")


# ----------------------------------------------------------------------------- model folders

def small_config(root, **overrides) -> TrainConfig:
    values = {
        "max_steps": 1, "save_every": 1, "item_refresh_steps": 0, "eval_every": 0,
        "data": {"path": str(root / "data"), "synth_items": 48, "synth_users": 24,
                 "synth_genres": 4, "synth_attributes": 4, "synth_history_max": 6,
                 "eval_users": 4},
        "model": {"path": str(root / "model"), "tiny_arch": "gemma2"},
        "rollout": {"group_size": 2, "max_new_tokens": 2, "eval_max_new_tokens": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "users_per_step": 4},
    }
    return train_config(values, **overrides)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Synthetic data, a tiny Gemma-2 (hidden size 64) and a run of one step with its
    checkpoint, made by `r2ec-fast train` itself."""
    from r2ec_fast.cli import main

    root = tmp_path_factory.mktemp("tiny")
    small_config(root).save(root / "config.json")
    assert main(["train", "--config", str(root / "config.json"), "--out", str(root / "run"),
                 "--no-eval", "--no-progress"]) == 0
    assert (root / "run" / "checkpoints" / "step-00000001" / "COMPLETE").is_file()
    return root


@pytest.fixture()
def run_copy(tiny, tmp_path):
    """A copy of the tiny run that a test may damage."""
    shutil.copytree(tiny / "run", tmp_path / "run")
    return tmp_path / "run"


def test_item_table_of_another_width(tiny, tmp_path):
    from r2ec_fast.model.dual_head import DualHeadModel

    path = ItemTable(torch.randn(49, 32)).save(tmp_path / "narrow.safetensors")
    widths = r"has width 32 but the model's hidden size is 64"
    with pytest.raises(ValueError, match=rf"narrow\.safetensors {widths}"):
        DualHeadModel.from_pretrained(tiny / "model", device="cpu",
                                      item_table=ItemTable.load(path))
    model = DualHeadModel.from_pretrained(tiny / "model", device="cpu")
    with pytest.raises(ValueError, match=rf"narrow\.safetensors {widths}"):
        model.item_table = ItemTable.load(path)
    with pytest.raises(ValueError, match=rf"an item table {widths}"):
        model.item_table = ItemTable(torch.randn(49, 32))
    assert model.item_table is None  # the refused table was not kept


@pytest.mark.parametrize("damage", [cut, garble], ids=["cut", "random"])
def test_model_folder_weights_damaged(tiny, tmp_path, damage):
    from r2ec_fast.model.dual_head import DualHeadModel

    folder = tmp_path / "model"
    shutil.copytree(tiny / "model", folder)
    damage(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        DualHeadModel.from_pretrained(folder, device="cpu")


def test_model_folder_config_not_json(tiny, tmp_path):
    from r2ec_fast.model.dual_head import DualHeadModel

    folder = tmp_path / "model"
    shutil.copytree(tiny / "model", folder)
    cut(folder / "config.json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        DualHeadModel.from_pretrained(folder, device="cpu")


def remote_code_folder(tmp_path, tiny, where: str):
    """The tiny model with an `auto_map` pointing at a module that would leave a marker."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny / "model", folder)
    marker = tmp_path / "custom-code-ran"
    (folder / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    file = folder / where
    values = json.loads(file.read_text())
    values["auto_map"] = {"AutoConfig": "custom_code.Config",
                          "AutoModelForCausalLM": "custom_code.Model",
                          "AutoTokenizer": ["custom_code.Tokenizer", None]}
    # a type transformers has no class for (an auto_map beside a built-in type is not needed)
    values["model_type" if where == "config.json" else "tokenizer_class"] = "Custom"
    file.write_text(json.dumps(values))
    return folder, marker


def test_remote_code_is_refused_by_default(tiny, tmp_path):
    from r2ec_fast.model.dual_head import DualHeadModel

    folder, marker = remote_code_folder(tmp_path, tiny, "config.json")
    assert get_preset("tiny").model.trust_remote_code is False
    with pytest.raises(ValueError, match=r"config\.json needs custom code.*trust_remote_code.*"
                                         r"--set model\.trust_remote_code=true"):
        DualHeadModel.from_pretrained(folder, device="cpu")
    assert not marker.exists()


def test_custom_tokenizer_code_does_not_run_by_default(tiny, tmp_path):
    """A tokenizer_config.json with an auto_map: transformers (trust_remote_code=False) builds
    the tokenizer from tokenizer.json with its own class instead; the folder's code never runs."""
    from r2ec_fast.model.dual_head import DualHeadModel

    folder, marker = remote_code_folder(tmp_path, tiny, "tokenizer_config.json")
    model = DualHeadModel.from_pretrained(folder, device="cpu")
    assert type(model.tokenizer).__module__.startswith("transformers.")
    assert not marker.exists()


def test_remote_code_option_reaches_every_loader(tiny, tmp_path, monkeypatch):
    """model.trust_remote_code=true is passed to the config, tokenizer and model loaders
    (stubbed here: nothing from the folder runs)."""
    from types import SimpleNamespace

    import transformers

    from r2ec_fast.model.dual_head import DualHeadModel

    folder, marker = remote_code_folder(tmp_path, tiny, "config.json")
    config = apply_overrides(get_preset("tiny"), ["model.trust_remote_code=true"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "model", local_files_only=True)
    seen = {}

    class Stop(Exception):
        pass

    def stub(name, result):
        def load(*args, **kwargs):
            seen[name] = kwargs.get("trust_remote_code")
            if result is None:
                raise Stop
            return result
        return load

    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    for cls, result in (("AutoConfig", SimpleNamespace(model_type="custom", auto_map=auto_map)),
                        ("AutoTokenizer", tokenizer), ("AutoModelForCausalLM", None)):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", stub(cls, result))
    with pytest.raises(Stop):
        DualHeadModel.from_pretrained(folder, device="cpu",
                                      trust_remote_code=config.model.trust_remote_code)
    assert seen == dict.fromkeys(("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"),
                                 config.model.trust_remote_code)
    assert config.model.trust_remote_code is not False and not marker.exists()


# ----------------------------------------------------------------------------- datasets

def small_dataset():
    from r2ec_fast.data.dataset import ItemCatalog, RecDataset, split_from_rows

    items = ItemCatalog(
        title=["", "Red Kettle", "Blue Mug", "Green Teapot", "Tea Towel"],
        description=["", "A kettle.", "", "A teapot.", "Cotton."],
        average_rating=np.array([0, 4.5, 3.0, 5.0, 4.0], np.float32),
        rating_number=np.array([0, 10, 3, 1, 7]))
    rows = [dict(user_id="u1", history=[1, 2], history_rating=[5, 4], history_timestamp=[1, 2],
                 item_id=3, rating=5, timestamp=3, interaction_id=0),
            dict(user_id="u2", history=[4, 3, 1], history_rating=[1, 2, 3],
                 history_timestamp=[5, 5, 7], item_id=2, rating=2, timestamp=9,
                 interaction_id=1)]
    split = split_from_rows(rows)
    return RecDataset(items, {"train": split, "valid": split, "test": split})


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    from r2ec_fast.data.dataset import save_with_progress

    return save_with_progress(small_dataset(), tmp_path_factory.mktemp("ds") / "kitchen",
                              progress=False)


def rewrite(saved, out, split, fn):
    """A copy of the saved dataset with `fn(columns dict)` applied to one split."""
    dd = datasets.load_from_disk(str(saved))
    table = fn(dd[split].to_dict())
    features = dd[split].features if not next(iter(table.values()), [1]) else None
    new = datasets.Dataset.from_dict(table, features=features)
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict({**dd, split: new}).save_to_disk(str(out))
    finally:
        datasets.enable_progress_bars()
    return out


def with_column(column, values):
    return lambda table: {**table, column: values}


@pytest.mark.parametrize("split,fn,match", [
    ("item_info", with_column("item_id", [1, 2, 4, 5]),
     r"split 'item_info' row 3 column 'item_id': 5 is not an id in 1\.\.4 .*missing: \[3\]"),
    ("item_info", with_column("item_id", [1, 2, 4, 4]),
     r"split 'item_info' row 3 column 'item_id': id 4 appears twice .*missing: \[3\]"),
    ("item_info", with_column("item_id", [1, 2, 2, 4]),
     r"split 'item_info' row 2 column 'item_id': id 2 appears twice"),
    ("train", with_column("item_id", [3, 7]),
     r"split 'train' row 1 column 'item_id': item id 7 refers to no item \(ids are 1\.\.4\)"),
    ("test", with_column("history_item_id", [[1, 2], [4, 99, 1]]),
     r"split 'test' row 1 column 'history_item_id': item id 99 refers to no item"),
    ("train", lambda t: {k: [] for k in t}, r"split 'train' has no rows"),
    ("valid", lambda t: {k: [] for k in t}, r"split 'valid' has no rows"),
    ("test", lambda t: {k: [] for k in t}, r"split 'test' has no rows"),
    ("item_info", lambda t: {k: [] for k in t}, r"split 'item_info' has no rows"),
], ids=["ids-skip", "ids-skip-dup", "id-twice", "unknown-target", "unknown-history",
        "empty-train", "empty-valid", "empty-test", "empty-items"])
def test_dataset_errors_name_folder_split_row_column(saved_dataset, tmp_path, split, fn, match):
    from r2ec_fast.data.dataset import DatasetError, load_dataset

    bad = rewrite(saved_dataset, tmp_path / "bad", split, fn)
    with pytest.raises(DatasetError, match=rf"^{bad}: {match}"):
        load_dataset(bad)


@pytest.mark.parametrize("file,damage,match", [
    ("r2ec_meta.json", cut, r"r2ec_meta\.json is not valid JSON"),
    ("dataset_dict.json", cut, r"dataset_dict\.json is not valid JSON"),
    ("train/state.json", cut, r"train/state\.json is not valid JSON"),
    ("valid/data-00000-of-00001.arrow", cut, r"split folder .*valid could not be read"),
], ids=["meta", "dataset-dict", "state", "arrow"])
def test_dataset_files_damaged(saved_dataset, tmp_path, file, damage, match):
    from r2ec_fast.data.dataset import DatasetError, load_dataset

    bad = tmp_path / "bad"
    shutil.copytree(saved_dataset, bad)
    damage(bad / file)
    with pytest.raises(DatasetError, match=match):
        load_dataset(bad)


# ----------------------------------------------------------------------------- config files

@pytest.mark.parametrize("values,match", [
    ({"max_step": 3}, r"unknown config key 'max_step'; did you mean 'max_steps'\?"),
    ({"rollout": {"temprature": 1.0}},
     r"unknown config key 'rollout\.temprature'; did you mean 'rollout\.temperature'\?"),
    ({"lr": 0.1}, r"unknown config key 'lr'; did you mean 'optim\.lr'\?"),
    ({"optim": {"group_size": 2}},
     r"unknown config key 'optim\.group_size'; did you mean 'rollout\.group_size'\?"),
    ({"optim": {"users_per_step": "8"}}, r"optim\.users_per_step must be an integer, got '8'"),
    ({"max_steps": 2.5}, r"max_steps must be an integer, got 2\.5"),
    ({"model": {"gradient_checkpointing": "yes"}},
     r"model\.gradient_checkpointing must be true or false, got 'yes'"),
    ({"optim": {"lr": [0.1]}}, r"optim\.lr must be a number, got \[0\.1\]"),
    ({"recpo": 3}, r"recpo must be a mapping, got int"),
    ([1, 2], r"config must be a mapping, got list"),
], ids=["top", "nested", "other-section", "other-section-2", "str-for-int", "float-for-int",
        "str-for-bool", "list-for-float", "number-for-section", "list"])
def test_config_file_errors_name_file_and_key(tmp_path, values, match):
    path = tmp_path / "my-config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=rf"config file {path}: {match}"):
        load_config(path)


@pytest.mark.parametrize("item,match", [
    ("optim.lrr=1", r"--set 'optim\.lrr=1': unknown config key 'optim\.lrr'; did you mean "
                    r"'optim\.lr'\?"),
    ("nonsense.key=1", r"--set 'nonsense\.key=1': unknown config key 'nonsense\.key'"),
    ("optim=1", r"--set 'optim=1': optim is a section"),
    ("optim.lr.x=1", r"--set 'optim\.lr\.x=1': optim\.lr is a value, not a section"),
    ("rollout.group_size=four", r"--set 'rollout\.group_size=four': rollout\.group_size must "
                                r"be an integer, got 'four'"),
    ("optim.lr", r"--set 'optim\.lr': expected key=value"),
])
def test_set_errors_name_the_flag(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_preset("tiny"), [item])


# ----------------------------------------------------------------------------- the CLI

def train_cli(capsys, *argv) -> tuple[int, str]:
    from r2ec_fast.cli import main

    status = main(["train", "--no-progress", "--no-eval", *map(str, argv)])
    return status, capsys.readouterr().err


def test_cli_bad_set_key(tiny, tmp_path, capsys):
    out = tmp_path / "new"
    status, err = train_cli(capsys, "--config", tiny / "config.json", "--out", out,
                            "--set", "optim.lrr=1")
    assert status == 2 and "--set 'optim.lrr=1'" in err and "did you mean 'optim.lr'" in err
    assert not out.exists()


def test_cli_bad_config_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"learning_rate": 1e-3}}))
    status, err = train_cli(capsys, "--config", path, "--out", tmp_path / "new")
    assert status == 2 and f"config file {path}: unknown config key 'optim.learning_rate'" in err
    assert not (tmp_path / "new").exists()


def test_cli_out_is_a_file(tiny, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    status, err = train_cli(capsys, "--config", tiny / "config.json", "--out", tmp_path / "f")
    assert status == 2 and f"--out {tmp_path / 'f'} is a file, not a folder" in err


def test_cli_out_holds_another_run(tiny, run_copy, capsys):
    before = snapshot(run_copy)
    status, err = train_cli(capsys, "--config", tiny / "config.json", "--out", run_copy,
                            "--set", "optim.lr=0.5")
    assert status == 2 and f"--out {run_copy} is not empty" in err and "--resume" in err
    status, err = train_cli(capsys, "--config", tiny / "config.json", "--out", run_copy,
                            "--resume", "--set", "optim.lr=0.5", "--set", "seed=3")
    assert status == 2 and f"--out {run_copy} holds another run" in err
    assert "optim.lr (0.001 there, 0.5 here)" in err and "seed (0 there, 3 here)" in err
    assert snapshot(run_copy) == before  # not one byte written


def test_cli_resume_same_config(tiny, run_copy, capsys):
    """The same config resumes (max_steps may change); without --config/--preset, --resume
    takes the run's own config.json."""
    status, err = train_cli(capsys, "--config", tiny / "config.json", "--out", run_copy,
                            "--resume", "--max-steps", "1")
    assert status == 0, err
    status, err = train_cli(capsys, "--out", run_copy, "--resume")
    assert status == 0, err


def test_check_run_dir(tiny, run_copy, tmp_path):
    """What Trainer.__init__ checks before it writes anything (run_dir.check_run_dir)."""
    from r2ec_fast.train.run_dir import RunDirError, check_run_dir, remove_unstarted_run

    config = load_config(tiny / "config.json")
    check_run_dir(config, tmp_path / "absent", resume=False)
    check_run_dir(config, run_copy, resume=True)
    check_run_dir(apply_overrides(config, ["max_steps=9", "data.eval_users=2"]), run_copy,
                  resume=True)
    with pytest.raises(RunDirError, match=r"run folder .* already holds a run .*resume"):
        check_run_dir(config, run_copy, resume=False)
    with pytest.raises(RunDirError, match=r"holds another run.*rollout\.group_size \(2 there, "
                                          r"3 here\)"):
        check_run_dir(apply_overrides(config, ["rollout.group_size=3"]), run_copy, resume=True)
    cut(run_copy / "config.json")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        check_run_dir(config, run_copy, resume=True)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    config.save(fresh / "config.json")
    remove_unstarted_run(fresh)
    assert not fresh.exists()


def test_cli_failing_train_leaves_no_run_folder(tiny, saved_dataset, tmp_path, capsys):
    bad = rewrite(saved_dataset, tmp_path / "bad-data", "valid", lambda t: {k: [] for k in t})
    config = small_config(tiny, **{"data.path": str(bad), "data.synth_items": 0})
    config.save(tmp_path / "c.json")
    out = tmp_path / "runs" / "new"
    status, err = train_cli(capsys, "--config", tmp_path / "c.json", "--out", out)
    assert status == 2 and f"{bad}: split 'valid' has no rows" in err
    assert not out.exists()  # no config.json of a run that never started


@pytest.mark.parametrize("name,damage,match", [
    ("model.safetensors", cut, r"model\.safetensors is truncated or corrupt"),
    ("optimizer.pt", garble, r"optimizer\.pt is truncated or corrupt"),
    ("trainer_state.json", cut, r"trainer_state\.json is not valid JSON"),
    ("item_table.safetensors",
     lambda p: ItemTable(torch.randn(49, 32)).save(p),
     r"item_table\.safetensors has width 32 but the model's hidden size is 64"),
], ids=["model-cut", "optimizer-random", "state-cut", "table-width"])
def test_cli_resume_from_a_damaged_checkpoint(tiny, run_copy, capsys, name, damage, match):
    damage(run_copy / "checkpoints" / "step-00000001" / name)
    before = snapshot(run_copy)
    status, err = train_cli(capsys, "--config", tiny / "config.json", "--out", run_copy,
                            "--resume")
    assert status == 2 and name in err and re.search(match, err), err
    assert snapshot(run_copy) == before  # the run folder is as it was


def test_trainer_set_up_failure_writes_nothing(tmp_path):
    """The library's Trainer (not only the CLI): a run whose data cannot be found fails before
    it writes anything, so the run folder does not appear; a resume whose set-up fails leaves
    the run's config.json as it was."""
    from r2ec_fast.train.config import ConfigError, TrainConfig
    from r2ec_fast.train.trainer import Trainer

    config = TrainConfig.from_dict({"data": {"path": str(tmp_path / "no-data"),
                                             "synth_items": 0},
                                    "model": {"path": str(tmp_path / "no-model")}})
    with pytest.raises(ConfigError, match="data.path .*no-data does not exist"):
        Trainer(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    run = tmp_path / "old"
    run.mkdir()
    config.save(run / "config.json")
    before = (run / "config.json").read_bytes()
    with pytest.raises(ConfigError, match="no-data"):
        Trainer(config, run, resume=True, progress=False)
    assert (run / "config.json").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]

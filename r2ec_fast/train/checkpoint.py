"""Crash-safe training checkpoints and exact resume.

Layout of a run's checkpoints::

    run_dir/checkpoints/
        latest                  # text: the name of the newest checkpoint folder
        step-00000400/
            model.safetensors   # weights (adapter_only: only the trainable parameters)
            item_table.safetensors  # optional, ItemTable.save format
            optimizer.pt        # optimizer.state_dict()
            scheduler.pt        # optional, scheduler.state_dict()
            rng.pt              # capture_rng(): python, numpy, torch CPU and CUDA generators
            trainer_state.json  # step, adapter_only, and the trainer's own JSON state
            COMPLETE            # written last: a folder without it is never loaded

Crash safety: a checkpoint is written into a hidden sibling `.tmp-step-...`, every file and
the folder are fsync'd, and only then is the folder renamed into place (`os.replace`, atomic on
one filesystem). The `latest` pointer is replaced the same way, after the folder. A crash at any
moment therefore leaves the previous checkpoint and pointer as they were; what it leaves behind
is only `.tmp-*` entries, which the next save removes. Old checkpoints are renamed to `.tmp-*`
before they are deleted, so a crash mid-delete never leaves a half-deleted folder that still
looks complete. Saving a step that already has a folder (a resumed run saving its last step
again) swaps the new folder in with one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`),
so that the step's folder, which `latest` may name, is never missing; where the platform or the
filesystem has no exchange, the old copy is renamed aside first, and a crash between that and
the next rename leaves only the older checkpoints (none when `keep_last=1`).

Resume::

    path = latest_checkpoint(run_dir)
    if path is not None:
        out = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
        restore_rng(out["rng"])  # last, after anything else that draws random numbers
        step, state = out["step"], out["trainer_state"]

Single writer: call `save_checkpoint` from one process (rank 0). The weights are the module's
plain `state_dict()`; an FSDP-sharded module must hand over a full (gathered) state dict first.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..ops.item_table import ItemTable

CHECKPOINT_FORMAT = "r2ec_fast.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"
MODEL_FILE = "model.safetensors"
ITEM_TABLE_FILE = "item_table.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint folder or one of its files is missing, truncated or corrupt, or does not
    fit what it is loaded into; the message names the file."""


# ----------------------------------------------------------------------------- RNG

def capture_rng() -> dict:
    """The state of every global generator a training step may draw from: python `random`,
    numpy's global generator, torch CPU and (when available) every CUDA device.

    Only plain python values and tensors, so that `torch.load(weights_only=True)` reads it.
    Callers with their own `torch.Generator`s may add entries (`state["data"] =
    gen.get_state()`); `restore_rng` ignores keys it does not know.
    """
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back the generators saved by `capture_rng`. CUDA states are restored for the devices
    both runs have (resuming on fewer GPUs restores the first ones)."""
    random.setstate(_as_tuple(state["python"]))
    nps = state["numpy"]
    np.random.set_state({"bit_generator": nps["bit_generator"],
                         "state": {"key": np.asarray(nps["key"], dtype=np.uint32),
                                   "pos": nps["pos"]},
                         "has_gauss": nps["has_gauss"], "gauss": nps["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _as_tuple(value):
    """random.setstate wants tuples all the way down; a deserialised state may hold lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------- files

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`), so that
    neither name is missing at any moment. False, with nothing moved, where the platform, the C
    library or the filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel, or a filesystem without exchange
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder so that no crash leaves it half-deleted but still complete:
    rename it to a `.tmp-*` name (atomic) first, then delete."""
    doomed = folder.with_name(f"{TMP_PREFIX}old-{folder.name}")
    _remove(doomed)
    os.replace(folder, doomed)
    _remove(doomed)


def _step_of(folder: Path) -> int | None:
    match = _STEP_DIR.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def _complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete `step-*` folder, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(_step_of(p), p) for p in ckpt_dir.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None and _is_complete(p))


# ----------------------------------------------------------------------------- weights

def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """safetensors refuses tensors that share memory (tied lm_head / embeddings). A name that
    is exactly the same view as an earlier one becomes an alias (stored once, restored on load);
    any other tensor that overlaps an earlier storage is cloned."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.numel() == 0:
            unique[name] = t.contiguous().cpu()
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        if storage in storages or not t.is_contiguous():
            t = t.contiguous().clone()
        storages.add(storage)
        unique[name] = t.cpu()
    return unique, aliases


def _weights_to_save(model: torch.nn.Module, adapter_only: bool) -> dict[str, torch.Tensor]:
    if adapter_only:
        trainable = {n: p for n, p in model.named_parameters(remove_duplicate=False)
                     if p.requires_grad}
        if not trainable:
            raise ValueError("adapter_only=True but the model has no parameter with "
                             "requires_grad=True: nothing would be saved")
        return trainable
    return model.state_dict()


def _expected_weights(model: torch.nn.Module, adapter_only: bool) -> dict[str, torch.Size]:
    if adapter_only:
        return {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)
                if p.requires_grad}
    return {n: t.shape for n, t in model.state_dict().items()}


def _names(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


_DAMAGED = ("the checkpoint is damaged (an interrupted copy, a full disk?): delete its folder "
            "to resume from the one before it")


def _short(exc: Exception) -> str:
    """The first sentence of an exception from a file reader, for a one-line message (torch's
    own advice, e.g. to load with weights_only=False, is left out on purpose)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_weights(path: Path, model: torch.nn.Module, adapter_only: bool,
                  map_location) -> dict[str, torch.Tensor]:
    """The weights in `path` (aliases restored), after checking every name and shape against
    `model`; nothing is loaded into it."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            shapes = {name: torch.Size(f.get_slice(name).get_shape()) for name in f.keys()}
        aliases = json.loads(metadata.get("aliases", "{}"))
        shapes.update({alias: shapes[target] for alias, target in aliases.items()})
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({_short(exc)}); "
                              f"{_DAMAGED}") from exc
    expected = _expected_weights(model, adapter_only)
    what = "trainable parameters" if adapter_only else "state_dict keys"
    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model's {what}: {len(missing)} missing from the "
            f"checkpoint [{_names(missing)}], {len(unexpected)} not in the model "
            f"[{_names(unexpected)}]" + ("; an adapter checkpoint loads into a model with the "
                                         "same adapters set trainable" if adapter_only else ""))
    wrong = [f"{n} {tuple(shapes[n])} vs {tuple(s)}" for n, s in expected.items()
             if shapes[n] != s]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensors have another shape in the checkpoint "
                         f"than in the model (checkpoint vs model): {_names(wrong)}")
    try:
        weights = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({_short(exc)}); "
                              f"{_DAMAGED}") from exc
    for alias, target in aliases.items():
        weights[alias] = weights[target]
    return weights


def _load_weights(path: Path, model: torch.nn.Module, adapter_only: bool,
                  map_location) -> None:
    model.load_state_dict(_read_weights(path, model, adapter_only, map_location),
                          strict=not adapter_only)


def _read_torch(path: Path, map_location):
    """`torch.load(weights_only=True)` of a checkpoint file; a damaged file (torch raises
    RuntimeError, UnpicklingError, EOFError or OSError for one) is a CheckpointError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch has no one error type for a damaged file
        raise CheckpointError(f"{path} is truncated or corrupt ({_short(exc)}); "
                              f"{_DAMAGED}") from exc


def _read_state(path: Path) -> dict:
    """trainer_state.json, checked field by field."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({_short(exc)}); {_DAMAGED}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or \
            meta.get("version") != CHECKPOINT_VERSION:
        got = meta if isinstance(meta, dict) else {}
        raise CheckpointError(f"{path} is not an r2ec-fast checkpoint of version "
                              f"{CHECKPOINT_VERSION} (format {got.get('format')!r}, version "
                              f"{got.get('version')!r})")
    for key, ok, kind in (
            ("step", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
             "a non-negative int"),
            ("adapter_only", lambda v: isinstance(v, bool), "true or false"),
            ("trainer_state", lambda v: isinstance(v, dict), "an object")):
        if key not in meta:
            raise CheckpointError(f"{path}: field {key!r} is missing; {_DAMAGED}")
        if not ok(meta[key]):
            raise CheckpointError(f"{path}: field {key!r} must be {kind}, got {meta[key]!r}; "
                                  f"{_DAMAGED}")
    return meta


def checkpoint_item_table(loaded: dict, path: str | Path, num_items: int) -> ItemTable:
    """The item table of a `load_checkpoint(path, ...)` result, checked for a trainer's resume:
    present, and one row per item of the catalog (`num_items`) plus the padding row 0."""
    table = loaded["item_table"]
    if table is None:
        raise CheckpointError(f"checkpoint {path} has no {ITEM_TABLE_FILE} (a trainer's "
                              f"checkpoint always has one); {_DAMAGED}")
    table.check_rows(num_items + 1, f"the catalog ({num_items} items + the padding row)")
    return table


# ----------------------------------------------------------------------------- save

def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module, optimizer,
                    scheduler=None, item_table: ItemTable | None = None, trainer_state: dict,
                    keep_last: int | None = 2, adapter_only: bool = False,
                    rng_state: dict | None = None) -> Path:
    """Write `run_dir/checkpoints/step-{step:08d}/` atomically, point `latest` at it, and
    return its path.

    trainer_state: the trainer's own position (data order index, epoch, ...); it round-trips
    through JSON (tuples come back as lists, dict keys as strings). rng_state: default
    `capture_rng()` now. optimizer may be None (no optimizer.pt). keep_last: how many complete
    checkpoints to keep, the new one included (None keeps all); checkpoints with a larger step
    than this one (an abandoned run after resuming from an older checkpoint) are removed too.
    Saving a step that already exists replaces it (atomically where `_exchange` can: see the
    module's docstring).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
    try:  # before anything is written: a bad state must not cost the previous checkpoint
        state_json = json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                 "step": step, "adapter_only": adapter_only,
                                 "trainer_state": trainer_state}, indent=1)
    except TypeError as exc:
        raise ValueError(f"trainer_state must be JSON-serialisable ({exc}); tensors and "
                         "generator states belong in rng_state") from exc
    weights, aliases = _dedupe_shared(_weights_to_save(model, adapter_only))
    rng_state = capture_rng() if rng_state is None else rng_state

    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for leftover in ckpt_dir.glob(f"{TMP_PREFIX}*"):  # from a save that crashed
        _remove(leftover)
    name = f"step-{step:08d}"
    tmp, final = ckpt_dir / f"{TMP_PREFIX}{name}", ckpt_dir / name
    tmp.mkdir()

    save_file(weights, str(tmp / MODEL_FILE),
              metadata={"format": CHECKPOINT_FORMAT, "aliases": json.dumps(aliases),
                        "adapter_only": str(adapter_only)})
    _fsync(tmp / MODEL_FILE)
    if item_table is not None:
        item_table.save(tmp / ITEM_TABLE_FILE)
        _fsync(tmp / ITEM_TABLE_FILE)
    if optimizer is not None:
        _write_torch(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    if scheduler is not None:
        _write_torch(scheduler.state_dict(), tmp / SCHEDULER_FILE)
    _write_torch(rng_state, tmp / RNG_FILE)
    _write_bytes(tmp / STATE_FILE, state_json.encode())
    _write_bytes(tmp / COMPLETE, f"{name}\n".encode())
    _fsync(tmp)

    if not (final.exists() and _exchange(tmp, final)):  # exchanged: the old copy is at tmp
        if final.exists():  # re-saving a step without exchange: the old copy goes aside
            os.replace(final, ckpt_dir / f"{TMP_PREFIX}old-{name}")
        os.replace(tmp, final)
    _fsync(ckpt_dir)
    _write_bytes(ckpt_dir / f"{TMP_PREFIX}{LATEST}", f"{name}\n".encode())
    os.replace(ckpt_dir / f"{TMP_PREFIX}{LATEST}", ckpt_dir / LATEST)
    _fsync(ckpt_dir)

    complete = _complete_checkpoints(ckpt_dir)
    older = [p for s, p in complete if s < step]
    doomed = [p for s, p in complete if s > step]  # an abandoned run after an older resume
    if keep_last is not None:
        doomed += older[:max(0, len(older) - (keep_last - 1))]
    for folder in doomed:
        _discard(folder)
    _remove(tmp)  # the old copy of a re-saved step (after an exchange), if any
    _remove(ckpt_dir / f"{TMP_PREFIX}old-{name}")
    return final


# ----------------------------------------------------------------------------- load

def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder `latest` names when it is complete, else the complete `step-*` folder with
    the largest step, else None. Incomplete folders are never returned."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    pointer = ckpt_dir / LATEST
    if pointer.is_file():  # a garbled pointer (not UTF-8, not a step name) is ignored
        name = pointer.read_text(errors="replace").strip()
        if _STEP_DIR.fullmatch(name) and _is_complete(ckpt_dir / name):
            return ckpt_dir / name
    complete = _complete_checkpoints(ckpt_dir)
    return complete[-1][1] if complete else None


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer=None,
                    scheduler=None, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint folder written by `save_checkpoint` into `model` (and `optimizer`,
    `scheduler` when given). Returns {"step", "trainer_state", "item_table" (ItemTable on
    `map_location`, or None), "rng"}; pass `rng` to `restore_rng` to continue bit-exactly.

    Weights load strictly: every state_dict key of the model (for an adapter_only checkpoint:
    every trainable parameter) must be in the checkpoint with the same shape, and nothing else.
    Every file is read and checked before anything is loaded into `model`, `optimizer` or
    `scheduler`, so that a truncated or corrupt file (a `CheckpointError` naming it) leaves
    them as they were.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"no checkpoint folder at {path}")
    if (path / CHECKPOINTS_DIR).is_dir():
        raise ValueError(f"{path} is a run folder, not a checkpoint: pass "
                         f"latest_checkpoint({str(path)!r}) (or one of its step-* folders)")
    if not _is_complete(path):
        raise ValueError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: its save "
                         "was interrupted); use latest_checkpoint(run_dir) to find a complete one")
    for required in (STATE_FILE, MODEL_FILE, RNG_FILE):
        if not (path / required).is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {path / required} is missing")
    meta = _read_state(path / STATE_FILE)

    # read everything first: a damaged file must not leave the model half-loaded
    weights = _read_weights(path / MODEL_FILE, model, meta["adapter_only"], map_location)
    states = []
    for obj, filename in ((optimizer, OPTIMIZER_FILE), (scheduler, SCHEDULER_FILE)):
        if obj is None:
            continue
        if not (path / filename).is_file():
            raise ValueError(f"checkpoint {path} has no {filename} (it was saved without one); "
                             f"load it without {filename.split('.')[0]}=")
        states.append((obj, path / filename, _read_torch(path / filename, map_location)))
    table_file = path / ITEM_TABLE_FILE
    item_table = ItemTable.load(table_file, device=map_location) if table_file.is_file() else None
    rng = _read_torch(path / RNG_FILE, "cpu")

    model.load_state_dict(weights, strict=not meta["adapter_only"])
    for obj, file, state in states:
        try:
            obj.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{file} does not fit the given {type(obj).__name__}: "
                             f"{exc}") from exc
    return {"step": meta["step"], "trainer_state": meta["trainer_state"],
            "item_table": item_table, "rng": rng}

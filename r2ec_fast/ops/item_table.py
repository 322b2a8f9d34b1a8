"""`ItemTable`: the rec head H_V, one row per item, as the trainer holds it (DESIGN §4.1)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

SIMILARITIES = ("cosine", "dot")
TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FILE_FORMAT = "r2ec_fast.ItemTable"  # safetensors metadata "format" of a saved table
FILE_VERSION = "1"  # one tensor "weight" [V, d]; later versions may add quantisation scales


class ItemTable:
    """Item rows in the dtype the scoring kernels stream (bf16 halves the bytes read).

    For ``similarity="cosine"`` the rows are stored L2-normalised (normalised in fp32, then
    cast), so scoring skips the per-row norm; for ``"dot"`` they are stored as given.
    The table never takes part in autograd: it is refreshed from detached encodings.
    """

    def __init__(self, rows: torch.Tensor, similarity: str = "cosine",
                 dtype: torch.dtype | None = None):
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}; choose one of {SIMILARITIES}")
        dtype = rows.dtype if dtype is None else dtype
        if dtype not in TABLE_DTYPES:
            raise ValueError(f"ItemTable dtype {dtype} is not one of {TABLE_DTYPES}")
        if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
            raise ValueError(f"rows must be a non-empty [V, d] tensor, got shape {tuple(rows.shape)}")
        if not rows.is_floating_point():
            raise ValueError(f"rows must be floating point, got {rows.dtype}")
        self.similarity = similarity
        self.weight = self._prepare(rows.detach(), dtype)  # [V, d]
        self.source: Path | None = None  # the file it was loaded from, named in errors

    def _prepare(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.similarity == "cosine":
            rows = F.normalize(rows.float(), dim=-1)
        return rows.to(dtype).contiguous()

    @property
    def normalized(self) -> bool:
        return self.similarity == "cosine"

    @property
    def num_items(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (f"ItemTable(num_items={self.num_items}, dim={self.dim}, dtype={self.dtype}, "
                f"similarity={self.similarity!r}, device={self.device})")

    def describe(self) -> str:
        """"item table <file>" for a loaded table, else "an item table" (for messages)."""
        source = getattr(self, "source", None)
        return f"item table {source}" if source is not None else "an item table"

    def check_rows(self, num_items: int, what: str) -> None:
        """Raise ValueError unless the table has `num_items` rows; `what` names whose count
        that is (e.g. "the catalog (500 items + padding)")."""
        if self.num_items != num_items:
            raise ValueError(f"{self.describe()} has {self.num_items} rows but {what} has "
                             f"{num_items}: it was encoded for another catalog")

    def to(self, device: torch.device | str) -> "ItemTable":
        self.weight = self.weight.to(device)
        return self

    @torch.no_grad()
    def refresh_rows(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Overwrite rows ``ids`` [B] with fresh encodings ``hidden`` [B, d] (detached).

        With duplicate ids the last occurrence wins.
        """
        if ids.dim() != 1 or hidden.dim() != 2 or hidden.shape != (ids.shape[0], self.dim):
            raise ValueError(f"refresh_rows needs ids [B] and hidden [B, {self.dim}], got "
                             f"{tuple(ids.shape)} and {tuple(hidden.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integer, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_items):
            raise ValueError(f"ids out of range [0, {self.num_items})")
        ids = ids.to(self.device)
        # keep the last occurrence of each id so the write does not depend on scatter order
        order = torch.arange(ids.numel(), device=ids.device)
        last = torch.full((self.num_items,), -1, dtype=torch.long, device=ids.device)
        last.scatter_reduce_(0, ids.long(), order, reduce="amax")
        keep = last[ids.long()] == order
        self.weight[ids[keep].long()] = self._prepare(hidden.detach()[keep.to(hidden.device)]
                                                      .to(self.device), self.dtype)

    # ------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """Write the table as a safetensors file: tensor "weight" [V, d] exactly as held (cosine
        rows already normalised), similarity and format version in the file's metadata. The
        file is written under a temporary name beside `path` and renamed over it once whole:
        a crash leaves the previous file or none, never a truncated one."""
        from safetensors.torch import save_file

        path = Path(path)
        metadata = {"format": FILE_FORMAT, "version": FILE_VERSION,
                    "similarity": self.similarity, "dtype": str(self.dtype).replace("torch.", ""),
                    "num_items": str(self.num_items), "dim": str(self.dim)}
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        try:
            save_file({"weight": self.weight.detach().contiguous().cpu()}, str(tmp),
                      metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> "ItemTable":
        """Read a table written by `save`, bit for bit (rows are not normalised again), onto
        `device` (default CPU). Raises ValueError for a file that is not such a table."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no item table file at {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                names = list(f.keys())
                if metadata.get("format") != FILE_FORMAT or names != ["weight"]:
                    raise ValueError(f"{path} is not an ItemTable file (safetensors metadata "
                                     f"format={metadata.get('format')!r}, tensors {names}); "
                                     "write one with ItemTable.save")
                weight = f.get_tensor("weight")
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a safetensors file ({exc}); an ItemTable file is "
                             "written by ItemTable.save") from exc
        if metadata.get("version") != FILE_VERSION:
            raise ValueError(f"{path} is an ItemTable file of format version "
                             f"{metadata.get('version')!r}; this r2ec-fast reads version "
                             f"{FILE_VERSION}")
        similarity = metadata.get("similarity")
        stated = (metadata.get("num_items"), metadata.get("dim"))  # as save wrote them
        if similarity not in SIMILARITIES or weight.dtype not in TABLE_DTYPES or \
                weight.dim() != 2 or any(s is not None and s != str(n)
                                         for s, n in zip(stated, weight.shape)):
            raise ValueError(f"{path}: corrupt ItemTable file (similarity {similarity!r}, "
                             f"weight {weight.dtype} of shape {tuple(weight.shape)}, metadata "
                             f"num_items {stated[0]}, dim {stated[1]})")
        table = cls.__new__(cls)  # the rows are stored prepared: skip __init__'s normalisation
        table.similarity = similarity
        table.weight = weight.to(device) if device is not None else weight
        table.source = path
        return table

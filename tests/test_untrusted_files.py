"""Untrusted files (issue 13 item 6): every load of a tensor file goes through safetensors or
`torch.load(weights_only=True)`, and no code turns `trust_remote_code` on by itself.

A static scan of every Python file of the checkout (the package, kernels, benchmarks, scripts,
tests): a pickle load anywhere fails this test, with the file and line. What counts as one:
`pickle`/`cPickle`/`dill`/`cloudpickle`/`joblib`/`shelve`/`marshal` loads and `Unpickler`,
`torch.load` without a literal `weights_only=True`, `numpy.load(..., allow_pickle=True)`,
pandas' `read_pickle`, and `torch.serialization.load`. A `trust_remote_code=` keyword must not
be the literal True (it has to come from a flag or an option the user sets).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("r2ec_fast", "kernels", "benchmarks", "scripts", "tests", "setup.py")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal"}
PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}


def python_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def _dotted(node: ast.AST) -> str:
    """"torch.load" for the call target `torch.load`; "" when it is not a plain name path."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([node.id, *reversed(parts)])


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(source: str, filename: str) -> list[str]:
    """Every unsafe load and hard-wired trust_remote_code=True in one file's source."""
    tree = ast.parse(source, filename)
    imported: dict[str, str] = {}  # local name -> module.function for `from x import y`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name.split(".")[0]] = alias.name
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{imported.get(head, head)}.{rest}" if rest else imported.get(head, head)
        where = f"{filename}:{node.lineno}"
        module, _, func = full.rpartition(".")
        if module.split(".")[0] in PICKLE_MODULES and func in PICKLE_CALLS:
            found.append(f"{where}: {name}(...) is a pickle load")
        elif full in ("torch.load", "torch.serialization.load"):
            if not _is_true(_keyword(node, "weights_only")):
                found.append(f"{where}: {name}(...) without weights_only=True")
        elif full in ("numpy.load", "np.load") and _is_true(_keyword(node, "allow_pickle")):
            found.append(f"{where}: {name}(..., allow_pickle=True)")
        elif func == "read_pickle":
            found.append(f"{where}: {name}(...) is a pickle load")
        if _is_true(_keyword(node, "trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True hard-wired (take it from a flag)")
    return found


def test_no_pickle_load_and_no_hardwired_remote_code():
    files = python_files()
    assert len(files) > 50, "the scan found too few files: is ROOT right?"
    bad = [f for path in files
           for f in findings(path.read_text(), str(path.relative_to(ROOT)))]
    assert not bad, "unsafe loads:\n" + "\n".join(bad)


def test_the_scan_catches_each_form():
    """The scanner itself: each unsafe form is reported, the safe ones are not."""
    unsafe = """
import pickle, joblib
import numpy as np
import torch
from pickle import loads as L
from torch import load
pickle.load(f)
L(b)
joblib.load("x")
np.load("a.npy", allow_pickle=True)
torch.load("a.pt")
torch.load("a.pt", weights_only=False)
load("a.pt")
pd.read_pickle("x")
AutoModel.from_pretrained("p", trust_remote_code=True)
"""
    assert len(findings(unsafe, "unsafe.py")) == 9, findings(unsafe, "unsafe.py")
    safe = """
import numpy as np
import torch
from safetensors.torch import load_file
torch.load("a.pt", weights_only=True, map_location="cpu")
np.load("a.npy")
load_file("a.safetensors")
json.load(f)
AutoModel.from_pretrained("p", trust_remote_code=cfg.trust_remote_code)
"""
    assert findings(safe, "safe.py") == []

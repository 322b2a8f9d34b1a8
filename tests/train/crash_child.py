"""Child process of test_crash_safety.py: the real `r2ec-fast train` (`r2ec_fast.cli.main`, the
user's path, `--resume` included) with the file operations of a checkpoint save reported.

    python crash_child.py CLI-ARGS...      (e.g. train --config c.json --out run --resume)

Every call that `save_checkpoint` makes to write, fsync, rename or delete something
(`save_file`, `ItemTable.save`, `_write_torch`, `_write_bytes`, `_fsync`, `os.replace`,
`_exchange`, `_remove`, `_discard`), and `save_checkpoint` itself, is wrapped to write one
line before the call and one after it to the file descriptor in $CRASH_EVENTS_FD, unbuffered
(`os.write`), so that the parent knows how far a save got when it killed this process:

    <save> <event> <microseconds> begin|end <function> <arguments' base names>

<save> counts the saves of this process from 1, <event> the events of that save from 0,
<microseconds> is time.monotonic_ns() // 1000; `save` lines name the step's folder. The
functions are called exactly as before (same arguments, same order): only the reporting is
added.

$CRASH_STOP="<save number> <begin|end> <function> <argument pattern>" (optional): on the first
event of that save number or a later one that matches (the pattern has `#` for the digits of a
step), this process stops itself (SIGSTOP) right after reporting it, so that the parent's
SIGKILL lands exactly there.
"""
import os
import re
import signal
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from r2ec_fast import cli  # noqa: E402
from r2ec_fast.ops.item_table import ItemTable  # noqa: E402
from r2ec_fast.train import checkpoint as ckpt  # noqa: E402

_FD = int(os.environ["CRASH_EVENTS_FD"])
_STOP = os.environ.get("CRASH_STOP", "").split(" ", 1)
_state = {"save": 0, "event": 0}


def normalise(label: str) -> str:
    """The argument label with step numbers replaced by '#' (the same for every save)."""
    return re.sub(r"\d{8}", "#", label)


def _stop_here(phase: str, name: str, label: str) -> bool:
    if len(_STOP) != 2:
        return False
    save, key = int(_STOP[0]), _STOP[1]
    return _state["save"] >= save and f"{phase} {name} {normalise(label)}" == key


def _event(phase: str, name: str, label: str) -> None:
    os.write(_FD, f"{_state['save']} {_state['event']} {time.monotonic_ns() // 1000} {phase} "
                  f"{name} {label}\n".encode())
    _state["event"] += 1
    if _stop_here(phase, name, label):
        os.kill(os.getpid(), signal.SIGSTOP)


def _label(args) -> str:
    """The base names of the path arguments (tensors, dicts and bytes are left out)."""
    names = [os.path.basename(str(a)) for a in args if isinstance(a, (str, os.PathLike))]
    return ">".join(names) or "-"


def _wrap(name: str, fn):
    def wrapper(*args, **kwargs):
        text = _label(args)
        _event("begin", name, text)
        result = fn(*args, **kwargs)
        _event("end", name, text)
        return result
    return wrapper


def _wrap_save(fn):
    def save_checkpoint(run_dir, step, **kwargs):
        _state["save"] += 1
        _state["event"] = 0
        _event("begin", "save", f"step-{step:08d}")
        path = fn(run_dir, step, **kwargs)
        _event("end", "save", f"step-{step:08d}")
        return path
    return save_checkpoint


class _OsProxy:
    """`os` as the checkpoint module sees it, with `replace` reported."""

    def __init__(self, real):
        self._real = real
        self.replace = _wrap("replace", real.replace)

    def __getattr__(self, name):
        return getattr(self._real, name)


def install() -> None:
    for name in ("save_file", "_write_torch", "_write_bytes", "_fsync", "_remove", "_discard",
                 "_exchange"):
        if hasattr(ckpt, name):
            setattr(ckpt, name, _wrap(name, getattr(ckpt, name)))
    ckpt.os = _OsProxy(os)
    ItemTable.save = _wrap("item_table_save", ItemTable.save)
    ckpt.save_checkpoint = _wrap_save(ckpt.save_checkpoint)

if __name__ == "__main__":
    install()
    sys.exit(cli.main(sys.argv[1:]))

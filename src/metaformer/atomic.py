"""Atomic file writes: a crash mid-write never leaves half a file under the final name.

Temporary files are named ``.<name>.<pid>.<random>.tmp`` next to their target, so a later
run can tell the leftovers of a killed writer (its process is gone) from a write in progress
(:func:`clean_stale_temps`).
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")


def temp_file(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Create (empty) and return a temporary file beside ``path``, tagged with this process's id."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file in the same directory, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` made atomic (checkpoints: the previous one survives a crash mid-write)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files of :func:`atomic_write` in ``directory`` whose writer process is gone; returns them."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            m = _TEMP.match(entry.name)
            if m and entry.is_file() and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed

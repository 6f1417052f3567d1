"""Atomic file writes: a crash mid-write never leaves half a file under the final name.

Temporary files (and folders) are named ``.<name>.<pid>.<random>.tmp`` next to their target, so
a later run can tell the leftovers of a killed writer (its process is gone) from a write in
progress (:func:`clean_stale_temps`). :func:`atomic_write` takes a function writing to an open
file; :func:`atomic_path` gives a path for writers that take a file name (exporters, converters),
and lets the caller check the result before it is renamed into place.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

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
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename durable (not possible on every OS)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp`` (a file or a folder, by any writer; it has ``p``'s own
    name, inside a temporary folder beside ``p``); it becomes ``p`` when the block ends without an error,
    and is removed otherwise (raise inside the block to refuse a result that failed its check)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        tmp = holder / path.name
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


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
    """Delete the temp files and folders of this module's writers in ``directory`` whose writer process is gone;
    returns them."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            m = _TEMP.match(entry.name)
            if m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
                if entry.is_dir(follow_symlinks=False):  # atomic_path's folder
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(Path(entry.path))
                elif entry.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    return removed

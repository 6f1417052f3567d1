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

from .errors import MetaFormerError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")
NAME_MAX = 255  # bytes per file name on the file systems we meet (ext4, xfs, btrfs, APFS, NTFS)
_RANDOM = 8  # characters tempfile adds


def short_name(name: str, budget: int) -> str:
    """``name`` cut to at most ``budget`` bytes (UTF-8, whole characters): a temporary name built from a long
    target name must still be a legal name."""
    while len(name.encode()) > budget:
        name = name[:-1]
    return name


def temp_prefix(path: Path, tag: str = "", suffix: str = "") -> str:
    """``.<name>.<tag>`` for a temporary sibling of ``path``, short enough for the random part and ``suffix``."""
    budget = NAME_MAX - len(f"..{tag}".encode()) - _RANDOM - len(suffix.encode())
    return f".{short_name(path.name, budget)}.{tag}"


def temp_file(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Create (empty) and return a temporary file beside ``path``, tagged with this process's id."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path, f"{os.getpid()}.", suffix), suffix=suffix)
    os.close(fd)
    return Path(tmp)


class _Recording:
    """A file object that remembers the first ``OSError`` of a write. ``torch.save`` reports a failed write
    (a full disk) as its own ``RuntimeError`` ("unexpected pos ..."), which hides the reason; the
    recorded error is raised instead."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def output_file(output: str | os.PathLike | None, default: str, suffix: str = "") -> Path:
    """The file an ``--output`` option names: ``default`` when there is none, and ``default``'s name inside it when
    it names a folder (one that exists, or a path ending in a separator), as ``cp`` and ``mv`` read a folder;
    ``suffix`` added when the name has another."""
    if output is None or str(output) == "":
        path = Path(default)
    else:
        text = os.fspath(output)
        try:
            folder = text.endswith((os.sep, "/")) or Path(text).is_dir()
        except OSError:  # a name the file system refuses (too long): check_writable says so
            folder = False
        path = Path(text) / Path(default).name if folder else Path(text)
    return path if not suffix or path.suffix == suffix else path.with_name(path.name + suffix)


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """Refuse an output before any work is done, leaving no trace: a name longer than file systems allow, a
    file where a folder is wanted (or the reverse), a read-only place. ``what`` names it for the user
    (``--output runs/x``); ``folder``: the output is a folder (else a file)."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise MetaFormerError(f"{what}: the name {part[:24]}...{part[-8:]} is {len(os.fsencode(part))} bytes "
                                  f"long, and file systems allow at most {NAME_MAX} per name: choose a shorter name")
    if folder and path.exists() and not path.is_dir():
        raise MetaFormerError(f"{what} is a file, not a folder: choose a folder")
    if not folder and path.is_dir():
        raise MetaFormerError(f"{what} is a folder: name a file (e.g. {path / 'out'}...)")
    probe = path if folder else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise MetaFormerError(f"{what}: {probe} is a file, so the folder cannot be created")
    try:
        temp_file(probe / "write-test").unlink()
    except OSError as e:
        raise MetaFormerError(f"cannot write to {what} ({e.strerror or e} in {probe}): is it read-only? Choose a "
                              "writable place") from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file in the same directory, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    try:
        with open(tmp, "wb") as f:
            recording = _Recording(f)
            try:
                write(recording)
                f.flush()
            except Exception as e:
                if recording.error is not None and not isinstance(e, OSError):
                    raise recording.error from None
                raise
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
def atomic_path(path: str | os.PathLike, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp`` (a file or a folder, by any writer; it has ``p``'s own
    name, inside a temporary folder beside ``p``); it becomes ``p`` when the block ends without an error,
    and is removed otherwise (raise inside the block to refuse a result that failed its check).
    ``companions``: suffixes of files the writer puts beside ``tmp`` (OpenVINO's ``.bin``), moved first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path, f"{os.getpid()}.", ".tmp"), suffix=".tmp"))
    try:
        tmp = holder / path.name
        yield tmp
        for src, dst in [*((tmp.with_suffix(s), path.with_suffix(s)) for s in companions), (tmp, path)]:
            if src.is_file():
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(src, dst)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` made atomic (checkpoints: the previous one survives a crash mid-write)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def _temp_of(m: re.Match, name: str) -> bool:
    """Whether the temp name matched by ``m`` was made for the file ``name`` (cut short when ``name`` is long)."""
    return m["name"] == name or (name.startswith(m["name"]) and len(os.fsencode(m["name"])) > NAME_MAX - 64)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temp files and folders of this module's writers in ``directory`` whose writer process is gone
    (only those for the file ``name``, when given); returns them."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            m = _TEMP.match(entry.name)
            if m and (name is None or _temp_of(m, name)) and int(m["pid"]) != os.getpid() \
                    and not pid_alive(int(m["pid"])):
                if entry.is_dir(follow_symlinks=False):  # atomic_path's folder
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(Path(entry.path))
                elif entry.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    return removed

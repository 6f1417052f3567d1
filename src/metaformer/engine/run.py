"""A training run's folder from the first check to the end: one lifecycle for every task.

``with RunDir(...) as run:`` is how classification, detection and segmentation open, lock, resume, save
and close their folder:

- :meth:`RunDir.check`, before any work: the folder is usable, and an earlier run in it is continued only
  with ``--resume`` and replaced only with ``--overwrite`` (:func:`~metaformer.engine.checkpoint.check_output`).
- Entering: the folder is created and locked (:class:`RunLock`: one writer per folder). Under
  ``--overwrite`` the earlier run is not deleted but set aside in ``.metaformer.previous/``: it is deleted
  when the new run writes its first checkpoint (:meth:`RunDir.save`), and put back if the new run fails
  before that (a download that fails offline, bad data found late, a crash in the first epoch), so a
  replacement that never got going loses nothing. A set-aside run found on entering (its run was killed
  outright) is put back first.
- :meth:`RunDir.load` reads the checkpoint ``--resume`` names; :meth:`RunDir.save` writes atomically.
- Leaving with an error before training started (``started()``): what the run created is removed, the
  folder too when the run made it, so the same command can simply be run again.

Only rank 0 touches the folder; on the other ranks the same calls do nothing but share rank 0's errors.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from ..atomic import atomic_write, clean_stale_temps
from ..errors import ConfigError
from . import checkpoint as ckpt_io
from .checkpoint import CheckpointError, RunFolder, existing_run_files
from .runtime import on_main


class RunLock:
    """One writer per run folder: an operating-system lock on ``OUTPUT/.metaformer.lock`` (``filelock``), which
    the kernel releases when its process ends however it ends, so a dead run's lock never needs taking over and
    two processes can never both hold it. ``OUTPUT/.metaformer.owner`` names the holder (pid, host, since) for
    the message that refuses a second run."""

    NAME = ".metaformer.lock"
    OWNER = ".metaformer.owner"

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path, self.owner_path = self.out / self.NAME, self.out / self.OWNER
        self._lock = FileLock(str(self.path), timeout=0)
        self.held = self.made_file = False

    def owner(self) -> dict | None:
        """Who holds the lock, as its note says (None when unreadable)."""
        try:
            owner = json.loads(self.owner_path.read_text())
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.made_file = not self.path.exists()
        try:
            self._lock.acquire()
        except Timeout:
            owner = self.owner()
            who = (f"process {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}" if owner
                   else "another process")
            raise CheckpointError(f"{self.out} is being written by another run ({who}): one run per folder. Wait for "
                                  "it to end or stop it, or choose another --output") from None
        except OSError as e:
            raise CheckpointError(f"cannot lock {self.out} ({e.strerror or e}): is it on a read-only file system?") \
                from None
        self.held = True
        note = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(self.owner_path, lambda f: f.write(json.dumps(note).encode()))

    def release(self, remove: bool = False) -> None:
        """Let the folder go. The lock file stays (a process about to lock it must find the same file), except
        with ``remove`` when this lock made it: a run that failed before it started leaves the folder as found."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(FileNotFoundError):
            self.owner_path.unlink()
        if remove and self.made_file:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._lock.release()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunDir:
    """A run's folder for its whole life (see the module docstring). ``rt``: the process's
    :class:`~metaformer.engine.runtime.Runtime` (rank, logging); ``started()``: whether training has taken its
    first step (a run that fails before leaves nothing behind)."""

    PREVIOUS = ".metaformer.previous"

    def __init__(self, output: str | os.PathLike, resume: str | None, overwrite: bool, rt,
                 started: Callable[[], bool] = lambda: False):
        self.output, self.resume, self.overwrite, self.rt = Path(output), resume, overwrite, rt
        self.started = started
        self.lock = RunLock(self.output) if rt.main else None
        self.folder = RunFolder(self.output)
        self.previous = self.output / self.PREVIOUS
        self.set_aside: list[str] = []  # the earlier run's files in `previous`, until the first checkpoint
        self.saved = False

    # ------------------------------------------------------------------------------------------ opening
    def check(self) -> Path:
        """Before any work: refuse an unusable folder, leaving no trace."""
        on_main(lambda: ckpt_io.check_output(self.output, self.resume, self.overwrite), self.rt.main)
        return self.output

    def __enter__(self) -> "RunDir":
        try:
            on_main(self._open, self.rt.main)
        except BaseException:
            self._close(failed=True)
            raise
        return self

    def _open(self) -> None:
        out = self.output
        ckpt_io.check_output(out, self.resume, self.overwrite)
        try:
            self.folder.create()
        except OSError as e:
            raise ConfigError(f"cannot create --output {out} ({e.strerror or e})") from None
        self.lock.acquire()
        if self.previous.is_dir():
            self._put_back(f"{out}: put back the run that an interrupted --overwrite had set aside (it stopped "
                           "before its first checkpoint)")
            ckpt_io.check_output(out, self.resume, self.overwrite)  # the folder's contents changed
        continuing = self.resume_path() is not None
        if self.overwrite and not continuing:
            names = existing_run_files(out)
            if names:
                self.previous.mkdir()
                for name in names:
                    os.replace(out / name, self.previous / name)
                self.set_aside = names
        clean_stale_temps(out)
        self.folder.opened(continuing)

    def _put_back(self, message: str) -> None:
        """Remove the new run's files and move the set-aside run back."""
        for name in existing_run_files(self.output):
            target = self.output / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        for entry in self.previous.iterdir():
            os.replace(entry, self.output / entry.name)
        self.previous.rmdir()
        self.rt.log(message)

    # ------------------------------------------------------------------------------------------ during
    def resume_path(self) -> Path | None:
        return ckpt_io.resume_path(self.resume, self.output)

    def load(self, task: str) -> dict | None:
        """The training checkpoint ``--resume`` names (``task``: train, detect or segment), or None."""
        path = self.resume_path()
        return ckpt_io.load(path, task) if path else None

    def save(self, state: dict, is_best: bool = False) -> Path | None:
        """Write the checkpoint ``state`` atomically (rank 0; ``best.pth`` first when ``is_best``). The first save
        makes this run the folder's: an earlier run set aside by ``--overwrite`` is deleted now."""
        if not self.rt.main:
            return None
        path = ckpt_io.save_pair(state, self.output, is_best)
        if not self.saved:
            self.saved = True
            if self.set_aside:
                shutil.rmtree(self.previous, ignore_errors=True)
                self.set_aside = []
        return path

    # ------------------------------------------------------------------------------------------ closing
    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(failed=exc_type is not None)

    def _close(self, failed: bool) -> None:
        if self.lock is None:  # not rank 0
            return
        undone = False
        try:
            if failed and self.set_aside and not self.saved:
                self.folder.undo(force=True, folders=False)
                self._put_back(f"{self.output}: the new run stopped before its first checkpoint; the earlier run "
                               "--overwrite would have replaced is back in place")
            elif failed and not self.started():
                self.folder.undo(folders=False)
                undone = True
        finally:
            self.lock.release(remove=undone)
            if undone:
                self.folder.remove_created()

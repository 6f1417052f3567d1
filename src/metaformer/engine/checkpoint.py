"""Run folders and checkpoints that never lose work.

- :func:`check_output` checks the output folder before anything runs: it must be a folder
  we can write to, and an earlier run in it is continued only with ``--resume`` and replaced
  only with ``--overwrite`` (a re-run never appends to another run's logs, and ``--resume auto``
  without a ``last.pth`` never starts a run's folder over). The lifecycle built on these (lock,
  set-aside, undo) is :class:`metaformer.engine.run.RunDir`.
- :func:`load` refuses a checkpoint it cannot read or whose weights are NaN or inf, in one line.
- :func:`save` writes atomically and turns a full disk into a message that says the previous
  checkpoint is intact.
- :func:`save_pair` writes ``best.pth`` *before* ``last.pth``: a kill between the two leaves
  a ``last.pth`` of the epoch before, which resume redoes, never a ``last.pth`` better than
  ``best.pth``. :func:`reconcile_best` repairs folders written otherwise.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import torch

from ..atomic import atomic_save, atomic_write, check_writable
from ..errors import ConfigError, MetaFormerError

# What a run writes into its folder (a new run replaces these only with --overwrite).
RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "metrics.jsonl", "summary.json", "curves.png", "config.yaml",
             "tb")


class CheckpointError(MetaFormerError):
    """A checkpoint that cannot be written (full disk, permissions) or read."""


def existing_run_files(out: Path) -> list[str]:
    names = [n for n in RUN_FILES if (out / n).exists()]
    return names + sorted(p.name for p in out.glob("config.*.yaml"))


def check_output(out: str | os.PathLike, resume: str | None = None, overwrite: bool = False) -> Path:
    """Refuse an unusable output folder before any work, leaving no trace (the run's lifecycle after that:
    :class:`metaformer.engine.run.RunDir`).

    ``resume`` is the ``--resume`` option (a path, ``auto`` or None). A folder holding a run's files is
    never started over without ``overwrite``: ``--resume auto`` there without a ``last.pth`` to continue
    from is refused too, rather than read as "start from scratch".
    """
    out = Path(out)
    check_writable(out, f"--output {out}", folder=True)
    existing = existing_run_files(out) if out.is_dir() else []
    if existing and not resume and not overwrite:
        raise ConfigError(f"--output {out} already holds a run ({', '.join(existing[:5])}): continue it with "
                          "--resume auto, replace it with --overwrite, or choose another --output")
    last = out / "last.pth"
    if resume == "auto" and last.exists() and not last.is_file():
        raise ConfigError(f"--resume auto: {last} is not a checkpoint file (a folder?): move it away, or pass the "
                          "checkpoint to continue from with --resume FILE")
    work = finished_work(out) if resume == "auto" and not last.exists() and not overwrite else []
    if work:
        best = out / "best.pth"
        raise ConfigError(f"--resume auto: {out} holds a run ({', '.join(work)}) but no last.pth to continue "
                          "from, and starting it over would replace it: put last.pth back, "
                          + (f"continue from the best epoch with --resume {best}, " if best.is_file() else "")
                          + "or start over with --overwrite")
    return out


def finished_work(out: Path) -> list[str]:
    """What a new run in ``out`` would destroy: checkpoints, a summary, rows of metrics (a run killed before its
    first checkpoint leaves only its config and an empty log, which a fresh start may replace)."""
    found = [n for n in ("best.pth", "summary.json") if (out / n).exists()]
    try:
        rows = sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        rows = 0
    return found + ([f"metrics.jsonl with {rows} row(s)"] if rows else [])


class RunFolder:
    """A run's folder until its training starts: a folder counts as a run only once training has started (the
    first optimizer step), so a run that fails before (a missing package, a failed download, bad data found late)
    removes what it created there, the folder and its parents included, and the same command can simply be run
    again. A folder that already held a run (``--resume``) is never touched. Rank 0 only (a locked run removes the
    folders it created once it has released the lock, whose file is in them: :meth:`remove_created`)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.created: list[Path] = []  # folders this run made, deepest first
        self.before: set[str] | None = None  # what the folder held before the run wrote into it
        self.started = False

    def create(self) -> None:
        self.created = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)

    def opened(self, continuing: bool) -> None:
        """The folder is ready for the run's files (an earlier run's set aside under --overwrite); ``continuing``: it
        holds the run this one continues."""
        self.before = {p.name for p in self.out.iterdir()}
        self.started = continuing

    def undo(self, force: bool = False, folders: bool = True) -> list[str]:
        """Remove what the run created, unless its training started (or ``force``); returns the names removed.
        ``folders``: the folders it created too (else :meth:`remove_created` does, later)."""
        if (self.started and not force) or self.before is None:
            return []
        removed = []
        for path in sorted(self.out.iterdir()):
            if path.name not in self.before:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else \
                    path.unlink(missing_ok=True)
                removed.append(path.name)
        if folders:
            self.remove_created()
        return removed

    def remove_created(self) -> None:
        """Remove the folders :meth:`create` made, when they are empty."""
        for folder in self.created:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                folder.rmdir()


def save(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically; a failure leaves the previous file at ``path`` untouched and says so."""
    path = Path(path)
    try:
        return atomic_save(state, path)
    except OSError as e:
        previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"disk full while writing {path}: {previous}. Free some space and continue with "
                                  "--resume auto") from None
        raise CheckpointError(f"cannot write {path} ({e.strerror or e}): {previous}") from None


def save_pair(state: dict, out: Path, is_best: bool) -> Path:
    """Write ``best.pth`` (when this is the best epoch) and then ``last.pth``; returns the path of ``last.pth``."""
    if is_best:
        save(state, out / "best.pth")
    return save(state, out / "last.pth")


def _peek(path: Path) -> dict | None:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return ckpt if isinstance(ckpt, dict) else None


def reconcile_best(last_path: Path, last: dict, metric: str) -> str | None:
    """Make ``best.pth`` beside ``last_path`` agree with ``last`` (loaded); returns what was done, if anything.

    ``last[metric]`` is the best score so far, reached at epoch ``last['best_epoch']``. When that is
    ``last`` itself and ``best.pth`` is missing, unreadable or older, ``last.pth`` is copied to
    ``best.pth``. When ``best.pth`` holds a better score (a kill after writing it, before
    ``last.pth``), ``last`` takes that score, so the resumed run does not replace a better
    ``best.pth`` with a worse epoch.
    """
    best_path = last_path.parent / "best.pth"
    best = _peek(best_path) if best_path.exists() else None
    if best is not None and best.get(metric, -float("inf")) > last.get(metric, -float("inf")):
        last[metric], last["best_epoch"] = best[metric], best.get("best_epoch")
        return f"{best_path} holds a better score ({best[metric]:.4g}) than {last_path.name} knew: kept as the best"
    if last.get("best_epoch") is not None and last["best_epoch"] == last.get("epoch") \
            and (best is None or best.get("epoch") != last.get("epoch")):
        with open(last_path, "rb") as src:
            atomic_write(best_path, lambda f: shutil.copyfileobj(src, f))
        return f"{best_path} was {'missing' if best is None else 'older than ' + last_path.name}: brought up to date"
    return None


def load(path: str | os.PathLike, task: str) -> dict:
    """A training checkpoint of ``task`` (``train``, ``detect`` or ``segment``), read without running code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: pass its last.pth, or --resume auto with --output {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a save that never finished; continue from "
                              "another checkpoint (best.pth?) with --resume FILE, or start over with --overwrite")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path}: {first}; it is probably truncated or corrupt (an "
                              "older one may be in the same folder)") from None
    found = ckpt.get("task", "train" if "model_config" in ckpt else None) if isinstance(ckpt, dict) else None
    if found != task or "model" not in ckpt or "optimizer" not in ckpt:
        verb = {"train": "metaformer train", "detect": "metaformer detect train",
                "segment": "metaformer segment train"}
        what = f"a `{verb[found]}` checkpoint" if found in verb else "not a training checkpoint (weights alone " \
            "hold no optimizer or schedule state)"
        raise CheckpointError(f"{path} is {what}; --resume needs the last.pth or best.pth of `{verb[task]}`")
    bad = nonfinite(ckpt["model"])
    if bad:
        raise CheckpointError(f"{path} holds NaN or inf weights ({len(bad)} tensor(s), e.g. {bad[0]}): it was saved "
                              "from a diverged run and cannot be continued; use an earlier checkpoint "
                              "(--resume FILE), or start over with --overwrite and a lower --lr")
    return ckpt


def nonfinite(state_dict) -> list[str]:
    """The names of the floating-point tensors in ``state_dict`` that hold NaN or inf."""
    return [k for k, v in (state_dict or {}).items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def good_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint in ``out`` whose weights are all finite (``last.pth``, else ``best.pth``)."""
    for name in ("last.pth", "best.pth"):
        ckpt = _peek(out / name) if (out / name).is_file() else None
        if ckpt is not None and isinstance(ckpt.get("model"), dict) and not nonfinite(ckpt["model"]):
            return out / name
    return None


def resume_path(resume: str | None, output: Path) -> Path | None:
    """``--resume``: a path, ``auto`` (``OUTPUT/last.pth`` when there is one), or nothing."""
    if resume == "auto":
        return output / "last.pth" if (output / "last.pth").is_file() else None
    return Path(resume) if resume else None

"""Run folders and checkpoints that never lose work.

- :func:`prepare_output` checks the output folder before anything runs: it must be a folder
  we can write to, and an earlier run in it is continued only with ``--resume`` and replaced
  only with ``--overwrite`` (a re-run never appends to another run's logs).
- :func:`save` writes atomically and turns a full disk into a message that says the previous
  checkpoint is intact.
- :func:`save_pair` writes ``best.pth`` *before* ``last.pth``: a kill between the two leaves
  a ``last.pth`` of the epoch before, which resume redoes, never a ``last.pth`` better than
  ``best.pth``. :func:`reconcile_best` repairs folders written otherwise.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch

from ..atomic import atomic_save, atomic_write, clean_stale_temps, temp_file
from ..errors import ConfigError, MetaFormerError

# What a run writes into its folder (a new run replaces these only with --overwrite).
RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "metrics.jsonl", "summary.json", "curves.png", "config.yaml",
             "tb")


class CheckpointError(MetaFormerError):
    """A checkpoint that cannot be written (full disk, permissions) or read."""


def existing_run_files(out: Path) -> list[str]:
    names = [n for n in RUN_FILES if (out / n).exists()]
    return names + sorted(p.name for p in out.glob("config.*.yaml"))


def check_output(out: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse an unusable output folder before any work, leaving no trace (see :func:`prepare_output`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file, not a folder: choose a folder for the run")
    if out.is_dir():
        existing = existing_run_files(out)
        if existing and not resume and not overwrite:
            raise ConfigError(f"--output {out} already holds a run ({', '.join(existing[:5])}): continue it with "
                              "--resume auto, replace it with --overwrite, or choose another --output")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--output {out}: {probe} is a file, so the folder cannot be created")
    try:
        temp_file(probe / "write-test").unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to --output {out} ({e.strerror or e} in {probe}): is it read-only? "
                          "Choose a writable folder") from None
    return out


def prepare_output(out: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """The run folder ``out``, checked (:func:`check_output`), created, cleared of an earlier run's files
    when ``overwrite`` (and not resuming), and of temp files left by killed writers."""
    out = check_output(out, resume, overwrite)
    if out.is_dir() and overwrite and not resume:
        for name in existing_run_files(out):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --output {out} ({e.strerror or e})") from None
    clean_stale_temps(out)
    return out


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


def save_pair(state: dict, out: Path, is_best: bool, names: Iterable[str] = ("last.pth",)) -> Path:
    """Write ``best.pth`` (when this is the best epoch) and then ``names``; returns the last path."""
    path = None
    for name in (("best.pth",) if is_best else ()) + tuple(names):
        path = save(state, out / name)
    return path


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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).strip().splitlines()[0][:200]}; it is "
                              "probably truncated or corrupt (an older one may be in the same folder)") from None
    found = ckpt.get("task", "train" if "model_config" in ckpt else None) if isinstance(ckpt, dict) else None
    if found != task or "model" not in ckpt or "optimizer" not in ckpt:
        verb = {"train": "metaformer train", "detect": "metaformer detect train",
                "segment": "metaformer segment train"}
        what = f"a `{verb[found]}` checkpoint" if found in verb else "not a training checkpoint (weights alone " \
            "hold no optimizer or schedule state)"
        raise CheckpointError(f"{path} is {what}; --resume needs the last.pth or best.pth of `{verb[task]}`")
    return ckpt


def resume_path(resume: str | None, output: Path) -> Path | None:
    """``--resume``: a path, ``auto`` (``OUTPUT/last.pth`` when there is one), or nothing."""
    if resume == "auto":
        return output / "last.pth" if (output / "last.pth").is_file() else None
    return Path(resume) if resume else None

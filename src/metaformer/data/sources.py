"""``--data``: one argument, four kinds of source, recognised by what is on disk.

* ``builtin:NAME`` (``builtin`` / ``digits`` / nothing: the digits): a built-in set (:mod:`.builtin`);
* an ImageFolder root, ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``;
* tar shards: a directory with ``classes.json`` and ``train-*.tar`` / ``val-*.tar`` (``metaformer data
  pack`` writes one), or a brace/glob pattern of train shards whose directory holds ``classes.json`` and
  the val shards (``"DIR/train-{000000..000009}.tar"``);
* a Hugging Face ``datasets`` folder: ``save_to_disk`` output, or a folder ``load_dataset`` reads
  (parquet, imagefolder with ``train/`` and ``validation/``, ...), optionally ``DIR#image=COL,label=COL``.

Every kind gets the same checks before anything trains: class names known and the same in both splits,
no empty split, and unreadable samples returned as :class:`Unreadable` (skipped and listed by the loops).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from . import hfds, shards
from .builtin import builtin_name, describe, is_builtin, open_builtin
from .folders import SafeImageFolder, check_image_folder, find_eval_dir
from .images import DataError


@dataclass
class DataSource:
    train: Dataset  # map-style (len, __getitem__) or a ShardStream (IterableDataset)
    val: Dataset  # the same kinds
    class_names: list[str]
    description: str  # one line for the log


def _kind(data: str, evaluating: bool = False) -> str:
    """``builtin``, ``folder``, ``shards`` or ``hf``, from what is on disk (nothing is read yet)."""
    if is_builtin(data):
        return "builtin"
    if shards.is_pattern(data):
        return "shards"
    path, options = hfds.split_options(data)
    p = Path(path)
    if options or hfds.is_saved(p):
        return "hf"
    if not p.is_dir():
        return "folder"  # its check names the missing directory
    if shards.looks_like_shards(path):
        return "shards"
    if (p / "val").is_dir() or (evaluating and any(_has_images(d) for d in _subdirs(p))):
        return "folder"
    # An HF imagefolder names its split validation/; otherwise data files datasets reads.
    if (p / "validation").is_dir() or _has_data_files(p):
        return "hf"
    return "folder"  # its check says what an ImageFolder root lacks


def _subdirs(p: Path) -> list[Path]:
    return [Path(e.path) for e in os.scandir(p) if e.is_dir() and not e.name.startswith(".")]


def _has_images(d: Path) -> bool:
    return any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(d))


def _has_data_files(p: Path, depth: int = 3) -> bool:
    """Files ``datasets.load_dataset`` reads as tables, within ``depth`` levels."""
    for e in os.scandir(p):
        if e.is_file() and e.name.lower().endswith(hfds.TABLE_EXTENSIONS):
            return True
        if depth > 1 and e.is_dir() and not e.name.startswith(".") and _has_data_files(Path(e.path), depth - 1):
            return True
    return False


def _not_empty(ds, what: str):
    if len(ds) == 0:
        raise DataError(f"{what} has no samples; every split needs at least one")
    return ds


def open_source(data: str | None, train_transform, eval_transform, img_size: int = 32) -> DataSource:
    """Train and val data of any kind, checked; ``img_size`` is the size the built-in sets are drawn at.

    Raises :class:`DataError` (one line: the problem and the fix) for anything that is not a source.
    """
    kind = _kind(str(data or ""))
    if kind == "builtin":
        name = builtin_name(data)
        train, val = open_builtin(name, "train", img_size, train_transform), open_builtin(name, "val", img_size,
                                                                                           eval_transform)
        return DataSource(train, val, list(train.classes), describe(name, train, val))
    if kind == "folder":
        train_dir, val_dir, classes = check_image_folder(data)
        train = _not_empty(SafeImageFolder(train_dir, train_transform), str(train_dir))
        val = _not_empty(SafeImageFolder(val_dir, eval_transform, allow_empty=True), str(val_dir))
        return DataSource(train, val, classes, f"{data} ({len(train)} train / {len(val)} val images)")
    if kind == "hf":
        s = hfds.open_hf(data, train_transform, eval_transform)
        return DataSource(s.train, s.val, s.class_names, s.description)
    found = shards.open_shards(data)
    train_shards = found.selected or found.splits.get("train")
    val_shards = found.splits.get("val") or found.splits.get("validation")
    where = f"{found.root}"
    for split, part in (("train", train_shards), ("val", val_shards)):
        if part is None or part.num_samples == 0:
            count = "no shards" if part is None or not part.paths else f"{len(part.paths)} empty shard(s)"
            raise DataError(f"{where}: the {split} split has {count}; expected {split}-*.tar shards with samples "
                            f"(metaformer data pack ROOT {where})")
    n = len(found.classes)
    train = shards.ShardStream(train_shards, n, train_transform, shuffle=shards.SHUFFLE_BUFFER, name=f"{where} train")
    val = shards.ShardStream(val_shards, n, eval_transform, shuffle=0, name=f"{where} val")
    return DataSource(train, val, found.classes,
                      f"shards {data} ({train_shards.num_samples} train / {val_shards.num_samples} val samples in "
                      f"{len(train_shards.paths)} + {len(val_shards.paths)} shards)")


def open_eval_source(data: str | None, eval_transform, img_size: int = 32) -> tuple[Dataset, list[str]]:
    """The data ``metaformer eval --data`` scores: an ImageFolder root's ``val/`` or a folder of class
    folders, a shard directory's val shards (or the shards a pattern names), a Hugging Face folder's
    validation split (or its only split). Returns the dataset and its class names; the caller maps them
    onto the model's classes by name and sets ``dataset.target_transform``."""
    kind = _kind(str(data or ""), evaluating=True)
    if kind == "builtin":
        val = open_builtin(builtin_name(data), "val", img_size, eval_transform)
        return val, list(val.classes)
    if kind == "folder":
        folder = find_eval_dir(data)
        ds = _not_empty(SafeImageFolder(folder, eval_transform, allow_empty=True), str(folder))
        return ds, list(ds.classes)
    if kind == "hf":
        return hfds.open_hf_eval(data, eval_transform)
    found = shards.open_shards(data)
    part = found.selected or found.splits.get("val") or found.splits.get("validation")
    if part is None or part.num_samples == 0:
        raise DataError(f"{data}: no val shards with samples to evaluate (expected {found.root}/val-*.tar), or name "
                        f"the shards to evaluate with a pattern such as '{found.root}/val-*.tar'")
    return shards.ShardStream(part, len(found.classes), eval_transform, shuffle=0, name=f"{data}"), found.classes

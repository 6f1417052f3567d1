"""Hugging Face ``datasets`` as map-style image data: a ``save_to_disk`` folder (read memory-mapped, no
copy) or a local folder ``datasets.load_dataset`` reads (parquet, imagefolder, arrow, csv, ...; copied
into the ``datasets`` cache once).

The image column is the one with an ``Image`` feature and the label column the one with a ``ClassLabel``
(whose names become the class names); the splits are ``train`` and ``validation`` (or ``val``, ``valid``).
Where that is ambiguous, name them after a ``#``::

    --data DIR#image=img,label=fine_label,train=train,val=test
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import require
from .images import DataError, Unreadable, open_rgb

VAL_SPLITS = ("validation", "val", "valid")
OPTIONS = ("image", "label", "train", "val")
TABLE_EXTENSIONS = (".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl")  # data files load_dataset reads


def _datasets():
    return require("datasets", "data", "reading a Hugging Face dataset")


def split_options(data: str) -> tuple[str, dict[str, str]]:
    """``DIR#key=value,...`` -> ``(DIR, {key: value})``; a path that exists as written has no options."""
    if "#" not in data or os.path.exists(data):
        return data, {}
    path, _, spec = data.rpartition("#")
    options = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in OPTIONS or not value.strip():
            raise DataError(f"--data {data}: cannot read {item!r} after '#'; expected key=value pairs with keys "
                            f"{', '.join(OPTIONS)} (e.g. {path}#image=img,label=fine_label)")
        options[key.strip()] = value.strip()
    return path, options


def is_saved(path: str | os.PathLike) -> bool:
    """A folder written by ``save_to_disk`` (a DatasetDict, or a single Dataset)."""
    p = Path(path)
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def load_splits(path: str, what: str = "training"):
    """``save_to_disk`` output through ``load_from_disk``, anything else through ``load_dataset``: a
    ``DatasetDict``, or a ``Dataset`` for a saved single split."""
    datasets = _datasets()
    saved = is_saved(path)
    try:
        return datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, IndexError, its own errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DataError(f"{path}: datasets.{'load_from_disk' if saved else 'load_dataset'} cannot read it for "
                        f"{what} ({first}); --data takes an ImageFolder root (train/<class>/, val/<class>/), tar "
                        f"shards (classes.json, train-*.tar, val-*.tar) or a Hugging Face dataset folder") from None


def pick_split(splits, wanted: str | None, names: tuple[str, ...], path: str, role: str):
    if wanted is not None:
        names = (wanted,)
    for name in names:
        if name in splits:
            return name
    raise DataError(f"{path} has no {' or '.join(names)} split (it has {', '.join(splits) or 'none'}); "
                    f"name the {role} split with {path}#{role}=SPLIT")


def columns(ds, options: dict[str, str], where: str, path: str | None = None) -> tuple[str, str, list[str]]:
    """The image column, the label column and the class names of a ``datasets.Dataset``; ``where`` names it in
    messages, ``path`` is the folder --data names (what a ``#key=COLUMN`` suffix goes after)."""
    datasets = _datasets()
    features = ds.features

    def find(key, kind, what):
        if key in options:
            name = options[key]
            if name not in features:
                raise DataError(f"{where} has no column {name!r} (columns: {', '.join(features)})")
            if not isinstance(features[name], kind):
                hint = (" (cast it: ds.cast_column(NAME, datasets.ClassLabel(names=[...])))"
                        if kind is datasets.ClassLabel else "")
                raise DataError(f"{where}: column {name!r} is a {type(features[name]).__name__}, not {what}{hint}")
            return name
        found = [n for n, f in features.items() if isinstance(f, kind)]
        if len(found) == 1:
            return found[0]
        if found:
            raise DataError(f"{where} has {len(found)} {what} columns ({', '.join(found)}); choose one with "
                            f"--data {path or where}#{key}=COLUMN")
        hint = ("; the labels need class names: save the column as datasets.ClassLabel(names=[...])"
                if kind is datasets.ClassLabel else "")
        have = ", ".join(f"{n}: {type(f).__name__}" for n, f in features.items())
        raise DataError(f"{where} has no {what} column (columns: {have}){hint}")

    image = find("image", datasets.Image, "image")
    label = find("label", datasets.ClassLabel, "class-label")
    names = list(features[label].names)
    if not names:
        raise DataError(f"{where}: the ClassLabel column {label!r} names no classes")
    return image, label, names


class HFImageDataset(Dataset):
    """One split of a ``datasets.Dataset``: items are ``(image, label)``, or :class:`Unreadable` for a row
    whose image cannot be decoded or that has no label. Images are decoded here (in the DataLoader
    workers) from their bytes, with the same value-range rules as image files."""

    def __init__(self, ds, image: str, label: str, transform=None, name: str = "dataset"):
        datasets = _datasets()
        # Undecoded: decoding ourselves turns a bad image into an Unreadable instead of an exception.
        self.ds = ds.select_columns([image, label]).cast_column(image, datasets.Image(decode=False))
        self.image, self.label, self.transform, self.name = image, label, transform, name
        self.target_transform = None  # e.g. a model's class index per class index (eval by class name)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        row = self.ds[index]
        img, label = row[self.image], row[self.label]
        where = (img or {}).get("path") or f"{self.name}[{index}]"
        try:
            if label is None or label < 0:
                raise DataError(f"{where}: the row has no label")
            if img is None or not (img.get("bytes") or img.get("path")):
                raise DataError(f"{where}: the row has no image")
            pil = open_rgb(img["bytes"], where) if img.get("bytes") else open_rgb(img["path"])
        except DataError as e:
            return Unreadable(where, str(e))
        if self.target_transform is not None:
            label = self.target_transform(label)
        return (self.transform(pil) if self.transform else pil), label


@dataclass
class HFSource:
    """The two splits of a Hugging Face dataset folder, checked: same class names in both."""

    train: HFImageDataset
    val: HFImageDataset
    class_names: list[str]
    description: str


def open_hf(data: str, train_transform, eval_transform) -> HFSource:
    path, options = split_options(data)
    dd = load_splits(path)
    if not isinstance(dd, _datasets().DatasetDict):
        raise DataError(f"{path} holds a single split saved with save_to_disk; training needs train and validation "
                        f"splits: save a DatasetDict(train=..., validation=...) instead")
    names = {}
    for role, default in (("train", ("train",)), ("val", VAL_SPLITS)):
        names[role] = pick_split(dd, options.get(role), default, path, role)
    parts, classes = {}, {}
    for role, transform in (("train", train_transform), ("val", eval_transform)):
        split = dd[names[role]]
        where = f"{path} ({names[role]} split)"
        if len(split) == 0:
            raise DataError(f"{where} has no rows; both splits need samples")
        image, label, classes[role] = columns(split, options, where, path)
        parts[role] = HFImageDataset(split, image, label, transform, name=f"{path}:{names[role]}")
    if classes["train"] != classes["val"]:
        raise DataError(f"{path}: the {names['train']} and {names['val']} splits have different class names "
                        f"({len(classes['train'])} vs {len(classes['val'])}); the labels would not line up")
    t = parts["train"]
    return HFSource(parts["train"], parts["val"], classes["train"],
                    f"Hugging Face dataset {path} ({len(t)} train / {len(parts['val'])} val rows; image column "
                    f"{t.image!r}, labels {t.label!r})")


def open_hf_eval(data: str, eval_transform) -> tuple[HFImageDataset, list[str]]:
    """The validation split (or the only split of a saved single ``Dataset``) for evaluation."""
    path, options = split_options(data)
    dd = load_splits(path, "evaluation")
    if isinstance(dd, _datasets().DatasetDict):
        if "val" not in options and len(dd) == 1:
            name = next(iter(dd))
        else:
            name = pick_split(dd, options.get("val"), VAL_SPLITS, path, "val")
        split, where = dd[name], f"{path} ({name} split)"
    else:
        name, split, where = "data", dd, path
    if len(split) == 0:
        raise DataError(f"{where} has no rows to evaluate")
    image, label, classes = columns(split, options, where, path)
    return HFImageDataset(split, image, label, eval_transform, name=f"{path}:{name}"), classes

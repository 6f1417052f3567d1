"""Data for training and evaluation: folders, the built-in digits, transforms and loaders.

Two sources:

* an ImageNet-layout folder ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``, checked
  before anything trains (a ``val/`` without class folders silently gives ~0% accuracy);
* the built-in digits: scikit-learn's 1,797 real 8x8 handwritten-digit scans (no download),
  upsampled bicubically to a small RGB size. The split is fixed: stratified, 20% val,
  ``random_state=0`` -> 1,437 train / 360 val images.

Unreadable images never crash a worker: a dataset returns an :class:`Unreadable` sentinel,
:func:`collate_skip_unreadable` takes it out of the batch, and the training loop decides
(skip and list, or stop under ``--strict-data``). Deciding in the main process keeps the
error message clean whatever the number of DataLoader workers.
"""
from __future__ import annotations

import itertools
import os
import random
import signal
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import MetaFormerError

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class Unreadable(NamedTuple):
    path: str
    error: str


class DataError(MetaFormerError):
    """A data problem the user must fix (layout, class sets, an unreadable file under --strict-data)."""


# ----- ImageNet-layout folders -----

def _class_dirs(d: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _images_in(d: Path) -> list[str]:
    return [e.name for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]


def check_image_folder(root: str | os.PathLike) -> tuple[Path, Path, list[str]]:
    """Validate ``root/train`` and ``root/val`` and return them with the class names.

    Raises :class:`DataError` naming the problem and the fix, before any training starts.
    """
    root = Path(root)
    layout = f"expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist ({layout})")
    train, val = root / "train", root / "val"
    for d in (train, val):
        if not d.is_dir():
            raise DataError(f"{root} has no {d.name}/ folder; {layout}")
    train_classes = _class_dirs(train)
    if not train_classes:
        raise DataError(f"{train} has no class sub-folders; {layout}")
    val_classes = _class_dirs(val)
    if not val_classes:
        flat = _images_in(val)
        what = f"{len(flat)} images (e.g. {sorted(flat)[0]}) but " if flat else ""
        raise DataError(f"{val} has {what}no class sub-folders, so its labels are unknown and accuracy would be ~0%. "
                        f"Move each image into val/<class>/ with the same class names as train/ "
                        f"(for ImageNet: the official valprep.sh script)")
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))

        def show(names):
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "") or "none"
        raise DataError(f"train/ and val/ have different classes ({len(train_classes)} vs {len(val_classes)}); "
                        f"only in train: {show(only_t)}; only in val: {show(only_v)}. "
                        f"Both must have the same class folders, or labels would not line up")
    return train, val, train_classes


def find_eval_dir(data: str | os.PathLike) -> Path:
    """An ImageNet-style root (use its ``val/``) or a directory of class folders."""
    d = Path(data)
    if not d.is_dir():
        raise DataError(f"data directory {d} does not exist")
    if (d / "val").is_dir():
        d = d / "val"
    if not _class_dirs(d):
        flat = _images_in(d)
        what = f"{len(flat)} images but " if flat else ""
        raise DataError(f"{d} has {what}no class sub-folders; expected {d}/<class>/*.jpg (or a root with val/<class>/)")
    return d


# ----- decoding -----

def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """8-bit RGB, scaled by the image's real value range.

    ``Image.convert('RGB')`` clips instead of scaling: a 16-bit PNG (0..65535) comes out
    saturated white and a float TIFF in [0, 1] black. 16-bit images are divided by 257; float
    images in [0, 1] are multiplied by 255 and those in [0, 255] kept; any other range has no
    known meaning and is refused rather than guessed.
    """
    mode = img.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return img.convert("RGB")
    a = np.asarray(img, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{name}: a float image holding NaN or inf values; fix or remove it")
    if mode.startswith("I;16") or (mode == "I" and 0 <= lo and 255 < hi <= 65535):
        a = a / 257.0  # 16-bit range onto 8 bits
    elif mode == "F" and 0 <= lo and hi <= 1:
        a = a * 255.0
    elif not (0 <= lo and hi <= 255):
        kind = "float" if mode == "F" else "32-bit integer"
        raise DataError(f"{name}: a {kind} image with values in [{lo:g}, {hi:g}], which is neither an 8-bit, a "
                        f"16-bit nor a [0, 1] range; convert it to an 8-bit image")
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully into 8-bit RGB (:func:`to_rgb`); :class:`DataError` names the problem."""
    try:
        with Image.open(path) as img:
            img.load()  # the full decode, inside the try
            return to_rgb(img, str(path))
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not an image") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused as a possible decompression bomb ({e}); if you trust the file, raise "
                        "PIL.Image.MAX_IMAGE_PIXELS or resize it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # UnidentifiedImageError is an OSError
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


class SafeImageFolder(ImageFolder):
    """``ImageFolder`` that returns :class:`Unreadable` for a file it cannot decode, decodes by the real
    value range (:func:`to_rgb`), and does not follow directory links back into its own tree."""

    def __init__(self, root, transform=None, allow_empty: bool = False):
        self.skipped_links: list[tuple[str, str]] = []
        super().__init__(str(root), transform=transform, allow_empty=allow_empty)
        if self.skipped_links:
            shown = ", ".join(f"{a} -> {b}" for a, b in self.skipped_links[:3])
            more = f" (+{len(self.skipped_links) - 3} more)" if len(self.skipped_links) > 3 else ""
            warnings.warn(f"{root}: skipped {len(self.skipped_links)} directory link(s) that lead back into the "
                          f"folder and would list its images again, under another class or forever: {shown}{more}",
                          stacklevel=2)

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        # torchvision walks with followlinks=True: a link to an ancestor repeats the tree until the path is too
        # long (33 images became 1,353, mislabelled). Links to folders outside the tree are still followed.
        tree = os.path.realpath(directory)
        samples = []
        for cls in sorted(class_to_idx):
            found, visited, stack = [], set(), [os.path.join(directory, cls)]
            while stack:
                d = stack.pop()
                visited.add(os.path.realpath(d))
                for e in os.scandir(d):
                    if e.is_dir():
                        target = os.path.realpath(e.path)
                        if e.is_symlink() and (target == tree or target.startswith(tree + os.sep) or target in visited):
                            self.skipped_links.append((e.path, target))
                        else:
                            stack.append(e.path)
                    elif e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS):
                        found.append((d, e.name))
            samples += [(os.path.join(d, f), class_to_idx[cls]) for d, f in sorted(found)]
        empty = sorted(set(class_to_idx) - {self._class_of(p, directory) for p, _ in samples})
        if empty and not allow_empty:
            raise DataError(f"{directory}: no images in class folder(s) {', '.join(empty[:5])}"
                            f"{' ...' if len(empty) > 5 else ''} (extensions: {', '.join(IMG_EXTENSIONS)})")
        return samples

    @staticmethod
    def _class_of(path: str, directory) -> str:
        return os.path.relpath(path, directory).split(os.sep, 1)[0]

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = open_rgb(path)
        except DataError as e:
            return Unreadable(path, str(e))
        if self.target_transform is not None:
            target = self.target_transform(target)
        return (self.transform(img) if self.transform else img), target


# ----- the built-in digits -----

class Digits(Dataset):
    """scikit-learn's handwritten digits as RGB images of ``img_size`` (white ink on black)."""

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str, img_size: int = 32, transform=None):
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', not {split!r}")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        idx_train, idx_val = train_test_split(np.arange(len(digits.target)), test_size=DIGITS_VAL_FRACTION,
                                              stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
        idx = idx_train if split == "train" else idx_val
        # 0..16 ink levels -> 0..255, then upsample once so the transforms see an ordinary image.
        pixels = (digits.images[idx] * (255 / 16)).round().astype(np.uint8)
        self.images = [Image.fromarray(p, "L").resize((img_size, img_size), Image.BICUBIC).convert("RGB")
                       for p in pixels]
        self.targets = digits.target[idx].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self.images[index]
        return (self.transform(img) if self.transform else img), self.targets[index]


def is_builtin(data: str | None) -> bool:
    return data is None or str(data).lower() in ("", "builtin", "digits")


# ----- transforms -----

def _posterize(img, bits_to_keep, **kwargs):
    # Keeping 0 bits (a black image) is what timm's RandAugment asks for at magnitude 10
    # ("inc1" with m9 +- noise reaches it); Pillow >= 12 rejects bits=0 and the run would crash.
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    global _timm_posterize
    if auto_augment.NAME_TO_OP["PosterizeIncreasing"] is not _posterize:
        _timm_posterize = auto_augment.posterize
        for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
            auto_augment.NAME_TO_OP[name] = _posterize


def train_transform(cfg, info):
    """The recipe's augmentation, built by timm (RandAugment, random erasing, random-resized crop)."""
    from timm.data import create_transform

    _patch_timm_posterize()
    return create_transform(
        input_size=cfg.img_size, is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, auto_augment=None if cfg.aa in (None, "", "none") else cfg.aa, interpolation=cfg.train_interpolation,
        re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount, mean=info.mean, std=info.std)


def eval_transform(info, img_size: int):
    """The variant's own eval preprocessing (resize floor(size / crop_pct), bicubic, centre crop)."""
    return info.transforms(img_size)


# ----- samplers and loaders -----

class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (per-epoch shuffle, disjoint shards) that can start mid-epoch.

    ``set_epoch(epoch, start)`` skips the first ``start`` samples of this rank's shard, so a run
    interrupted mid-epoch continues with exactly the samples it had not seen yet.
    """

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(itertools.islice(super().__iter__(), self.start, None))
        log_dir = os.environ.get("METAFORMER_SAMPLE_LOG")  # audit aid: which samples each rank was given
        if log_dir:
            with open(Path(log_dir) / f"rank{self.rank}.txt", "a") as f:
                f.write(f"{self.epoch} " + " ".join(map(str, indices)) + "\n")
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


def collate_skip_unreadable(batch):
    """Default collate over the readable samples; returns ``(images, targets, unreadable)``."""
    good = [b for b in batch if not isinstance(b, Unreadable)]
    bad = [b for b in batch if isinstance(b, Unreadable)]
    if good:
        x, y = default_collate(good)
    else:
        x, y = torch.empty(0), torch.empty(0, dtype=torch.long)
    return x, y, bad


def _worker_init(worker_id: int) -> None:
    # Ctrl-C is handled by the main process (it checkpoints); workers must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, sampler, workers: int, drop_last: bool = False,
                generator: torch.Generator | None = None, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_skip_unreadable, worker_init_fn=_worker_init if workers else None,
                      generator=generator, pin_memory=pin_memory, persistent_workers=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class UnreadableLog:
    """Collects unreadable files per epoch; under ``strict`` the first one is an error naming it.

    Skipping is for the odd broken file. When the first :attr:`ALL_BAD_LIMIT` samples read are all
    unreadable, the data is in the wrong form (RGB label PNGs, another format): that is an error
    naming the first file, not a run that trains on nothing.
    """

    ALL_BAD_LIMIT = 10

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.epoch: list[Unreadable] = []
        self.readable = self.unreadable = 0

    def add(self, bad: list[Unreadable], readable: int = 0) -> None:
        if bad and self.strict:
            raise DataError(f"unreadable image {bad[0].path} ({bad[0].error}); remove or replace it, "
                            f"or drop --strict-data to skip unreadable files")
        self.epoch.extend(bad)
        self.readable += readable
        self.unreadable += len(bad)
        if bad and self.readable == 0 and self.unreadable >= self.ALL_BAD_LIMIT:
            self._all_bad(bad[0])

    def _all_bad(self, first: Unreadable) -> None:
        raise DataError(f"the first {self.unreadable} images read were all unreadable, so the data is not in the "
                        f"expected form; the first: {first.error}")

    def end_epoch(self) -> list[Unreadable]:
        """This epoch's unreadable files (from every rank when distributed), and start afresh."""
        if self.epoch and self.readable == 0:
            self._all_bad(self.epoch[0])
        bad, self.epoch = self.epoch, []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, bad)
            bad = [b for part in gathered for b in part]
        return sorted(set(bad))

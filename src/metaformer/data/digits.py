"""The built-in digits: scikit-learn's 1,797 real 8x8 handwritten-digit scans (no download),
upsampled bicubically to a small RGB size. The split is fixed: stratified, 20% val,
``random_state=0`` -> 1,437 train / 360 val images."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import require
from .images import DataError

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digit_scans(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed split's raw scans (``[N, 8, 8]``, ink 0..16) and their labels."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', not {split!r}")
    load_digits = require("sklearn.datasets", "train", "the built-in digits").load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_val = train_test_split(np.arange(len(digits.target)), test_size=DIGITS_VAL_FRACTION,
                                          stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    idx = idx_train if split == "train" else idx_val
    return digits.images[idx], digits.target[idx]


class Digits(Dataset):
    """scikit-learn's handwritten digits as RGB images of ``img_size`` (white ink on black)."""

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str, img_size: int = 32, transform=None):
        scans, labels = digit_scans(split)
        # 0..16 ink levels -> 0..255, then upsample once so the transforms see an ordinary image.
        pixels = (scans * (255 / 16)).round().astype(np.uint8)
        self.images = [Image.fromarray(p, "L").resize((img_size, img_size), Image.BICUBIC).convert("RGB")
                       for p in pixels]
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self.images[index]
        return (self.transform(img) if self.transform else img), self.targets[index]


def export_digits(root: str | os.PathLike, img_size: int = 32) -> dict[str, int]:
    """Write the built-in digits as an ImageFolder root, ``ROOT/train/<digit>/NNNN.png`` and
    ``ROOT/val/<digit>/NNNN.png`` (the fixed split, at ``img_size``): the layout ``--data`` reads, and
    ``metaformer data pack`` turns into shards. ``root`` must be new or empty. Returns the images per split."""
    from ..atomic import check_writable

    root = check_writable(root, f"DIR {root}", folder=True)
    if root.is_dir() and any(root.iterdir()):
        raise DataError(f"{root} is not empty: write the digits into a new or empty folder")
    counts = {}
    for split in ("train", "val"):
        ds = Digits(split, img_size)
        for i, (img, target) in enumerate(zip(ds.images, ds.targets)):
            folder = Path(root) / split / str(target)
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:04d}.png")
        counts[split] = len(ds)
    return counts

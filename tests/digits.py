"""The built-in digits written as class folders (ROOT/SPLIT/<digit>/NNNN.png): the layout users bring."""
from pathlib import Path

from metaformer import data as D


def write_digits(root: Path, splits=("train", "val"), limit: int | None = None) -> Path:
    for split in splits:
        ds = D.Digits(split, 32)
        for i, (img, target) in enumerate(zip(ds.images[:limit], ds.targets[:limit])):
            folder = root / split / str(target)
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:04d}.png")
    return root

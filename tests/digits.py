"""The built-in digits written as class folders (ROOT/SPLIT/<digit>/NNNN.png): the layout users bring."""
from pathlib import Path

from metaformer import data as D


def write_digits(root: Path, splits=("train", "val"), limit: int | None = None, classes: tuple | None = None,
                 per_class: int | None = None) -> Path:
    """The first ``limit`` images of each split; or, with ``classes``/``per_class``, only those digits and at most
    that many of each (a tiny dataset for the tests that run a verb many times)."""
    for split in splits:
        ds = D.Digits(split, 32)
        counts: dict = {}
        for i, (img, target) in enumerate(zip(ds.images[:limit], ds.targets[:limit])):
            if (classes is not None and str(target) not in classes) or counts.get(target, 0) == per_class:
                continue
            counts[target] = counts.get(target, 0) + 1
            folder = root / split / str(target)
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:04d}.png")
    return root

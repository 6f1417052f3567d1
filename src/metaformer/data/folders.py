"""ImageNet-layout folders (``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``), checked before anything
trains: a ``val/`` without class folders silently gives ~0% accuracy, and differing class sets
misalign labels."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .images import DataError, Unreadable, open_rgb


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

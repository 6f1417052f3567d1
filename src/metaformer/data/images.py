"""Decoding images: every file becomes 8-bit RGB by its real value range, or a clear error."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from ..errors import MetaFormerError


class Unreadable(NamedTuple):
    """A sample that could not be read: the loops skip and list it instead of crashing."""

    path: str
    error: str


class Padding(NamedTuple):
    """A filler item, not a sample: a shard stream pads its short workers with it so every rank runs the same
    number of batches (DDP would hang otherwise). The collate drops it silently."""

    reader: int  # the global reader (DataLoader worker id * world size + rank) that padded


class DataError(MetaFormerError):
    """A data problem the user must fix (layout, class sets, an unreadable file under --strict-data)."""


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


def upright_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """A decoded image turned as its EXIF orientation says (a phone's portrait photo is stored sideways, with
    a tag saying so), then 8-bit RGB (:func:`to_rgb`). Every reader goes through here: training,
    evaluation, prediction, Grad-CAM, shards."""
    img.load()  # the full decode, inside the caller's try
    return to_rgb(ImageOps.exif_transpose(img), name)


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully into upright 8-bit RGB (:func:`upright_rgb`); :class:`DataError` names the
    problem."""
    try:
        with Image.open(path) as img:
            return upright_rgb(img, str(path))
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


def list_images(paths) -> list[Path]:
    """Image files from files and folders, in the given order (a folder: its images, sorted by name)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and q.name.lower().endswith(IMG_EXTENSIONS)))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p} does not exist")
    if not out:
        raise DataError(f"no images found in {', '.join(map(str, paths))} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return out

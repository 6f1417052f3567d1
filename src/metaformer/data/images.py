"""Decoding images: every file becomes 8-bit RGB by its real value range, or a clear error."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
    a tag saying so; a PNG may carry the same tag in an eXIf chunk), then 8-bit RGB (:func:`to_rgb`)."""
    img.load()  # the full decode, inside the caller's try; a PNG's eXIf chunk may follow its pixels
    # in place: a copy here and another in to_rgb would hold three full-size images at once (a server decoding
    # 40 MP uploads side by side feels each one)
    ImageOps.exif_transpose(img, in_place=True)
    return to_rgb(img, name)


# What a server decodes from a client's bytes. Without a list Pillow tries every plugin it has on the bytes it
# is given, so an upload reaches decoders nobody deploying a classifier expects to run on a stranger's input: an
# EPS body is rendered by Ghostscript (a PostScript interpreter), and FITS, PSD, SGI, ... parsers run too. These
# are the formats cameras, phones (their JPEGs open as JPEG/MPO) and browsers produce, plus TIFF for the 16-bit
# and float images :func:`to_rgb` scales.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class TooManyPixels(DataError):
    """An image whose header declares more pixels than the caller allows (a decompression bomb): refused before
    any pixel is decoded."""


class FormatRefused(DataError):
    """An image in a format the caller does not decode (see :data:`UPLOAD_FORMATS`)."""


def _identify(prefix: bytes, formats) -> str | None:
    """The format whose signature ``prefix`` starts with, from Pillow's registry, without running its parser
    (each plugin's ``accept`` only compares the first bytes); None if no plugin claims it."""
    Image.init()
    ordered = [f for f in formats if f in Image.ID] + [f for f in Image.ID if f not in formats]
    for fmt in ordered:
        accept = Image.OPEN[fmt][1]
        claim = accept(prefix) if accept is not None else False
        if claim and not isinstance(claim, str):  # a str is a plugin's "mine, but unsupported" warning
            return fmt
    return None


def open_rgb(source: str | os.PathLike | bytes, name: str | None = None, *, max_pixels: int | None = None,
             formats: tuple[str, ...] | None = None) -> Image.Image:
    """Decode an image fully into upright 8-bit RGB (:func:`upright_rgb`). Every reader goes through here:
    training, evaluation, prediction, Grad-CAM, shards and the server.

    ``source`` is a file's path or its encoded bytes (``name`` is then what messages call it). ``max_pixels``:
    refuse (:class:`TooManyPixels`) an image whose declared width x height is larger, checked before decoding;
    without it Pillow's own decompression-bomb limit applies. ``formats``: the only Pillow formats tried
    (:data:`UPLOAD_FORMATS` for bytes from an untrusted client); an image in another format is refused
    (:class:`FormatRefused`) without running its decoder. Anything else unreadable is a :class:`DataError` that
    names the problem.
    """
    encoded = isinstance(source, (bytes, bytearray, memoryview))
    name = name or ("image" if encoded else str(source))
    if encoded and not len(source):
        raise DataError(f"{name}: empty, no image in it")
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # the caller's limit decides, not Pillow's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if encoded else source,
                            formats=list(formats) if formats is not None else None) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise TooManyPixels(f"{name}: {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                                        "(a possible decompression bomb)")
                return upright_rgb(img, name)
    except FileNotFoundError:
        raise DataError(f"image {name} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{name} is a directory, not an image") from None
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"{name}: refused as a possible decompression bomb ({e}); if you trust the file, "
                            "raise PIL.Image.MAX_IMAGE_PIXELS or resize it") from None
    except UnidentifiedImageError:
        if formats is None:
            raise DataError(f"cannot read image {name}: no image format Pillow reads") from None
        if encoded:
            prefix = bytes(source[:16])
        else:
            with open(source, "rb") as f:
                prefix = f.read(16)
        found, accepted = _identify(prefix, formats), ", ".join(formats)
        if found is None:
            raise DataError(f"{name} is not an image in an accepted format ({accepted})") from None
        if found in formats:
            raise DataError(f"cannot read image {name}: a broken or truncated {found} file") from None
        raise FormatRefused(f"{name}: {found} (by its first bytes) is not an accepted image format; send "
                            f"{accepted}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read image {name}: {type(e).__name__}: {str(e)[:200]}") from None


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

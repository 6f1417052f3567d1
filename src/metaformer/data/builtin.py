"""The built-in data sets (``--data builtin:NAME``): made on the fly from scikit-learn's 1,797 real
handwritten-digit scans, no download, the same images on every machine.

* ``builtin:digits`` (also ``builtin``, ``digits`` or no ``--data``): one digit per image, 10 classes
  (:class:`~metaformer.data.digits.Digits`). Recognising one centred digit needs little beyond the
  stem and the downsampling convolutions: every token mixer scores about the same on it.
* ``builtin:odd-one-out``: four handwritten digits, one per quadrant of a 32x32 image: three copies of
  one scan and a scan of another digit, each shifted by up to a pixel, under Gaussian pixel noise; the
  label is the quadrant of the odd one (4 classes: top-left, top-right, bottom-left, bottom-right). No
  single quadrant says anything about the label: it is a relation between all four, each compared with
  the other three across the whole image. A token must learn what the distant quadrants hold, which is
  exactly what a token mixer provides; a network whose blocks cannot mix tokens has to do it with its
  downsampling convolutions alone, at its last stages. (Same/different judgements of this kind are known
  to be hard for convolutional networks: Fleuret et al., "Comparing machines and humans on a visual
  categorization test", PNAS 2011; Kim, Ricci and Serre, "Not-So-CLEVR", 2018.)

The odd-one-out images are made by a fixed random generator, so every run sees the same set: its
train images use only the digits' train scans and its val images only their val scans (the digits'
fixed stratified split), so val measures new handwriting, not memorised scans.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import require
from .images import DataError

DIGITS = "digits"
ODD_ONE_OUT = "odd-one-out"
NAMES = (DIGITS, ODD_ONE_OUT)
PREFIX = "builtin:"


def builtin_name(data) -> str | None:
    """The built-in set ``--data`` names (``None``, ``''``, ``builtin``, ``digits``: the digits;
    ``builtin:NAME``: NAME), or None for any other source. An unknown NAME is a :class:`DataError`."""
    text = "" if data is None else str(data).strip()
    low = text.lower()
    if low in ("", "builtin", DIGITS):
        return DIGITS
    if not low.startswith(PREFIX):
        return None
    name = low[len(PREFIX):] or DIGITS
    if name not in NAMES:
        raise DataError(f"--data {text}: no built-in data set {name!r}; built-in: "
                        + ", ".join(PREFIX + n for n in NAMES))
    return name


def is_builtin(data) -> bool:
    return builtin_name(data) is not None


class OddOneOut(Dataset):
    """Four handwritten digits in the quadrants of a canvas, three alike; the label is where the odd one is."""

    classes = ["top-left", "top-right", "bottom-left", "bottom-right"]
    CANVAS = 32  # pixels; each 16x16 quadrant holds one 8x8 scan upsampled to DIGIT_SIZE
    DIGIT_SIZE = 15  # so a digit sits at one of 2 x 2 places in its quadrant: copies are not pixel-identical
    NOISE = 40  # the pixel noise's standard deviation (of 255): neither are two images' backgrounds
    SIZES = {"train": 9_000, "val": 2_000}
    SEEDS = {"train": 1, "val": 2}  # the generator's, fixed: the data set is part of the benchmark

    def __init__(self, split: str, img_size: int = 32, transform=None):
        if split not in self.SIZES:
            raise DataError(f"split must be 'train' or 'val', not {split!r}")
        self.images, self.targets = _odd_one_out(split, img_size)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index], "L").convert("RGB")
        return (self.transform(img) if self.transform else img), self.targets[index]


@functools.lru_cache(maxsize=4)  # a grid trains many rows in one process: make the set once
def _odd_one_out(split: str, img_size: int) -> tuple[np.ndarray, list[int]]:
    from .digits import digit_scans

    scans, labels = digit_scans(split)
    cell, z = OddOneOut.CANVAS // 2, OddOneOut.DIGIT_SIZE
    # 0..16 ink levels -> 0..255, each scan upsampled once (bicubic, as the built-in digits)
    tiles = np.stack([np.asarray(Image.fromarray((s * (255 / 16)).round().astype(np.uint8), "L")
                                 .resize((z, z), Image.BICUBIC)) for s in scans])
    by_class = [np.flatnonzero(labels == k) for k in range(10)]
    rng = np.random.default_rng(OddOneOut.SEEDS[split])
    n = OddOneOut.SIZES[split]
    odd = rng.integers(0, 4, n)
    common = rng.integers(0, 10, n)
    other = (common + rng.integers(1, 10, n)) % 10  # any digit but the common one
    canvas = np.zeros((n, OddOneOut.CANVAS, OddOneOut.CANVAS))
    for i in range(n):
        picks = [rng.choice(by_class[common[i]])] * 3  # three copies of one scan ...
        picks.insert(odd[i], rng.choice(by_class[other[i]]))  # ... and the odd one
        for q, t in enumerate(picks):
            y0, x0 = rng.integers(0, cell - z + 1, 2)
            y, x = divmod(q, 2)
            canvas[i, y * cell + y0:y * cell + y0 + z, x * cell + x0:x * cell + x0 + z] = tiles[t]
    canvas = np.clip(canvas + rng.normal(0, OddOneOut.NOISE, canvas.shape), 0, 255).round().astype(np.uint8)
    if img_size != OddOneOut.CANVAS:
        canvas = np.stack([np.asarray(Image.fromarray(c, "L").resize((img_size, img_size), Image.BICUBIC))
                           for c in canvas])
    canvas.setflags(write=False)
    return canvas, odd.tolist()


def eval_crop(data) -> float | None:
    """The centre crop a built-in set is evaluated with, whatever the weights' ``crop_pct`` (None: the weights').

    The odd-one-out images are drawn at the input size, each digit in its own quadrant: a centre crop of 0.9
    would zoom the val images by 1/0.9 while training sees them whole, and a network that learnt where the
    quadrants are would find every digit moved (top-1 falls by about 20 points). So they are evaluated
    uncropped, for every row alike (PoolFormer v1's weights use 0.9, the Baselines' 1.0)."""
    return 1.0 if builtin_name(data) == ODD_ONE_OUT else None


def open_builtin(name: str, split: str, img_size: int, transform=None) -> Dataset:
    from .digits import Digits

    require("sklearn.datasets", "train", f"the built-in {name}")
    return (Digits if name == DIGITS else OddOneOut)(split, img_size, transform)


def describe(name: str, train: Dataset, val: Dataset) -> str:
    what = "sklearn digits" if name == DIGITS else "four sklearn digits per image, where is the odd one"
    return f"builtin:{name} ({what}, {len(train)} train / {len(val)} val)"

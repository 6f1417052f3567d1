"""Data for dense prediction: COCO-format detection, ADE20K-layout segmentation, toy shapes.

- :func:`load_coco` reads and checks an instances json against its images folder up front,
  so a bad file fails in a second with a message naming the problem, not hours into training.
- :class:`CocoDetection` yields ``(image [3,H,W] in [0,1], target)`` in torchvision's detection
  format (boxes xyxy, contiguous labels from 1, optional masks).
- :class:`SegmentationDataset` reads the ADE20K layout (``images/{split}/*.jpg`` with
  ``annotations/{split}/*.png`` index PNGs) with mmseg's ADE20K pipeline.
- :func:`make_toy_data` writes a tiny dataset of coloured shapes in BOTH layouts (one
  folder), for the tests, the docs and a first run.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ...data import Unreadable, open_rgb
from ...errors import MetaFormerError, require

IGNORE_INDEX = 255
BOX_TOLERANCE = 1.0  # px: COCO's float boxes may overshoot the border by rounding


class AnnotationError(MetaFormerError):
    """An annotation file or dataset folder that cannot be used as it is."""


# --------------------------------------------------------------------------------------
# COCO-format detection
# --------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise AnnotationError(f"annotation file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise AnnotationError(f"{path} is not a UTF-8 text file: is it really a COCO instances json?") from None


def _need(obj: dict, key: str, where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise AnnotationError(f"{path}: {where} has no {key!r} field (a COCO instances file needs it)")
    return obj[key]


def load_coco(ann_file: str | os.PathLike, images_dir: str | os.PathLike) -> dict:
    """Read a COCO instances json and check it against ``images_dir``.

    Checks: valid JSON; ``images``/``annotations``/``categories`` lists; unique ids; every
    image file present; every annotation on a known image, with a known ``category_id`` and a
    4-number bbox inside the image (``BOX_TOLERANCE`` px slack). Fills the fields COCOeval
    needs when absent (``iscrowd`` 0, ``area`` = box area). Raises :class:`AnnotationError`.
    """
    path, images_dir = Path(ann_file), Path(images_dir)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with images/annotations/categories, "
                              f"got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(_need(data, key, "the file", path), list):
            raise AnnotationError(f"{path}: {key!r} must be a list")
    if not images_dir.is_dir():
        raise AnnotationError(f"images folder {images_dir} not found")

    cat_ids = set()
    for c in data["categories"]:
        cid = _need(c, "id", "a category", path)
        _need(c, "name", f"category {cid}", path)
        if cid in cat_ids:
            raise AnnotationError(f"{path}: category id {cid} appears twice in 'categories'")
        cat_ids.add(cid)
    if not cat_ids:
        raise AnnotationError(f"{path}: 'categories' is empty")

    images = {}
    missing = []
    for im in data["images"]:
        iid = _need(im, "id", "an image", path)
        for key in ("file_name", "width", "height"):
            _need(im, key, f"image {iid}", path)
        if iid in images:
            raise AnnotationError(f"{path}: image id {iid} appears twice in 'images'")
        images[iid] = im
        if not (images_dir / im["file_name"]).is_file():
            missing.append(im["file_name"])
    if missing:
        raise AnnotationError(f"{len(missing)} of {len(images)} image files listed in {path} are missing from "
                              f"{images_dir} (first: {missing[0]!r}); is the images folder the right one?")

    ann_ids = set()
    for a in data["annotations"]:
        aid = _need(a, "id", "an annotation", path)
        if aid in ann_ids:
            raise AnnotationError(f"{path}: annotation id {aid} appears twice")
        ann_ids.add(aid)
        iid = _need(a, "image_id", f"annotation {aid}", path)
        if iid not in images:
            raise AnnotationError(f"{path}: annotation {aid} refers to image id {iid}, which is not in 'images'")
        cid = _need(a, "category_id", f"annotation {aid}", path)
        if cid not in cat_ids:
            raise AnnotationError(f"{path}: annotation {aid} has category_id {cid}, which is not in 'categories' "
                                  f"(known ids: {sorted(cat_ids)[:20]})")
        box = _need(a, "bbox", f"annotation {aid}", path)
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise AnnotationError(f"{path}: annotation {aid} has bbox {box!r}; expected [x, y, width, height] of "
                                  "finite numbers")
        x, y, w, h = box
        im = images[iid]
        if (w < 0 or h < 0 or x < -BOX_TOLERANCE or y < -BOX_TOLERANCE
                or x + w > im["width"] + BOX_TOLERANCE or y + h > im["height"] + BOX_TOLERANCE):
            raise AnnotationError(f"{path}: annotation {aid} has bbox {box} ([x, y, width, height]), outside its "
                                  f"image {im['file_name']!r} of {im['width']}x{im['height']}")
        if "segmentation" in a:
            _check_segmentation(a["segmentation"], aid, im, path)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(w * h))
    return data


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_segmentation(segm: Any, aid: Any, im: dict, path: Path) -> None:
    """COCO's two mask forms, checked here so a bad one is named instead of failing inside pycocotools."""
    where = f"{path}: annotation {aid} (image {im['file_name']!r})"
    if isinstance(segm, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
        for poly in segm:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
                    and all(_is_number(v) for v in poly)):
                shown = repr(poly)[:60]
                raise AnnotationError(f"{where} has a bad polygon {shown}: a polygon is a flat list of at least 3 "
                                      "(x, y) points of finite numbers")
    elif isinstance(segm, dict):  # RLE: {"size": [h, w], "counts": ...}
        size = segm.get("size")
        if not (isinstance(size, list) and len(size) == 2 and isinstance(segm.get("counts"), (str, list))):
            raise AnnotationError(f"{where} has an RLE mask without 'size' [height, width] and 'counts'")
        if list(size) != [im["height"], im["width"]]:
            raise AnnotationError(f"{where} has an RLE mask of size {size}, but the image is "
                                  f"{im['height']}x{im['width']} (height x width)")
    else:
        raise AnnotationError(f"{where}: 'segmentation' must be a list of polygons or an RLE dict, got "
                              f"{type(segm).__name__}")


def _decode_mask(segm: Any, h: int, w: int) -> np.ndarray:
    mask_utils = require("pycocotools.mask", "dense", "decoding COCO masks")

    if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle)


class CocoDetection(Dataset):
    """COCO-format detection data as torchvision's detectors take it.

    Category ids map to contiguous labels ``1..K`` in the order of ``categories`` (0 is the
    background). Crowd regions and boxes under 1 px are left out of the training targets
    (COCOeval still sees them); with ``train=True`` images without any box are skipped (as
    mmdet does) and images are flipped horizontally with probability 0.5.
    """

    def __init__(self, images_dir: str | os.PathLike, ann_file: str | os.PathLike, train: bool = False,
                 masks: bool = False):
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.coco = load_coco(ann_file, images_dir)
        self.train = train
        self.masks = masks
        self.categories = list(self.coco["categories"])
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.class_names = [c["name"] for c in self.categories]
        self.anns: dict[Any, list] = {im["id"]: [] for im in self.coco["images"]}
        for a in self.coco["annotations"]:
            if a["iscrowd"] or a["bbox"][2] < 1 or a["bbox"][3] < 1:
                continue
            if masks and not a.get("segmentation"):
                raise AnnotationError(f"{self.ann_file}: annotation {a['id']} has no 'segmentation', which Mask "
                                      "R-CNN needs; train a RetinaNet instead, or add masks")
            self.anns[a["image_id"]].append(a)
        self.images = [im for im in self.coco["images"] if not (train and not self.anns[im["id"]])]
        if not self.images:
            raise AnnotationError(f"{self.ann_file}: no image has a usable box")

    @property
    def num_classes(self) -> int:
        return len(self.categories) + 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int):
        info = self.images[idx]
        path = self.images_dir / info["file_name"]
        try:
            img = open_rgb(path)
            if img.size != (info["width"], info["height"]):
                raise AnnotationError(f"{self.ann_file}: image {info['file_name']!r} is {img.size[0]}x{img.size[1]} "
                                      f"but the file says {info['width']}x{info['height']}")
        except MetaFormerError as e:  # skipped and listed by the loops, like classification's unreadable files
            return Unreadable(str(path), str(e))
        w, h = img.size
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        anns = self.anns[info["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        target = {"boxes": boxes, "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                                         dtype=torch.int64), "image_id": info["id"]}
        if self.masks:
            m = [_decode_mask(a["segmentation"], h, w) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(m)) if m else torch.zeros((0, h, w), dtype=torch.uint8)
        if self.train and random.random() < 0.5:
            image = image.flip(-1)
            boxes = target["boxes"]
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def detection_collate(batch):
    """``(images, targets, unreadable)``: lists, as torchvision's detectors take them."""
    good = [b for b in batch if not isinstance(b, Unreadable)]
    return [b[0] for b in good], [b[1] for b in good], [b for b in batch if isinstance(b, Unreadable)]


# --------------------------------------------------------------------------------------
# ADE20K-layout semantic segmentation
# --------------------------------------------------------------------------------------

def _normalize(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (x - mean) / std


def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size with long edge <= scale[0], short <= scale[1]."""
    f = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return max(1, int(w * f + 0.5)), max(1, int(h * f + 0.5))


class SegmentationDataset(Dataset):
    """ADE20K layout: ``root/images/{split}/X.jpg`` with ``root/annotations/{split}/X.png``.

    Annotations are index PNGs. With ``reduce_zero_label`` (ADE20K) 0 ("other") becomes
    ``IGNORE_INDEX`` and every other value shifts down by one. Training (mmseg's ADE20K
    pipeline): resize keeping the ratio to ``img_scale`` times a random ratio in
    ``ratio_range``, random ``crop_size`` crop (re-drawn up to 10 times while one class covers
    over 75% of it), flip 0.5, pad to the crop with the ignore index. Test: resize to
    ``img_scale``; the label stays at full size (metrics are computed there).
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", train: bool = False,
                 num_classes: int = 150, reduce_zero_label: bool = True, img_scale: tuple[int, int] = (2048, 512),
                 crop_size: int = 512, ratio_range: tuple[float, float] = (0.5, 2.0)):
        self.root = Path(root)
        img_dir, ann_dir = self.root / "images" / split, self.root / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise AnnotationError(f"{d} not found: expected the ADE20K layout images/{split}/*.jpg and "
                                      f"annotations/{split}/*.png under {self.root}")
        self.images = sorted(p for p in img_dir.iterdir() if p.name.lower().endswith(IMG_EXTENSIONS))
        if not self.images:
            raise AnnotationError(f"no images in {img_dir}")
        self.labels = [ann_dir / (p.stem + ".png") for p in self.images]
        missing = [p.name for p in self.labels if not p.is_file()]
        if missing:
            raise AnnotationError(f"{len(missing)} of {len(self.images)} images in {img_dir} have no annotation PNG "
                                  f"in {ann_dir} (first: {missing[0]!r})")
        self.train, self.num_classes, self.reduce_zero_label = train, num_classes, reduce_zero_label
        self.img_scale, self.crop_size, self.ratio_range = tuple(img_scale), crop_size, tuple(ratio_range)

    def __len__(self) -> int:
        return len(self.images)

    def read_label(self, idx: int) -> np.ndarray:
        lab = Image.open(self.labels[idx])
        if lab.mode not in ("L", "P", "I", "I;16"):
            raise AnnotationError(f"{self.labels[idx]} is a {lab.mode} image; annotations must be single-channel "
                                  "index PNGs (one class index per pixel)")
        seg = np.asarray(lab).astype(np.int64)
        if self.reduce_zero_label:  # as mmseg: 0 ("other") is ignored, the rest shift down; 255 stays "ignore"
            seg = np.where((seg == 0) | (seg == IGNORE_INDEX), IGNORE_INDEX, seg - 1)
        bad = seg[(seg != IGNORE_INDEX) & ((seg < 0) | (seg >= self.num_classes))]
        if bad.size:
            shift = " after the shift by -1 (--reduce-zero-label)" if self.reduce_zero_label else ""
            raise AnnotationError(f"{self.labels[idx]} has class index {int(bad.max())}{shift}, but there are "
                                  f"{self.num_classes} classes: set --num-classes, or check --reduce-zero-label")
        return seg

    def __getitem__(self, idx: int):
        try:
            img = open_rgb(self.images[idx])
            seg = self.read_label(idx)
            if seg.shape != (img.size[1], img.size[0]):
                raise AnnotationError(f"{self.labels[idx]} is {seg.shape[1]}x{seg.shape[0]} but its image is "
                                      f"{img.size[0]}x{img.size[1]}")
        except MetaFormerError as e:  # skipped and listed by the loops
            return Unreadable(str(self.images[idx]), str(e))
        except OSError as e:  # an unreadable annotation PNG
            return Unreadable(str(self.labels[idx]), f"cannot read annotation {self.labels[idx]}: {e}")
        if not self.train:
            return _normalize(img.resize(rescale_size(*img.size, self.img_scale), Image.BILINEAR)), \
                torch.from_numpy(seg)
        r = random.uniform(*self.ratio_range)
        size = rescale_size(*img.size, (int(self.img_scale[0] * r), int(self.img_scale[1] * r)))
        img = img.resize(size, Image.BILINEAR)
        seg = np.asarray(Image.fromarray(seg.astype(np.uint8)).resize(size, Image.NEAREST)).astype(np.int64)
        c = self.crop_size
        h, w = seg.shape
        for _ in range(10):
            y0, x0 = random.randint(0, max(h - c, 0)), random.randint(0, max(w - c, 0))
            crop = seg[y0:y0 + c, x0:x0 + c]
            _, counts = np.unique(crop[crop != IGNORE_INDEX], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                break
        img = img.crop((x0, y0, x0 + min(c, w), y0 + min(c, h)))
        seg = seg[y0:y0 + c, x0:x0 + c]
        x, y = _normalize(img), torch.from_numpy(np.ascontiguousarray(seg))
        if random.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        x = F.pad(x, (0, c - x.shape[-1], 0, c - x.shape[-2]), value=0.0)
        y = F.pad(y, (0, c - y.shape[-1], 0, c - y.shape[-2]), value=IGNORE_INDEX)
        return x, y


# --------------------------------------------------------------------------------------
# Toy data: coloured shapes
# --------------------------------------------------------------------------------------

TOY_CLASSES = ("square", "circle", "triangle")
_TOY_COLOURS = ((220, 40, 40), (40, 180, 60), (50, 80, 230))


def _toy_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]


def make_toy_data(root: str | os.PathLike, num_train: int = 8, num_val: int = 4, size: int = 128,
                  seed: int = 0) -> Path:
    """Write a tiny shapes dataset (squares, circles, triangles) in both layouts under ``root``.

    - ``images/{training,validation}/*.jpg``: the images (``size`` x ``size``);
    - ``instances_{training,validation}.json``: COCO instances (bbox, polygon, area),
      ``file_name`` relative to ``images/{split}``;
    - ``annotations/{training,validation}/*.png``: ADE20K-style index PNGs: 0 = "other"
      (a 1-px ring on each shape's outline, ignored after the label shift), 1 = background,
      2.. = the shape classes; so ``--num-classes 4`` after the shift.
    """
    root = Path(root)
    rng = random.Random(seed)
    for split, n in (("training", num_train), ("validation", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-12, 13, (size, size, 3))
            base = np.array([rng.randint(150, 200)] * 3)
            img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
            seg = Image.new("L", (size, size), 1)
            draw, sdraw = ImageDraw.Draw(img), ImageDraw.Draw(seg)
            placed: list[tuple[float, float, float]] = []
            for _ in range(rng.randint(1, 3)):
                for _try in range(50):  # shapes never overlap, so each mask is its whole polygon
                    r = rng.uniform(size * 0.1, size * 0.22)
                    cx, cy = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
                    if all(math.hypot(cx - px, cy - py) > (r + pr) * 1.5 + 2 for px, py, pr in placed):
                        break
                else:
                    continue
                placed.append((cx, cy, r))
                k = rng.randrange(len(TOY_CLASSES))
                poly = _toy_polygon(TOY_CLASSES[k], cx, cy, r)
                colour = tuple(int(np.clip(c + rng.randint(-25, 25), 0, 255)) for c in _TOY_COLOURS[k])
                draw.polygon(poly, fill=colour)
                mask = Image.new("L", (size, size), 0)
                ImageDraw.Draw(mask).polygon(poly, fill=1)
                m = np.asarray(mask)
                ys, xs = np.nonzero(m)
                x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": k + 1,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(m.sum()), "iscrowd": 0,
                             "segmentation": [[round(v, 2) for p in poly for v in p]]})
                sdraw.polygon(poly, fill=k + 2, outline=0)
            name = f"{split}_{i:04d}"
            img.save(root / "images" / split / f"{name}.jpg", quality=95)
            seg.save(root / "annotations" / split / f"{name}.png")
            images.append({"id": i + 1, "file_name": f"{name}.jpg", "width": size, "height": size})
        coco = {"images": images, "annotations": anns,
                "categories": [{"id": k + 1, "name": c} for k, c in enumerate(TOY_CLASSES)]}
        (root / f"instances_{split}.json").write_text(json.dumps(coco))
    return root

"""Predict and look: detections (boxes, labels, scores, masks) or class masks drawn over the input image."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ...atomic import check_writable
from ...data import DataError, list_images, open_rgb
from ...errors import ConfigError
from ...engine.checkpoint import load as load_checkpoint
from ...engine.loop import progress_bar
from ...engine.runtime import setup
from .data import _normalize, rescale_size
from .models.detector import build_detector_from_checkpoint, detect
from .models.segmenter import build_segmenter_from_checkpoint, segment_logits


def palette(num_classes: int, seed: int = 3) -> np.ndarray:
    """A fixed, well-spread colour per class (the same run to run, so images can be compared)."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, (num_classes, 3), dtype=np.uint8)



def draw_detections(image: Image.Image, det: dict, class_names: list[str], score_thresh: float = 0.5) -> Image.Image:
    keep = det["scores"] >= score_thresh
    img = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    colours = palette(len(class_names) + 1)
    labels = det["labels"][keep].tolist()
    cols = [tuple(int(c) for c in colours[lab]) for lab in labels]
    if "masks" in det and keep.any():
        img = draw_segmentation_masks(img, det["masks"][keep][:, 0] > 0.5, alpha=0.45, colors=cols)
    if keep.any():
        text = [f"{class_names[lab - 1]} {s:.2f}" for lab, s in zip(labels, det["scores"][keep].tolist())]
        img = draw_bounding_boxes(img, det["boxes"][keep], labels=text, colors=cols, width=2)
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def blend_mask(image: Image.Image, pred: np.ndarray, colours: np.ndarray, opacity: float = 0.5) -> Image.Image:
    base = np.asarray(image, dtype=np.float32)
    out = base * (1 - opacity) + colours[pred].astype(np.float32) * opacity
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def predict_detection(checkpoint: str, inputs: Iterable[str], output: str, score_thresh: float = 0.5,
                      device: str | None = None, amp: str = "auto") -> list[dict]:
    """Write ``OUTPUT/<name>.png`` per input image (boxes with class and score, and masks); returns per image
    ``{'image', 'output', 'detections': [{'label', 'score', 'box'}...]}`` for the detections drawn, or
    ``{'image', 'error'}`` for a file that cannot be read (skipped)."""
    out_dir = _output_dir(output)
    ckpt = load_checkpoint(checkpoint, "detect")
    rt = setup(device, amp)
    model = build_detector_from_checkpoint(ckpt).to(rt.device)
    results = []
    for path, image in _readable(inputs, results):
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        det = detect(model, [x], rt)[0]
        dest = _destination(out_dir, path, results)
        draw_detections(image, det, ckpt["class_names"], score_thresh).save(dest)
        keep = det["scores"] >= score_thresh
        results.append({"image": str(path), "output": str(dest), "detections": [
            {"label": ckpt["class_names"][int(lab) - 1], "score": round(float(sc), 4),
             "box": [round(float(v), 1) for v in box]}
            for lab, sc, box in zip(det["labels"][keep], det["scores"][keep], det["boxes"][keep])]})
    return results


def predict_segmentation(checkpoint: str, inputs: Iterable[str], output: str, mode: str = "whole",
                         opacity: float = 0.5, device: str | None = None, amp: str = "auto") -> list[dict]:
    """Write ``OUTPUT/<name>.png`` per input image (the predicted class colours blended over it); returns per
    image ``{'image', 'output', 'classes': {class index: share of the pixels}}``, or ``{'image', 'error'}`` for a
    file that cannot be read (skipped)."""
    out_dir = _output_dir(output)
    ckpt = load_checkpoint(checkpoint, "segment")
    rt = setup(device, amp)
    model = build_segmenter_from_checkpoint(ckpt).to(rt.device).eval()
    colours = palette(model.num_classes)
    results = []
    for path, image in _readable(inputs, results):
        x = _normalize(image.resize(rescale_size(*image.size, tuple(ckpt["img_scale"])), Image.BILINEAR))
        with rt.autocast():
            logits = segment_logits(model, x[None].to(rt.device), mode, ckpt["crop_size"]).float()
        pred = F.interpolate(logits, size=(image.size[1], image.size[0]), mode="bilinear",
                             align_corners=False).argmax(1)[0].cpu().numpy()
        dest = _destination(out_dir, path, results)
        blend_mask(image, pred, colours, opacity).save(dest)
        classes, counts = np.unique(pred, return_counts=True)
        results.append({"image": str(path), "output": str(dest),
                        "classes": {int(c): round(float(n) / pred.size, 4) for c, n in zip(classes, counts)}})
    return results


def _readable(inputs: Iterable[str], results: list[dict]):
    """``(path, image)`` of each input image; one that cannot be read goes into ``results`` as an error and the
    others go on (one bad file in a folder does not stop the rest)."""
    for path in progress_bar(list_images(inputs), desc="predict"):
        try:
            yield path, open_rgb(path)
        except DataError as e:
            results.append({"image": str(path), "error": str(e)})


def _destination(out_dir: Path, image: Path, done: list[dict]) -> Path:
    """``OUTPUT/<name>.png``; inputs of the same name (from different folders) get ``<name>-2.png``..."""
    taken = {r["output"] for r in done if "output" in r}
    dest, k = out_dir / f"{image.stem}.png", 1
    while str(dest) in taken:
        k += 1
        dest = out_dir / f"{image.stem}-{k}.png"
    return dest


def _output_dir(output: str) -> Path:
    """The folder for the pictures, checked (a file, a read-only place, a name too long) before anything runs."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file: give a folder for the pictures")
    check_writable(out, f"--output {out}", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    return out

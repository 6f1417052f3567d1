"""Grad-CAM on the last stage (as the authors' own script did), via pytorch-grad-cam; on a model for small
inputs, on the deepest stage whose map can still localise (:func:`cam_stage_for`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ConfigError, require
from ..models.metaformer import token_grids


@dataclass
class CamResult:
    image: str
    target: int
    target_name: str
    probability: float
    heatmap: np.ndarray  # [H, W] in [0, 1], at the model's input size
    overlay: np.ndarray  # [H, W, 3] uint8

    @property
    def peak(self) -> tuple[int, int]:
        return tuple(int(i) for i in np.unravel_index(self.heatmap.argmax(), self.heatmap.shape))


def cam_stage_for(model) -> tuple[int, str | None]:
    """The stage Grad-CAM looks at: the last (as the authors' script did) unless its map is smaller than 4x4
    (small inputs), then the deepest stage whose map is at least 4x4, said in a note."""
    size = model.img_size[0] if isinstance(model.img_size, (tuple, list)) else int(model.img_size)
    grids = token_grids(model.img_size, len(model.stages))
    last = len(grids) - 1
    if min(grids[last]) >= 4:
        return last, None
    deeper = [i for i, g in enumerate(grids) if min(g) >= 4]
    if not deeper:
        return last, f"at {size} px every stage's map is under 4x4: the heatmap cannot localise"
    i = deeper[-1]
    return i, (f"Grad-CAM on stage {i + 1} ({grids[i][0]}x{grids[i][1]} map): at {size} px the last stage's map is "
               f"{grids[last][0]}x{grids[last][1]}, too coarse to localise")


def _display_image(pil: Image.Image, transform) -> np.ndarray:
    """The input as the model sees it (resize + centre crop), before normalisation, in [0, 1]."""
    from torchvision import transforms as T

    geometric = [t for t in transform.transforms if isinstance(t, (T.Resize, T.CenterCrop))]
    return np.asarray(T.Compose(geometric)(pil.convert("RGB")), dtype=np.float32) / 255.0


def grad_cam(model: nn.Module, pil: Image.Image, transform, target: int | None = None,
             class_names: list[str] | None = None, name: str = "", stage: int | None = None) -> CamResult:
    """Grad-CAM for ``target`` (default: the predicted class) on the output of the last stage (or ``stage``)."""
    GradCAM = require("pytorch_grad_cam", "cam", "Grad-CAM").GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if getattr(model, "num_classes", None) == 0:
        raise ConfigError("this model has no classifier (num_classes 0: its output is the feature vector), so there "
                          "are no class scores to explain: use a checkpoint with its classifier")
    model.eval()
    x = transform(pil.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    if target is None:
        target = int(probs.argmax())
    if not 0 <= target < probs.numel():
        raise ConfigError(f"--target {target} is out of range for a {probs.numel()}-class model")
    with GradCAM(model=model, target_layers=[model.stages[-1 if stage is None else stage]]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
    rgb = _display_image(pil, transform)
    overlay = show_cam_on_image(rgb, heat, use_rgb=True)
    label = class_names[target] if class_names else str(target)
    return CamResult(name, target, label, float(probs[target]), heat, overlay)


def resolve_target(target: str | None, class_names: list[str]) -> int | None:
    if target is None:
        return None
    if target.isdigit():
        return int(target)
    lowered = [c.lower() for c in class_names]
    if target.lower() in lowered:
        return lowered.index(target.lower())
    raise ConfigError(f"unknown target class {target!r}: give a class index or one of the model's class names "
                     f"(e.g. {', '.join(class_names[:5])} ...)")


def save_overlay(result: CamResult, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in result.target_name)[:40]
    path = out_dir / f"{Path(result.image).stem}_cam_{result.target}_{safe}.png"
    Image.fromarray(result.overlay).save(path)
    return path

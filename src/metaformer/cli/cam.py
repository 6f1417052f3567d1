"""``metaformer cam``: Grad-CAM heatmaps over images (see :mod:`metaformer.tools.cam`)."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import add_json, add_output, print_json
from .export import add_weights, load


def run_cam(args) -> int:
    from ..atomic import check_writable
    from ..data import open_rgb
    from ..errors import need
    from ..tools.cam import cam_stage_for, grad_cam, resolve_target, save_overlay

    from .evaluate import split_model_and_images

    need("pytorch_grad_cam", "cam", "Grad-CAM")
    args.model, images = split_model_and_images(args.inputs, args.checkpoint, "cam")
    check_writable(args.output, f"--output {args.output}", folder=True)  # before the model is loaded
    loaded = load(args)
    target = resolve_target(args.target, loaded.class_names)
    stage, note = cam_stage_for(loaded.model) if hasattr(loaded.model, "stages") else (None, None)
    if note:
        print(f"note: {note}", file=sys.stderr)
    out_dir, done = Path(args.output), []
    for image in images:
        pil = open_rgb(image)
        result = grad_cam(loaded.model, pil, loaded.transform, target, loaded.class_names, name=image, stage=stage)
        path = save_overlay(result, out_dir)
        done.append({"image": str(image), "output": str(path), "target": result.target,
                     "target_name": result.target_name, "probability": result.probability, "peak": result.peak})
        if not args.json:
            print(f"{image}: class {result.target} ({result.target_name}, p={result.probability:.3f}), "
                  f"peak at (row, col) {result.peak} of {result.heatmap.shape} -> {path}")
    if args.json:
        print_json(done)
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("cam", description="Grad-CAM heatmaps over images: the last stage's, as the authors did (for "
                       "a model of small inputs whose last map is under 4x4, the deepest stage of at least 4x4)")
    c.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE", help="variant name (optional with a checkpoint "
                   "of ours) followed by image files")
    add_weights(c, model_positional=False)
    c.add_argument("--target", help="class index or name (default: the predicted class)")
    add_output(c, "cam", "folder for the PNG overlays")
    add_json(c, "print each image's target, probability, peak and overlay path as JSON")
    c.set_defaults(func=run_cam)

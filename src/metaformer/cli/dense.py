"""``metaformer detect`` and ``metaformer segment``: train, evaluate and predict dense models.

Defaults are the paper's settings (COCO 1x RetinaNet / Mask R-CNN; ADE20K Semantic FPN 40k).
``make-toy-data`` writes a tiny shapes dataset in both layouts for a first run.
"""
from __future__ import annotations

import argparse
import functools
import sys

from .. import yaml12
from ..ranges import IMG_SIZE, MAX_EPOCHS, MAX_ITERS, PROBABILITY, SEED, real, whole
from . import UserError
from .common import (add_amp, add_batch_size, add_checkpoint, add_device, add_json, add_output, add_run_folder,
                     add_workers, logs_to_stderr, print_json)


def _key_values(items: list[str] | None, what: str) -> dict:
    """``KEY=VALUE`` pairs; values read as YAML, so ``depths=[1,1,1,1]`` is a list."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what} {item!r} is not KEY=VALUE (e.g. depths=[2,2,6,2])")
        out[key.strip()] = yaml12.load(value, f"{what} {key.strip()}")
    return out


def _one_line(func):
    """The training verbs' outcomes as the command line reports them: an input error raised inside a
    DataLoader worker keeps its one-line message (not the worker's traceback), a diverged run is an
    error line, and Ctrl-C (after saving) exits 130 saying how to continue."""
    @functools.wraps(func)
    def run(args):
        from ..engine.stop import Interrupted, TrainingDiverged

        try:
            return func(args)
        except TrainingDiverged as e:
            raise UserError(str(e)) from None
        except Interrupted as e:
            print(f"metaformer {args.command}: {e}", file=sys.stderr)
            return 130
        except ValueError as e:
            msg = str(e)
            if "Original Traceback" not in msg:
                raise
            raise UserError(msg.strip().splitlines()[-1].split(": ", 1)[-1]) from None
    return run


def _toy(args) -> int:
    from ..tasks.dense.data import make_toy_data

    root = make_toy_data(args.dir, args.num_train, args.num_val, args.size, args.seed)
    print(f"wrote {args.num_train} training and {args.num_val} validation images of shapes to {root}: "
          f"images/{{training,validation}}/, instances_{{training,validation}}.json (COCO), "
          f"annotations/{{training,validation}}/ (ADE20K-style PNGs: 4 classes after the label shift)")
    return 0


def _add_toy(sub) -> None:
    p = sub.add_parser("make-toy-data", help="write a tiny dataset of coloured shapes (COCO json + ADE20K layout)")
    p.add_argument("dir")
    p.add_argument("--num-train", type=whole(1, 100_000), default=8, help="training images")
    p.add_argument("--num-val", type=whole(1, 100_000), default=4, help="validation images")
    p.add_argument("--size", type=IMG_SIZE, default=128, help="image side in pixels")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=_toy)


def _add_common_train(p, task: str) -> None:
    when = "every epoch" if task == "detect" else "every --ckpt-every iterations"
    add_run_folder(p, f"runs/{task}", f"the checkpoint last.pth (saved {when}), metrics.csv/jsonl, tb/")
    p.add_argument("--backbone", default="poolformer_s12", help="any variant from `metaformer info`")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="backbone config override, repeatable (e.g. depths=[1,1,1,1] dims=[16,32,48,64])")
    p.add_argument("--pretrained", metavar="TAG_OR_PATH", help="ImageNet weights for the backbone: a tag from "
                   "`metaformer info`, or a file in any layout metaformer loads")
    p.add_argument("--frozen-stages", type=whole(-1, 16), default=-1, help="-1 none, 0 stem, k stem + stages 1..k")
    p.add_argument("--fpn-channels", type=whole(1, 4096), default=256, help="FPN width")
    p.add_argument("--lr", type=real(0, lo_open=True), help="default: the paper's (detect 1e-4, segment 2e-4)")
    p.add_argument("--weight-decay", type=real(0), default=1e-4, help="AdamW's weight decay")
    add_batch_size(p, None, "images per process (default: the paper's, detect 2, segment 4)")
    add_workers(p)
    add_amp(p)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--log-every", type=whole(1), default=50, help="iterations between log points")
    add_device(p)
    p.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")
    add_json(p, "print the final metrics row as JSON")
    p.set_defaults(weights_flag="--pretrained")  # where a download that failed can be given as a file


def _common_train_options(args) -> dict:
    return dict(output=args.output, backbone=args.backbone, backbone_overrides=_key_values(args.override, "--override"),
                pretrained=args.pretrained, frozen_stages=args.frozen_stages, fpn_channels=args.fpn_channels,
                weight_decay=args.weight_decay, workers=args.workers, amp=args.amp, seed=args.seed,
                resume=args.resume, overwrite=args.overwrite, log_every=args.log_every, device=args.device,
                wandb=args.wandb)


def _report_run(args, history: list[dict], metrics: tuple[str, ...]) -> None:
    """The end of a training run: the last row, readable (or JSON), and where the run is."""
    from ..engine.loop import format_row

    last = history[-1] if history else {}
    if args.json:
        print_json({**last, "checkpoint": f"{args.output}/last.pth"})
        return
    print(f"done: {format_row(last, metrics)}\n  checkpoint {args.output}/last.pth, metrics "
          f"{args.output}/metrics.csv, TensorBoard {args.output}/tb")


@_one_line
def _det_train(args) -> int:
    from ..tasks.detection import DetectionConfig, train_detection

    cfg = DetectionConfig(
        train_images=args.train_images, train_ann=args.train_ann, val_images=args.val_images, val_ann=args.val_ann,
        arch=args.arch, detector_options=_key_values(args.detector_opt, "--detector-opt"), min_size=args.min_size,
        max_size=args.max_size, epochs=args.epochs, lr_steps=args.lr_steps, lr=args.lr or 1e-4,
        warmup_iters=args.warmup_iters, batch_size=args.batch_size or 2, **_common_train_options(args))
    with logs_to_stderr(args.json):
        history = train_detection(cfg)
    _report_run(args, history, ("epoch", "loss", "bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"))
    return 0


@_one_line
def _det_eval(args) -> int:
    from ..engine.checkpoint import load
    from ..engine.runtime import setup
    from ..tasks.dense.data import CocoDetection
    from ..tasks.dense.models import build_detector_from_checkpoint
    from ..tasks.detection import evaluate_detection

    ckpt = load(args.checkpoint, "detect")
    ds = CocoDetection(args.images, args.ann, masks=ckpt["arch"] == "mask_rcnn")
    if ds.class_names != ckpt["class_names"]:
        raise UserError(f"{args.ann} has categories {ds.class_names}, the checkpoint {ckpt['class_names']}")
    rt = setup(args.device, args.amp)
    model = build_detector_from_checkpoint(ckpt).to(rt.device)
    res = evaluate_detection(model, ds, rt, args.workers, progress=True)
    if rt.main:
        if args.json:
            print_json({**res["metrics"], "images": len(ds) - len(res["unreadable"]),
                        "unreadable": len(res["unreadable"])})
        else:
            print(res["summary"])
            m = res["metrics"]
            print(f"{args.checkpoint} on {args.ann}: " + "  ".join(
                f"{k} {100 * m[k]:.1f}" for k in ("bbox_mAP", "bbox_mAP_50", "segm_mAP") if k in m)
                + f"  ({len(ds) - len(res['unreadable'])} images)")
        _print_skipped(res["unreadable"])
    rt.close()
    return 0


def _print_skipped(bad) -> None:
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), left out of the scores:", file=sys.stderr)
        for b in bad:
            print(f"  {b.path}: {b.error}", file=sys.stderr)


def _det_predict(args) -> int:
    from ..tasks.dense.predict import predict_detection

    results = predict_detection(args.checkpoint, args.inputs, args.output, args.score_thresh, args.device, args.amp)
    if args.json:
        print_json(results)
    for r in [] if args.json else results:
        if "error" not in r:
            found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in r["detections"]) or "nothing"
            print(f"{r['image']} -> {r['output']}: {found} (score >= {args.score_thresh})")
    return _skipped_images(results)


def _skipped_images(results: list[dict]) -> int:
    """List the images predict could not read (on stderr); an error when it could read none."""
    bad = [r for r in results if "error" in r]
    if bad and len(bad) == len(results):
        raise UserError(f"none of the {len(results)} image(s) could be read; the first: {bad[0]['error']}")
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):", file=sys.stderr)
        for r in bad:
            print(f"  {r['image']}: {r['error']}", file=sys.stderr)
    return 0


@_one_line
def _seg_train(args) -> int:
    from ..tasks.segmentation import SegmentationConfig, train_segmentation

    cfg = SegmentationConfig(
        data_root=args.data_root, train_split=args.train_split, val_split=None if args.no_val else args.val_split,
        num_classes=args.num_classes, reduce_zero_label=args.reduce_zero_label, img_scale=args.img_scale,
        crop_size=args.crop_size, ratio_range=args.ratio_range, iters=args.iters, lr=args.lr or 2e-4,
        power=args.power, batch_size=args.batch_size or 4, ckpt_every=args.ckpt_every, eval_every=args.eval_every,
        mode=args.mode, **_common_train_options(args))
    with logs_to_stderr(args.json):
        history = train_segmentation(cfg)
    _report_run(args, history, ("iteration", "loss", "mIoU", "mAcc", "aAcc"))
    return 0


@_one_line
def _seg_eval(args) -> int:
    from ..engine.checkpoint import load
    from ..engine.loop import PERCENT, format_row
    from ..engine.runtime import setup
    from ..tasks.dense.data import SegmentationDataset
    from ..tasks.dense.models import build_segmenter_from_checkpoint
    from ..tasks.segmentation import evaluate_segmentation

    ckpt = load(args.checkpoint, "segment")
    rzl = ckpt["reduce_zero_label"] if args.reduce_zero_label is None else args.reduce_zero_label
    ds = SegmentationDataset(args.data_root, args.split, num_classes=ckpt["model_config"]["num_classes"],
                             reduce_zero_label=rzl, img_scale=tuple(args.img_scale or ckpt["img_scale"]))
    rt = setup(args.device, args.amp)
    model = build_segmenter_from_checkpoint(ckpt).to(rt.device)
    res = evaluate_segmentation(model, ds, rt, args.mode, args.crop_size or ckpt["crop_size"], progress=True)
    bad = res.pop("unreadable")
    if rt.main:
        if args.json:
            print_json({**res, "images": len(ds) - len(bad), "unreadable": len(bad)})
        else:
            print(f"{args.checkpoint} on {args.data_root} ({args.split}, {args.mode}): "
                  f"{format_row(res, PERCENT)}  ({len(ds) - len(bad)} images; --json adds the per-class IoU)")
        _print_skipped(bad)
    rt.close()
    return 0


def _seg_predict(args) -> int:
    from ..tasks.dense.predict import predict_segmentation

    results = predict_segmentation(args.checkpoint, args.inputs, args.output, args.mode, args.opacity, args.device,
                                   args.amp)
    if args.json:
        print_json(results)
    for r in [] if args.json else results:
        if "error" not in r:
            shares = sorted(r["classes"].items(), key=lambda kv: -kv[1])[:5]
            print(f"{r['image']} -> {r['output']}: " + ", ".join(f"class {c} {100 * v:.0f}%" for c, v in shares))
    return _skipped_images(results)


def _task(sub, name: str, description: str):
    """``metaformer NAME ACTION``: the task's actions, ``make-toy-data`` among them."""
    actions = sub.add_parser(name, description=description).add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    _add_toy(actions)
    return actions


def add_parser(sub) -> None:
    # ---------------- detect ----------------
    dsub = _task(sub, "detect", "RetinaNet or Mask R-CNN with a MetaFormer + FPN backbone, as in the paper; COCO-format data (an "
                 "images folder and an instances json).")

    p = dsub.add_parser("train", help="train on COCO-format data (paper defaults: AdamW 1e-4, 1x schedule)",
                        description="Train a detector; the defaults are the paper's (1x schedule, AdamW 1e-4, "
                                    "1333x800). Distributed: torchrun --nproc_per_node=N -m metaformer detect train ...")
    p.add_argument("--train-images", required=True, help="folder of the training images")
    p.add_argument("--train-ann", required=True, help="COCO instances json of the training images")
    p.add_argument("--val-images", help="folder of the validation images")
    p.add_argument("--val-ann", help="COCO instances json, evaluated (COCO mAP) after every epoch")
    p.add_argument("--arch", choices=["retinanet", "mask_rcnn"], default="retinanet")
    _add_common_train(p, "detect")
    p.add_argument("--detector-opt", action="append", metavar="KEY=VALUE",
                   help="torchvision RetinaNet/MaskRCNN keyword argument, repeatable (e.g. box_batch_size_per_image=128)")
    p.add_argument("--min-size", type=IMG_SIZE, default=800, help="shorter side after resizing (paper: 800)")
    p.add_argument("--max-size", type=IMG_SIZE, default=1333, help="longer side limit, at least --min-size (paper: "
                                                                   "1333)")
    p.add_argument("--epochs", type=whole(1, MAX_EPOCHS), default=12, help="12: the 1x schedule")
    p.add_argument("--lr-steps", type=whole(1, MAX_EPOCHS), nargs="*", default=[8, 11],
                   help="epochs after which the lr drops x0.1")
    p.add_argument("--warmup-iters", type=whole(0, MAX_ITERS), default=500, help="linear warm-up iterations")
    p.set_defaults(func=_det_train)

    p = dsub.add_parser("eval", help="COCO mAP (pycocotools COCOeval) of a checkpoint",
                        description="COCO box (and mask) AP of a `detect train` checkpoint; distributed under "
                                    "torchrun (each rank detects its share).")
    add_checkpoint(p, True, "last.pth of `metaformer detect train`")
    p.add_argument("--images", required=True, help="folder of the images")
    p.add_argument("--ann", required=True, help="COCO instances json")
    add_amp(p)
    add_workers(p)
    add_device(p)
    add_json(p, "print the metrics as JSON instead of COCOeval's table")
    p.set_defaults(func=_det_eval)

    p = dsub.add_parser("predict", help="write PNGs with the detected boxes (and masks) drawn on the images")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    add_checkpoint(p, True, "last.pth of `metaformer detect train`")
    add_output(p, "predictions", "folder for the PNGs")
    p.add_argument("--score-thresh", type=PROBABILITY, default=0.5, help="draw detections scoring at least this")
    add_amp(p)
    add_device(p)
    add_json(p, "print the detections as JSON")
    p.set_defaults(func=_det_predict)

    # ---------------- segment ----------------
    ssub = _task(sub, "segment", "Semantic FPN with a MetaFormer backbone, as in the paper; ADE20K-layout data (images/SPLIT/*.jpg, "
                 "annotations/SPLIT/*.png index PNGs).")

    p = ssub.add_parser("train", help="train (paper defaults: AdamW 2e-4, poly 0.9, 40k iterations, crop 512)",
                        description="Train Semantic FPN; the defaults are the paper's (AdamW 2e-4, poly decay, 40k "
                                    "iterations, 512 crops). Distributed: torchrun --nproc_per_node=N -m metaformer "
                                    "segment train ...")
    p.add_argument("--data-root", required=True, help="folder with images/SPLIT and annotations/SPLIT")
    p.add_argument("--train-split", default="training")
    p.add_argument("--val-split", default="validation")
    p.add_argument("--no-val", action="store_true", help="no periodic evaluation")
    p.add_argument("--num-classes", type=whole(1, 255), default=150, help="after the label shift (ADE20K: 150)")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=True,
                   help="label 0 = 'other' -> ignored, the rest shift by -1 (ADE20K)")
    _add_common_train(p, "segment")
    p.add_argument("--img-scale", type=IMG_SIZE, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="resize keeping the ratio to fit LONG x SHORT")
    p.add_argument("--crop-size", type=IMG_SIZE, default=512, help="training crop side")
    p.add_argument("--ratio-range", type=real(0, 16, lo_open=True), nargs=2, default=[0.5, 2.0],
                   metavar=("MIN", "MAX"), help="random rescale of --img-scale, MIN <= MAX")
    p.add_argument("--iters", type=whole(1, MAX_ITERS), default=40000, help="training iterations")
    p.add_argument("--power", type=real(0, 100), default=0.9, help="poly decay power")
    p.add_argument("--ckpt-every", type=whole(1), default=4000, help="iterations between checkpoints")
    p.add_argument("--eval-every", type=whole(1), default=4000, help="iterations between evaluations")
    p.add_argument("--mode", choices=["whole", "slide"], default="whole", help="test mode of the periodic evaluation")
    p.set_defaults(func=_seg_train)

    p = ssub.add_parser("eval", help="mIoU, mean accuracy and pixel accuracy of a checkpoint",
                        description="mIoU, mAcc and aAcc of a `segment train` checkpoint, as mmseg reports them; "
                                    "distributed under torchrun.")
    add_checkpoint(p, True, "last.pth of `metaformer segment train`")
    p.add_argument("--data-root", required=True, help="folder with images/SPLIT and annotations/SPLIT")
    p.add_argument("--split", default="validation")
    p.add_argument("--mode", choices=["whole", "slide"], default="whole", help="one pass, or sliding windows")
    p.add_argument("--crop-size", type=IMG_SIZE, help="slide window (default: the training crop)")
    p.add_argument("--img-scale", type=IMG_SIZE, nargs=2, metavar=("LONG", "SHORT"), help="default: as trained")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="default: as trained")
    add_amp(p)
    add_device(p)
    add_json(p, "print the metrics, with the per-class IoU, as JSON")
    p.set_defaults(func=_seg_eval)

    p = ssub.add_parser("predict", help="write PNGs with the predicted class colours blended over the images")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    add_checkpoint(p, True, "last.pth of `metaformer segment train`")
    add_output(p, "predictions", "folder for the PNGs")
    p.add_argument("--mode", choices=["whole", "slide"], default="whole", help="one pass, or sliding windows")
    p.add_argument("--opacity", type=PROBABILITY, default=0.5, help="weight of the class colours over the image")
    add_amp(p)
    add_device(p)
    add_json(p, "print each image's class shares as JSON")
    p.set_defaults(func=_seg_predict)

"""Object detection: train and evaluate RetinaNet / Mask R-CNN on a MetaFormer (COCO-format data).

Every knob is a field of :class:`DetectionConfig`; the defaults are the mmdet settings of PoolFormer's
COCO experiments (Yu et al., CVPR 2022; docs/dense.md, "The paper's settings: COCO"): AdamW 1e-4,
weight decay 1e-4, the 1x schedule with steps after epochs 8 and 11, a 500-iteration linear
warm-up, 1333x800. The run's machinery (DDP, AMP, exact resume,
Ctrl-C, NaN, metrics) is shared with segmentation (:class:`~metaformer.tasks.dense.run.DenseRun`)
and classification (:mod:`metaformer.engine`); this file holds the epoch loop and COCO AP.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Subset

from .. import data as D
from ..engine.loop import format_row, progress_bar
from ..engine.runtime import Runtime, setup
from ..engine.stop import GracefulStop
from ..errors import ConfigError, need, require
from .dense.data import CocoDetection, detection_collate
from .dense.models.detector import build_detector, detect
from .dense.run import DenseRun


@dataclass
class DetectionConfig:
    train_images: str = ""
    train_ann: str = ""
    val_images: str | None = None
    val_ann: str | None = None
    output: str = "runs/detect"
    arch: str = "retinanet"  # or "mask_rcnn"
    backbone: str = "poolformer_s12"
    backbone_overrides: dict = field(default_factory=dict)
    pretrained: str | None = None  # ImageNet weights for the backbone (a tag or a file)
    frozen_stages: int = -1
    fpn_channels: int = 256
    detector_options: dict = field(default_factory=dict)  # torchvision RetinaNet/MaskRCNN keyword arguments
    min_size: int = 800  # the paper's 1333x800
    max_size: int = 1333
    epochs: int = 12  # 1x schedule
    lr_steps: list = field(default_factory=lambda: [8, 11])
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_iters: int = 500  # mmdet's linear warm-up from lr * warmup_ratio
    warmup_ratio: float = 0.001
    batch_size: int = 2  # per process; the paper: 8 GPUs x 2
    workers: int = 2
    amp: str = "auto"  # auto (bf16 on GPU), none, bf16, fp16
    seed: int = 0
    resume: str | None = None  # a checkpoint, or "auto" for OUTPUT/last.pth
    overwrite: bool = False  # replace an earlier run in `output` (else refused)
    log_every: int = 50
    device: str | None = None
    wandb: str | None = None  # a Weights & Biases project


LOGGED = ("iteration", "loss", "bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50", "lr", "time_s", "unreadable",
          "val_unreadable")  # on the console; metrics.csv has every loss and AP


def detection_lr(cfg: DetectionConfig, epoch: int, it: int) -> float:
    lr = cfg.lr * 0.1 ** sum(epoch >= s for s in cfg.lr_steps)
    if it < cfg.warmup_iters:
        lr *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * it / cfg.warmup_iters
    return lr


def train_detection(cfg: DetectionConfig) -> list[dict]:
    """Train a detector; returns one row per epoch (mean losses, and COCO AP when a val set is given)."""
    if (cfg.val_images is None) != (cfg.val_ann is None):
        raise ConfigError("give both --val-images and --val-ann, or neither")
    if cfg.max_size < cfg.min_size:
        raise ConfigError(f"--max-size {cfg.max_size} is below --min-size {cfg.min_size}: the longer side limit must "
                          "be at least the shorter side's size")
    if cfg.val_ann or cfg.arch == "mask_rcnn":
        need("pycocotools", "dense", "COCO evaluation" if cfg.val_ann else "decoding COCO masks")
    rt = setup(cfg.device, cfg.amp)
    return DenseRun.train_in_folder(cfg, rt, lambda folder: _train(cfg, rt, folder))


def _train(cfg, rt, folder) -> list[dict]:
    """The run inside its open folder."""
    ckpt = folder.load("detect")
    arch = ckpt["arch"] if ckpt else cfg.arch
    train_ds = CocoDetection(cfg.train_images, cfg.train_ann, train=True, masks=arch == "mask_rcnn")
    val_ds = CocoDetection(cfg.val_images, cfg.val_ann, masks=arch == "mask_rcnn") if cfg.val_ann else None
    if ckpt:
        if ckpt["class_names"] != train_ds.class_names:
            raise ConfigError(f"{cfg.train_ann} has categories {train_ds.class_names} but the checkpoint was "
                              f"trained on {ckpt['class_names']}")
        model_config = ckpt["model_config"]
        model = build_detector(arch, **model_config)
    else:
        model_config = dict(backbone_name=cfg.backbone, num_classes=train_ds.num_classes,
                            frozen_stages=cfg.frozen_stages, fpn_channels=cfg.fpn_channels, min_size=cfg.min_size,
                            max_size=cfg.max_size, backbone_overrides=dict(cfg.backbone_overrides),
                            **cfg.detector_options)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = build_detector(arch, pretrained_backbone=cfg.pretrained, **model_config)
    run = DenseRun("detect", cfg, rt, folder, ckpt, model, {"arch": arch, "model_config": model_config,
                                                    "class_names": train_ds.class_names,
                                                    "categories": train_ds.categories}, "epoch")
    validate = None
    if val_ds is not None:
        def validate() -> dict:
            res = evaluate_detection(run.model, val_ds, rt, cfg.workers)
            return {**res["metrics"], "unreadable": res["unreadable"]}
    with GracefulStop(rt.log) as run.stop:
        try:
            run.redo_pending_eval(validate)
            while run.epoch < cfg.epochs:
                seconds = train_one_epoch(run, train_ds)
                bad = run.skipped(f"in epoch {run.epoch + 1}")
                run.epoch, run.step_in_epoch = run.epoch + 1, 0
                row = {"epoch": run.epoch, "iteration": run.iteration, **run.take_means(),
                       "lr": run.opt.param_groups[0]["lr"], "time_s": round(seconds, 1), "unreadable": len(bad)}
                run.metrics.add(row)
                run.save(pending_eval=validate is not None)  # the epoch is on disk before it is evaluated
                if validate is not None:
                    run.evaluate_into(row, validate)
                rt.log(f"epoch {run.epoch}/{cfg.epochs}  " + format_row(row, LOGGED))
        finally:
            history = run.close()
    return history


def train_one_epoch(run: DenseRun, dataset: CocoDetection) -> float:
    """One pass over the data from ``run.step_in_epoch``; returns its wall time."""
    cfg, rt, t0 = run.cfg, run.rt, time.time()
    run.ddp.train()
    loader = run.loader(dataset, detection_collate)
    with progress_bar(loader, main=rt.main, desc=f"epoch {run.epoch + 1}/{cfg.epochs}", initial=run.step_in_epoch,
                  total=run.batches_per_pass(dataset)) as bar:
        for images, targets, bad in bar:
            run.unreadable.add(bad, len(images))
            if run.has_data(len(images)):
                images = [im.to(rt.device, non_blocking=True) for im in images]
                targets = [{k: (v.to(rt.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
                with rt.autocast():
                    losses = run.ddp(images, targets)
                run.step(losses, detection_lr(cfg, run.epoch, run.iteration),
                         f"epoch {run.epoch + 1}, iteration {run.iteration + 1}")
                loss = run.sums["loss"] / run.steps
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.opt.param_groups[0]['lr']:.2e}", refresh=False)
                if run.iteration % cfg.log_every == 0:
                    run.metrics.scalar("train/loss", loss, run.iteration)
            run.step_in_epoch += 1
            run.end_of_batch()
    return time.time() - t0


def evaluate_detection(model: torch.nn.Module, ds: CocoDetection, rt: Runtime | None = None, workers: int = 2,
                       progress: bool = False) -> dict:
    """COCO AP with pycocotools' COCOeval (bbox; and segm for Mask R-CNN), each rank detecting its share.

    Returns ``{'metrics': {...}, 'summary': COCOeval's table, 'unreadable': [...]}``; metric names as
    mmdet's (``bbox_mAP``, ``bbox_mAP_50``...). Unreadable images are left out of the scores and listed.
    """
    require("pycocotools", "dense", "COCO evaluation")
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rt = rt or setup()
    loader = D.make_loader(Subset(ds, range(rt.rank, len(ds), rt.world)), 1, None, workers,
                           collate_fn=detection_collate)
    results, unreadable = [], []
    for images, targets, bad in progress_bar(loader, main=progress and rt.main, desc="eval"):
        unreadable += bad
        if not images:
            continue
        for out, t in zip(detect(model, list(images), rt), targets):
            boxes = out["boxes"].numpy()
            for j in range(len(boxes)):
                x0, y0, x1, y1 = (float(v) for v in boxes[j])
                r = {"image_id": t["image_id"], "category_id": ds.label_to_cat[int(out["labels"][j])],
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(out["scores"][j])}
                if "masks" in out:
                    m = np.asfortranarray((out["masks"][j, 0] > 0.5).numpy().astype(np.uint8))
                    rle = mask_utils.encode(m)
                    rle["counts"] = rle["counts"].decode("ascii")
                    r["segmentation"] = rle
                results.append(r)
    results = [r for part in rt.gather(results) for r in part]
    unreadable = sorted({b for part in rt.gather(unreadable) for b in part})
    iou_types = ["bbox", "segm"] if ds.masks else ["bbox"]
    names = ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"]
    if not results:
        return {"metrics": {f"{t}_{n}": 0.0 for t in iou_types for n in names}, "summary": "no detections",
                "unreadable": unreadable}
    metrics, summary = {}, []
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        gt = COCO()
        gt.dataset = ds.coco
        gt.createIndex()
        dt = gt.loadRes(results)
    skipped = {b.path for b in unreadable}
    for t in iou_types:
        ev = COCOeval(gt, dt, t)
        ev.params.imgIds = [im["id"] for im in ds.images if str(ds.images_dir / im["file_name"]) not in skipped]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        summary.append(f"{t}:\n{buf.getvalue().split('DONE', 2)[-1].split(chr(10), 1)[-1]}")
        metrics.update({f"{t}_{n}": float(max(v, 0.0)) for n, v in zip(names, ev.stats[:6])})
    return {"metrics": metrics, "summary": "\n".join(summary), "unreadable": unreadable}

"""Semantic segmentation: train and evaluate Semantic FPN on a MetaFormer (ADE20K-layout data).

Every knob is a field of :class:`SegmentationConfig`; the defaults are the mmseg settings of
PoolFormer's ADE20K experiments (Yu et al., CVPR 2022; docs/dense.md, "The paper's settings:
ADE20K"): AdamW 2e-4, weight decay 1e-4, poly decay (power 0.9) over 40k iterations, 512x512
crops, batch 32 over 8 GPUs. Training counts iterations, mmseg-style;
each pass over the data seeds its own order, so a resumed run draws the same batches. The
run's machinery is shared with detection (:class:`~metaformer.tasks.dense.run.DenseRun`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import unwrap_model

from ..data import Unreadable, collate_skip_unreadable
from ..engine.loop import format_row, progress_bar
from ..engine.runtime import Runtime, setup
from ..engine.stop import GracefulStop
from ..errors import ConfigError
from ..models.metaformer import MIN_INPUT
from .dense.data import IGNORE_INDEX, SegmentationDataset
from .dense.models.segmenter import build_segmenter, segment_logits
from .dense.run import DenseRun


@dataclass
class SegmentationConfig:
    data_root: str = ""
    train_split: str = "training"
    val_split: str | None = "validation"
    output: str = "runs/segment"
    backbone: str = "poolformer_s12"
    backbone_overrides: dict = field(default_factory=dict)
    pretrained: str | None = None  # ImageNet weights for the backbone (a tag or a file)
    frozen_stages: int = -1
    num_classes: int = 150  # ADE20K
    reduce_zero_label: bool = True
    fpn_channels: int = 256
    head_channels: int = 128
    img_scale: list = field(default_factory=lambda: [2048, 512])
    crop_size: int = 512
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    iters: int = 40_000
    lr: float = 2e-4
    weight_decay: float = 1e-4
    power: float = 0.9  # poly decay to 0
    batch_size: int = 4  # per process; the paper: 8 GPUs x 4 = 32
    workers: int = 4
    amp: str = "auto"  # auto (bf16 on GPU), none, bf16, fp16
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False  # replace an earlier run in `output` (else refused)
    ckpt_every: int = 4000
    eval_every: int = 4000
    mode: str = "whole"  # test mode for the periodic evaluation
    log_every: int = 50
    device: str | None = None
    wandb: str | None = None  # a Weights & Biases project


def train_segmentation(cfg: SegmentationConfig) -> list[dict]:
    """Iteration-based training; returns the log rows (mean losses every ``log_every`` and the evaluations).

    A batch of only unreadable files still counts as an iteration, so a resumed run stays aligned.
    """
    if min(cfg.iters, cfg.log_every, cfg.ckpt_every, cfg.eval_every) < 1:
        raise ConfigError("--iters, --log-every, --ckpt-every and --eval-every must be at least 1")
    if min(cfg.crop_size, *cfg.img_scale) < MIN_INPUT:
        raise ConfigError(f"--crop-size {cfg.crop_size} / --img-scale {' '.join(map(str, cfg.img_scale))}: each must "
                          f"be at least {MIN_INPUT}, since the backbone downsamples by 32")
    if not 0 < cfg.ratio_range[0] <= cfg.ratio_range[1]:
        raise ConfigError(f"--ratio-range takes MIN MAX with 0 < MIN <= MAX, got {cfg.ratio_range}")
    rt = setup(cfg.device, cfg.amp)
    return DenseRun.train_in_folder(cfg, rt, lambda folder: _train(cfg, rt, folder))


def _train(cfg, rt, folder) -> list[dict]:
    """The run inside its open folder."""
    ckpt = folder.load("segment")
    model_config = ckpt["model_config"] if ckpt else dict(
        backbone_name=cfg.backbone, num_classes=cfg.num_classes, frozen_stages=cfg.frozen_stages,
        fpn_channels=cfg.fpn_channels, head_channels=cfg.head_channels,
        backbone_overrides=dict(cfg.backbone_overrides))
    data_kw = dict(num_classes=model_config["num_classes"], reduce_zero_label=cfg.reduce_zero_label,
                   img_scale=tuple(cfg.img_scale), crop_size=cfg.crop_size, ratio_range=tuple(cfg.ratio_range))
    train_ds = SegmentationDataset(cfg.data_root, cfg.train_split, train=True, **data_kw)
    val_ds = SegmentationDataset(cfg.data_root, cfg.val_split, **data_kw) if cfg.val_split else None
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_segmenter(**model_config, pretrained_backbone=None if ckpt else cfg.pretrained)
    run = DenseRun("segment", cfg, rt, folder, ckpt, model, {
        "model_config": model_config, "reduce_zero_label": cfg.reduce_zero_label, "img_scale": list(cfg.img_scale),
        "crop_size": cfg.crop_size}, "iteration")
    validate = None
    if val_ds is not None:
        def validate() -> dict:
            res = evaluate_segmentation(run.model, val_ds, rt, cfg.mode, cfg.crop_size)
            res.pop("IoU_per_class")  # kept out of the log rows; `metaformer segment eval --json` prints it
            return res
    per_pass = run.batches_per_pass(train_ds)
    with GracefulStop(rt.log) as run.stop:
        try:
            run.redo_pending_eval(validate)
            t0 = time.time()
            while run.iteration < cfg.iters:
                run.epoch, run.step_in_epoch = divmod(run.iteration, per_pass)
                train_pass(run, train_ds, per_pass, validate, t0)
        finally:
            history = run.close()
    return history


def train_pass(run: DenseRun, dataset: SegmentationDataset, per_pass: int, validate, t0: float) -> None:
    """Iterations from ``run.iteration`` to the end of this pass over the data (or ``cfg.iters``)."""
    cfg, rt = run.cfg, run.rt
    run.ddp.train()
    with progress_bar(main=rt.main, total=cfg.iters, initial=run.iteration, desc="iterations") as bar:
        for x, y, bad in run.loader(dataset, collate_skip_unreadable):
            if run.iteration >= cfg.iters:
                break
            run.unreadable.add(bad, len(x))
            if run.has_data(len(x)):
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                with rt.autocast():
                    loss = F.cross_entropy(run.ddp(x).float(), y, ignore_index=IGNORE_INDEX)
                run.step({"loss": loss}, cfg.lr * (1 - run.iteration / cfg.iters) ** cfg.power,
                         f"iteration {run.iteration + 1}")
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{run.opt.param_groups[0]['lr']:.2e}", refresh=False)
            else:
                run.iteration += 1
            run.epoch, run.step_in_epoch = divmod(run.iteration, per_pass)  # a pass ends as its last batch does
            bar.update()
            checkpoint_and_evaluate(run, validate, t0)
            run.end_of_batch()


def checkpoint_and_evaluate(run: DenseRun, validate, t0: float) -> None:
    """After an iteration: a log row every ``log_every``, a checkpoint every ``ckpt_every``, an evaluation
    every ``eval_every`` (after its checkpoint), and all three at the end."""
    cfg = run.cfg
    it, row = run.iteration, None
    if it % cfg.log_every == 0 or it == cfg.iters:
        bad_files = run.skipped(f"up to iteration {it}")
        row = {"iteration": it, **run.take_means(), "lr": run.opt.param_groups[0]["lr"],
               "time_s": round(time.time() - t0, 1), "unreadable": len(bad_files)}
        run.metrics.add(row)
    eval_due = validate is not None and (it % cfg.eval_every == 0 or it == cfg.iters)
    if eval_due and row is None:
        row = {"iteration": it}
        run.metrics.add(row)
    if eval_due or it % cfg.ckpt_every == 0 or it == cfg.iters:
        run.save(pending_eval=eval_due)  # on disk before the evaluation runs
    if eval_due:
        run.evaluate_into(row, validate)
    if row is not None:
        run.rt.log(f"iteration {it}/{cfg.iters}  " + format_row(row, ("loss", "mIoU", "mAcc", "aAcc", "lr", "time_s",
                                                                      "unreadable", "val_unreadable")))


def evaluate_segmentation(model: torch.nn.Module, ds: SegmentationDataset, rt: Runtime | None = None,
                          mode: str = "whole", crop: int = 512, progress: bool = False) -> dict:
    """mIoU (mean over classes present in prediction or label), mean class accuracy and pixel
    accuracy (``aAcc``), on labels at their original size, as mmseg reports them; each rank scores
    its share and the confusion matrices are summed. ``unreadable`` lists the images (or labels)
    that could not be read and were left out."""
    rt = rt or setup()
    model = unwrap_model(model).eval()  # the model inside DDP / torch.compile
    k = model.num_classes
    hist = torch.zeros(k * k, dtype=torch.float64, device=rt.device)
    unreadable = []
    for i in progress_bar(range(rt.rank, len(ds), rt.world), main=progress and rt.main, desc="eval"):
        item = ds[i]
        if isinstance(item, Unreadable):  # left out of the scores and listed
            unreadable.append(item)
            continue
        x, y = item
        with rt.autocast():
            logits = segment_logits(model, x[None].to(rt.device), mode, crop).float()
        pred = F.interpolate(logits, size=y.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        y = y.to(rt.device)
        valid = y != IGNORE_INDEX
        hist += torch.bincount(y[valid] * k + pred[valid], minlength=k * k).double()
    hist = rt.all_reduce_sum(hist).cpu().view(k, k)  # rows: label, columns: prediction
    tp = hist.diag()
    union = hist.sum(0) + hist.sum(1) - tp
    iou = tp / union  # nan for a class absent from both: left out of the mean
    acc = tp / hist.sum(1)
    return {"mIoU": float(np.nanmean(iou.numpy())) if (union > 0).any() else 0.0,
            "mAcc": float(np.nanmean(acc.numpy())) if (hist.sum(1) > 0).any() else 0.0,
            "aAcc": float(tp.sum() / hist.sum().clamp(min=1)),
            "IoU_per_class": [None if math.isnan(v) else round(float(v), 4) for v in iou.tolist()],
            "unreadable": sorted({b for part in rt.gather(unreadable) for b in part})}

"""Train and evaluate loops for detection and segmentation, as plain loops (nanoGPT-style).

Every knob is a field of :class:`DetectionConfig` / :class:`SegmentationConfig`; their
defaults are the paper's settings (REFERENCE §5). DDP comes from ``torchrun`` (its
environment variables), AMP from ``amp='bf16'|'fp16'``. A checkpoint (written atomically)
holds the model, the optimizer, the AMP scaler, the position in the schedule and the
configs, so ``resume`` continues where a run stopped and eval/predict rebuild the model
from the file alone.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from ...atomic import atomic_write
from ...data import DataError, Unreadable, UnreadableLog, collate_skip_unreadable
from ...engine.checkpoint import CheckpointError, check_output, prepare_output
from ...engine.checkpoint import save as save_checkpoint
from ...engine.runtime import on_main
from ...engine.stop import GracefulStop, Interrupted, TrainingDiverged
from ...errors import ConfigError, require
from .data import IGNORE_INDEX, CocoDetection, SegmentationDataset, detection_collate
from .detection import build_detector
from .segmentation import build_segmenter

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------
# Runtime: devices, DDP, AMP, checkpoints
# --------------------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, *a: Any) -> None:
        if self.main:
            print(*a, flush=True)


def setup_runtime(device: str | None = None) -> Runtime:
    """Join the torchrun process group when launched by torchrun; otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return Runtime(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Runtime(0, 1, dev)


def autocast(rt: Runtime, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ConfigError(f"unknown --amp {amp!r}: use bf16 or fp16")
    return torch.autocast(rt.device.type, dtype=AMP_DTYPES[amp])


def load_checkpoint(path: str | os.PathLike, task: str) -> dict:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"--checkpoint {path} is a folder: pass the checkpoint inside it, e.g. {path}/last.pth")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint never runs code
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).strip().splitlines()[0][:200]}; it is "
                              "probably truncated or corrupt") from None
    if not isinstance(ckpt, dict) or ckpt.get("task") != task:
        what = ckpt.get("task") if isinstance(ckpt, dict) else None
        if what is None and isinstance(ckpt, dict) and "model_config" in ckpt:
            what = "train"  # a classifier of `metaformer train`
        raise CheckpointError(f"{path} is not a 'metaformer {task}' checkpoint"
                              + (f" (it is from 'metaformer {what}')" if what else ""))
    return ckpt


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _wrap_ddp(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    if rt.world == 1:
        return model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _seed(seed: int, rt: Runtime) -> None:
    random.seed(seed + rt.rank)
    np.random.seed(seed + rt.rank)
    torch.manual_seed(seed + rt.rank)


def _loader(ds, batch_size: int, workers: int, rt: Runtime, train: bool, epoch: int, seed: int, collate=None,
            skip_batches: int = 0):
    if rt.world > 1:
        sampler = DistributedSampler(ds, rt.world, rt.rank, shuffle=train, seed=seed, drop_last=train)
        sampler.set_epoch(epoch)
    elif train:  # the order depends only on (seed, epoch): a resumed run sees the same batches
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        sampler = SequentialSampler(ds)
    if skip_batches:  # resuming mid-pass: leave out the batches already trained on, without loading them
        sampler = list(sampler)[skip_batches * batch_size:]
    # The loader's own generator seeds its workers, leaving the global RNG (saved in checkpoints) untouched.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed + 7919 * epoch),
                      drop_last=train and len(ds) >= batch_size * rt.world, persistent_workers=False)


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # As the paper's mmdet/mmseg configs: one AdamW group, weight decay on every parameter.
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict | None) -> None:
    # Restored after the model is built (building draws from the RNG), so a resumed run
    # draws the same flips, crops and sampled RoIs as an uninterrupted one.
    if state:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])


def _resume(path: str | None, output: Path, task: str) -> dict | None:
    if path == "auto":
        path = str(output / "last.pth") if (output / "last.pth").is_file() else None
    return load_checkpoint(path, task) if path else None


def write_history(output: Path, history: list[dict]) -> None:
    """``metrics.jsonl``, one JSON row per log point, rewritten whole from the run's history: a resumed
    run continues it from its checkpoint (never a row twice), and a new run never appends to an old one."""
    atomic_write(output / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in history).encode()))


def _report_unreadable(rt: Runtime, bad: list, where: str) -> None:
    if bad:
        rt.log(f"  skipped {len(bad)} unreadable image(s) {where}:")
        for b in bad:
            rt.log(f"    {b.path}: {b.error}")


def _all_ranks_have_data(rt: Runtime, n: int) -> bool:
    """Whether every rank's batch holds an image (DDP needs every rank in every backward pass)."""
    if rt.world == 1:
        return n > 0
    t = torch.tensor([float(n == 0)], device=rt.device)
    dist.all_reduce(t)
    return t.item() == 0


def _stop_requested(rt: Runtime, stop: GracefulStop) -> bool:
    if rt.world == 1:
        return stop.requested
    t = torch.tensor([float(stop.requested)], device=rt.device)
    dist.all_reduce(t)
    return t.item() > 0


# --------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------

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
    pretrained: str | None = None  # ImageNet checkpoint for the backbone
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
    amp: str | None = None
    seed: int = 0
    resume: str | None = None  # a checkpoint, or "auto" for OUTPUT/last.pth
    overwrite: bool = False  # replace an earlier run in `output` (else refused)
    log_every: int = 50
    device: str | None = None


def detection_lr(cfg: DetectionConfig, epoch: int, it: int) -> float:
    lr = cfg.lr * 0.1 ** sum(epoch >= s for s in cfg.lr_steps)
    if it < cfg.warmup_iters:
        lr *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * it / cfg.warmup_iters
    return lr


def build_detector_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    model = build_detector(ckpt["arch"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model


def train_detection(cfg: DetectionConfig) -> list[dict]:
    """Train a detector; returns one row per epoch (mean losses, and COCO AP when a val set is given).

    Never loses work: the epoch's checkpoint is written before the evaluation (an evaluation that
    dies is redone on resume), Ctrl-C saves at the next step, unreadable images are skipped and listed.
    """
    rt = setup_runtime(cfg.device)
    output = Path(cfg.output)
    on_main(lambda: check_output(output, bool(cfg.resume), cfg.overwrite), rt.main)
    _seed(cfg.seed, rt)
    ckpt = _resume(cfg.resume, output, "detect")
    masks = (ckpt["arch"] if ckpt else cfg.arch) == "mask_rcnn"
    train_ds = CocoDetection(cfg.train_images, cfg.train_ann, train=True, masks=masks)
    val_ds = CocoDetection(cfg.val_images, cfg.val_ann, masks=masks) if cfg.val_ann else None
    if ckpt:
        if ckpt["class_names"] != train_ds.class_names:
            raise ConfigError(f"{cfg.train_ann} has categories {train_ds.class_names} but the checkpoint was trained "
                              f"on {ckpt['class_names']}")
        arch, model_config = ckpt["arch"], ckpt["model_config"]
        model = build_detector(arch, **model_config)
        model.load_state_dict(ckpt["model"])
    else:
        arch = cfg.arch
        model_config = dict(backbone_name=cfg.backbone, num_classes=train_ds.num_classes,
                            frozen_stages=cfg.frozen_stages, fpn_channels=cfg.fpn_channels, min_size=cfg.min_size,
                            max_size=cfg.max_size, backbone_overrides=dict(cfg.backbone_overrides),
                            **cfg.detector_options)
        model = build_detector(arch, pretrained_backbone=cfg.pretrained, **model_config)
    model.to(rt.device)
    ddp = _wrap_ddp(model, rt)
    opt = _optimizer(model, cfg.lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=cfg.amp == "fp16")
    start_epoch, start_step, it, history, pending_eval = 0, 0, 0, [], False
    sums: dict[str, float] = {}
    n = 0
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step, it = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["iteration"]
        history, pending_eval = list(ckpt.get("history", [])), ckpt.get("pending_eval", False)
        sums, n = dict(ckpt.get("epoch_sums") or {}), ckpt.get("epoch_steps", 0)
        _set_rng_state(ckpt.get("rng"))
        rt.log(f"resumed at epoch {start_epoch + 1}, step {start_step} (iteration {it})")
    on_main(lambda: prepare_output(output, bool(cfg.resume), cfg.overwrite), rt.main)
    if rt.main:
        write_history(output, history)
    unreadable = UnreadableLog()

    def save(epoch: int, step_in_epoch: int, pending: bool = False) -> None:
        if rt.main:
            save_checkpoint({"task": "detect", "arch": arch, "model_config": model_config,
                             "class_names": train_ds.class_names, "categories": train_ds.categories,
                             "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                             "epoch": epoch, "step_in_epoch": step_in_epoch, "iteration": it, "history": history,
                             "pending_eval": pending, "epoch_sums": sums, "epoch_steps": n, "config": asdict(cfg),
                             "rng": _rng_state()}, output / "last.pth")

    def validate(epoch: int) -> None:
        """Evaluate the finished epoch (its checkpoint is already on disk), then record and save again."""
        res = evaluate_detection(model, val_ds, rt, cfg.amp, cfg.workers)
        _report_unreadable(rt, res["unreadable"], "in the validation set")
        history[-1].update(res["metrics"], val_unreadable=len(res["unreadable"]))
        save(epoch, 0)
        if rt.main:
            write_history(output, history)
        rt.log(json.dumps(history[-1]))

    with GracefulStop(rt.log) as stop:
        if pending_eval and val_ds is not None:
            validate(start_epoch)
        for epoch in range(start_epoch, cfg.epochs):
            ddp.train()
            loader = _loader(train_ds, cfg.batch_size, cfg.workers, rt, True, epoch, cfg.seed, detection_collate,
                             skip_batches=start_step)
            t0 = time.time()
            for step, (images, targets, bad) in enumerate(loader, start=start_step):
                unreadable.add(bad, len(images))
                if _all_ranks_have_data(rt, len(images)):
                    _set_lr(opt, detection_lr(cfg, epoch, it))
                    images = [im.to(rt.device, non_blocking=True) for im in images]
                    targets = [{k: (v.to(rt.device) if torch.is_tensor(v) else v) for k, v in t.items()}
                               for t in targets]
                    with autocast(rt, cfg.amp):
                        losses = ddp(images, targets)
                    loss = sum(losses.values())
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"loss is {loss.item()} at epoch {epoch + 1}, iteration {it}: stopped without applying "
                            f"it; last checkpoint: {output / 'last.pth'}. "
                            + ("fp16 overflow? try --amp bf16 or no AMP" if cfg.amp == "fp16" else "try a lower --lr"))
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                    n += 1
                    it += 1
                    if it % cfg.log_every == 0:
                        rt.log(f"epoch {epoch + 1} iter {it} lr {opt.param_groups[0]['lr']:.2e} "
                               + " ".join(f"{k} {v:.4f}" for k, v in losses.items())
                               + f" loss {float(loss.detach()):.4f}")
                if _stop_requested(rt, stop):
                    save(epoch, step + 1)
                    raise Interrupted(f"stopped by {stop.signal or 'another rank'} at epoch {epoch + 1}, iteration "
                                      f"{it}; saved {output / 'last.pth'}. Continue with the same command plus "
                                      "--resume auto")
            start_step = 0
            bad = unreadable.end_epoch()
            _report_unreadable(rt, bad, f"in epoch {epoch + 1}")
            history.append({"epoch": epoch + 1, "iteration": it, "time_s": round(time.time() - t0, 2),
                            **{k: v / max(n, 1) for k, v in sums.items()}, "unreadable": len(bad)})
            sums, n = {}, 0
            save(epoch + 1, 0, pending=val_ds is not None)  # the epoch is safe before evaluating it
            if val_ds is not None:
                validate(epoch + 1)
            else:
                if rt.main:
                    write_history(output, history)
                rt.log(json.dumps(history[-1]))
    return history


def _gather(items: list, rt: Runtime) -> list:
    if rt.world == 1:
        return items
    out: list[list] = [None] * rt.world  # type: ignore[list-item]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


@torch.no_grad()
def detect(model: torch.nn.Module, images: list[torch.Tensor], rt: Runtime, amp: str | None = None) -> list[dict]:
    model.eval()
    with autocast(rt, amp):
        out = model([im.to(rt.device) for im in images])
    return [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in out]


def evaluate_detection(model: torch.nn.Module, ds: CocoDetection, rt: Runtime | None = None, amp: str | None = None,
                       workers: int = 2) -> dict:
    """COCO AP with pycocotools' COCOeval (bbox; and segm for Mask R-CNN). Returns
    ``{'metrics': {...}, 'summary': text}``; metric names as mmdet (``bbox_mAP``, ``bbox_mAP_50``...)."""
    require("pycocotools", "dense", "COCO evaluation")
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rt = rt or setup_runtime()
    model = _unwrap(model)
    idx = list(range(rt.rank, len(ds), rt.world))
    sub = torch.utils.data.Subset(ds, idx)
    loader = DataLoader(sub, batch_size=1, num_workers=workers, collate_fn=detection_collate)
    results, unreadable = [], []
    for images, targets, bad in loader:
        unreadable += bad
        if not images:
            continue
        for out, t in zip(detect(model, list(images), rt, amp), targets):
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
    results, unreadable = _gather(results, rt), sorted(set(_gather(unreadable, rt)))
    iou_types = ["bbox", "segm"] if ds.masks else ["bbox"]
    names = ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"]
    metrics: dict[str, float] = {}
    summary = []
    if not results:
        return {"metrics": {f"{t}_{n}": 0.0 for t in iou_types for n in names}, "summary": "no detections",
                "unreadable": unreadable}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        gt = COCO()
        gt.dataset = ds.coco
        gt.createIndex()
        dt = gt.loadRes(results)
    for t in iou_types:
        ev = COCOeval(gt, dt, t)
        # Unreadable images are left out of the scores (and listed), not scored as if nothing were found in them.
        skipped = {b.path for b in unreadable}
        ev.params.imgIds = [im["id"] for im in ds.images if str(ds.images_dir / im["file_name"]) not in skipped]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        summary.append(f"{t}:\n{buf.getvalue().split('DONE', 2)[-1].split(chr(10), 1)[-1]}")
        metrics.update({f"{t}_{n}": float(max(v, 0.0)) for n, v in zip(names, ev.stats[:6])})
    return {"metrics": metrics, "summary": "\n".join(summary), "unreadable": unreadable}


# --------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------

@dataclass
class SegmentationConfig:
    data_root: str = ""
    train_split: str = "training"
    val_split: str | None = "validation"
    output: str = "runs/segment"
    backbone: str = "poolformer_s12"
    backbone_overrides: dict = field(default_factory=dict)
    pretrained: str | None = None
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
    amp: str | None = None
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False  # replace an earlier run in `output` (else refused)
    ckpt_every: int = 4000
    eval_every: int = 4000
    mode: str = "whole"  # test mode for the periodic evaluation
    log_every: int = 50
    device: str | None = None


def build_segmenter_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    model = build_segmenter(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model


def train_segmentation(cfg: SegmentationConfig) -> list[dict]:
    """Iteration-based training (mmseg style); returns the log rows (losses and evaluations).

    Never loses work: a checkpoint is written before every evaluation (one that dies is redone on
    resume), Ctrl-C saves at the next step, unreadable images or labels are skipped and listed (a
    batch of only unreadable files still counts as an iteration, so resume stays aligned).
    """
    rt = setup_runtime(cfg.device)
    output = Path(cfg.output)
    on_main(lambda: check_output(output, bool(cfg.resume), cfg.overwrite), rt.main)
    _seed(cfg.seed, rt)
    ckpt = _resume(cfg.resume, output, "segment")
    model_config = ckpt["model_config"] if ckpt else dict(
        backbone_name=cfg.backbone, num_classes=cfg.num_classes, frozen_stages=cfg.frozen_stages,
        fpn_channels=cfg.fpn_channels, head_channels=cfg.head_channels,
        backbone_overrides=dict(cfg.backbone_overrides))
    data_kw = dict(num_classes=model_config["num_classes"], reduce_zero_label=cfg.reduce_zero_label,
                   img_scale=tuple(cfg.img_scale), crop_size=cfg.crop_size, ratio_range=tuple(cfg.ratio_range))
    train_ds = SegmentationDataset(cfg.data_root, cfg.train_split, train=True, **data_kw)
    val_ds = SegmentationDataset(cfg.data_root, cfg.val_split, **data_kw) if cfg.val_split else None
    model = build_segmenter(**model_config, pretrained_backbone=None if ckpt else cfg.pretrained)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    model.to(rt.device)
    ddp = _wrap_ddp(model, rt)
    opt = _optimizer(model, cfg.lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=cfg.amp == "fp16")
    it, history, pending_eval, loss_sum, n = 0, [], False, 0.0, 0
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        it, history, pending_eval = ckpt["iteration"], list(ckpt.get("history", [])), ckpt.get("pending_eval", False)
        loss_sum, n = ckpt.get("loss_sum", 0.0), ckpt.get("loss_steps", 0)
        _set_rng_state(ckpt.get("rng"))
        rt.log(f"resumed at iteration {it}")
    on_main(lambda: prepare_output(output, bool(cfg.resume), cfg.overwrite), rt.main)
    if rt.main:
        write_history(output, history)
    unreadable = UnreadableLog()

    def save(pending: bool = False) -> None:
        if rt.main:
            save_checkpoint({"task": "segment", "model_config": model_config, "model": model.state_dict(),
                             "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "iteration": it,
                             "history": history, "pending_eval": pending, "loss_sum": loss_sum, "loss_steps": n,
                             "config": asdict(cfg), "rng": _rng_state(), "reduce_zero_label": cfg.reduce_zero_label,
                             "img_scale": list(cfg.img_scale), "crop_size": cfg.crop_size}, output / "last.pth")

    def validate() -> None:
        """Evaluate at iteration ``it`` (its checkpoint is already on disk), then record and save again."""
        res = evaluate_segmentation(model, val_ds, rt, cfg.mode, cfg.crop_size, cfg.amp)
        bad = res.pop("unreadable")
        _report_unreadable(rt, bad, "in the validation set")
        if not history or history[-1].get("iteration") != it:
            history.append({"iteration": it})
        history[-1].update(res, val_unreadable=len(bad))
        save()
        ddp.train()

    def record(row: dict | None) -> None:
        if row is not None:
            rt.log(json.dumps({k: v for k, v in row.items() if k != "IoU_per_class"}))
        if rt.main:
            write_history(output, history)

    # Each pass over the data is an "epoch" seeding the sampler, so a resumed run draws the same batches.
    per_epoch = max(1, len(train_ds) // (cfg.batch_size * rt.world))
    ddp.train()
    t0 = time.time()
    with GracefulStop(rt.log) as stop:
        if pending_eval and val_ds is not None:
            validate()
            record(history[-1])
        while it < cfg.iters:
            epoch = it // per_epoch
            loader = _loader(train_ds, cfg.batch_size, cfg.workers, rt, True, epoch, cfg.seed,
                             collate=collate_skip_unreadable, skip_batches=it - epoch * per_epoch)
            for x, y, bad in loader:
                if it >= cfg.iters:
                    break
                unreadable.add(bad, len(x))
                if _all_ranks_have_data(rt, len(x)):
                    _set_lr(opt, cfg.lr * (1 - it / cfg.iters) ** cfg.power)
                    x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                    with autocast(rt, cfg.amp):
                        loss = F.cross_entropy(ddp(x).float(), y, ignore_index=IGNORE_INDEX)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"loss is {loss.item()} at iteration {it}: stopped without applying "
                                               f"it; last checkpoint: {output / 'last.pth'}. Try a lower --lr"
                                               + (" or --amp bf16" if cfg.amp == "fp16" else ""))
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    loss_sum, n = loss_sum + float(loss.detach()), n + 1
                it += 1
                row = None
                if it % cfg.log_every == 0 or it == cfg.iters:
                    skipped = unreadable.end_epoch()
                    _report_unreadable(rt, skipped, f"up to iteration {it}")
                    row = {"iteration": it, "loss": loss_sum / max(n, 1), "lr": opt.param_groups[0]["lr"],
                           "time_s": round(time.time() - t0, 2), "unreadable": len(skipped)}
                    history.append(row)
                    loss_sum, n = 0.0, 0
                eval_due = val_ds is not None and (it % cfg.eval_every == 0 or it == cfg.iters)
                if eval_due or it % cfg.ckpt_every == 0 or it == cfg.iters:
                    save(pending=eval_due)  # safe on disk before the evaluation
                if eval_due:
                    validate()
                    row = history[-1]
                if row is not None:
                    record(row)
                if _stop_requested(rt, stop):
                    save()
                    raise Interrupted(f"stopped by {stop.signal or 'another rank'} at iteration {it}; saved "
                                      f"{output / 'last.pth'}. Continue with the same command plus --resume auto")
    return history


@torch.no_grad()
def segment_logits(model: torch.nn.Module, x: torch.Tensor, mode: str = "whole", crop: int = 512,
                   stride: int | None = None) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` for normalised images: one pass (``whole``) or mmseg's sliding
    window (``slide``: ``crop`` windows every ``stride`` = 2/3 crop px, overlaps averaged)."""
    if mode == "whole":
        return model(x)
    if mode != "slide":
        raise ConfigError(f"unknown test mode {mode!r}: use whole or slide")
    stride = stride or crop * 2 // 3
    b, _, h, w = x.shape
    logits = x.new_zeros((b, model.num_classes, h, w))
    count = x.new_zeros((1, 1, h, w))
    for gy in range(max(h - crop + stride - 1, 0) // stride + 1):
        for gx in range(max(w - crop + stride - 1, 0) // stride + 1):
            y1, x1 = min(gy * stride + crop, h), min(gx * stride + crop, w)
            y0, x0 = max(y1 - crop, 0), max(x1 - crop, 0)
            logits[:, :, y0:y1, x0:x1] += model(x[:, :, y0:y1, x0:x1]).float()
            count[:, :, y0:y1, x0:x1] += 1
    return logits / count


def evaluate_segmentation(model: torch.nn.Module, ds: SegmentationDataset, rt: Runtime | None = None,
                          mode: str = "whole", crop: int = 512, amp: str | None = None) -> dict:
    """mIoU (mean over classes present in prediction or label), mean class accuracy and pixel
    accuracy (``aAcc``), on labels at their original size, as mmseg reports them; ``unreadable``
    lists the images (or labels) that could not be read and were left out."""
    rt = rt or setup_runtime()
    model = _unwrap(model).eval()
    k = model.num_classes
    hist = torch.zeros(k * k, dtype=torch.float64)
    unreadable = []
    for i in range(rt.rank, len(ds), rt.world):
        item = ds[i]
        if isinstance(item, Unreadable):  # left out of the scores and listed
            unreadable.append(item)
            continue
        x, y = item
        with autocast(rt, amp):
            logits = segment_logits(model, x[None].to(rt.device), mode, crop).float()
        pred = F.interpolate(logits, size=y.shape, mode="bilinear", align_corners=False).argmax(1)[0].cpu()
        valid = y != IGNORE_INDEX
        hist += torch.bincount(y[valid] * k + pred[valid], minlength=k * k).double()
    if rt.world > 1:
        hist = hist.to(rt.device)
        dist.all_reduce(hist)
        hist = hist.cpu()
    hist = hist.view(k, k)  # rows: label, columns: prediction
    tp = hist.diag()
    union = hist.sum(0) + hist.sum(1) - tp
    iou = tp / union  # nan for a class absent from both: left out of the mean
    acc = tp / hist.sum(1)
    return {"mIoU": float(np.nanmean(iou.numpy())) if (union > 0).any() else 0.0,
            "mAcc": float(np.nanmean(acc.numpy())) if (hist.sum(1) > 0).any() else 0.0,
            "aAcc": float(tp.sum() / hist.sum().clamp(min=1)),
            "IoU_per_class": [None if math.isnan(v) else round(float(v), 4) for v in iou.tolist()],
            "unreadable": sorted(set(_gather(unreadable, rt)))}


def iter_images(paths: Iterable[str]) -> list[Path]:
    """Image files from a list of files and folders (a folder: its images, sorted)."""
    from .data import IMAGE_EXTENSIONS

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p} not found")
    if not out:
        raise DataError(f"no images found in {', '.join(map(str, paths))}")
    return out

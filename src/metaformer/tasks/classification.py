"""Train a MetaFormer with the paper's recipe, from one CPU to many GPUs.

The recipe is timm's, not rewritten: ``create_optimizer_v2`` (AdamW, no decay on what
``model.no_weight_decay()`` names), ``create_scheduler_v2`` (warm-up then cosine, stepped per
update), ``Mixup`` + ``SoftTargetCrossEntropy``, ``LabelSmoothingCrossEntropy``,
``create_transform`` (RandAugment, random erasing) and ``ModelEmaV3``.

Configuration: :class:`TrainConfig` holds the paper's ImageNet defaults; :data:`DEMO` scales
them down for the built-in digits. ``resolve_config`` layers defaults < YAML < flags.

Exact resume: every epoch re-seeds python/numpy/torch and the loader generator from
``(seed, epoch, rank)`` and the sampler shuffles by epoch, so an epoch's data order,
augmentation, Mixup and drop-path draws do not depend on what ran before it. Together with
the model/optimizer/scheduler/scaler/EMA state this makes a resumed CPU run bit-identical to
an uninterrupted one. A Ctrl-C checkpoint is taken between optimizer steps and resumes at
the next batch of the same epoch order.

Run under ``torchrun`` for DistributedDataParallel (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
import yaml

from .. import data as D
from .. import yaml12
from ..engine.checkpoint import check_output, prepare_output, reconcile_best, save_pair
from ..engine.runtime import on_main
from ..engine.stop import GracefulStop, Interrupted, TrainingDiverged
from ..errors import ConfigError, require
from ..fast.training import enable_fast_training
from ..zoo import create_model, get_model_info


@dataclass
class TrainConfig:
    # model
    model: str = field(default="poolformer_s12", metadata={"help": "variant name (see `metaformer info --list`)"})
    depths: list[int] | None = field(default=None, metadata={"help": "blocks per stage, overriding the variant's"})
    dims: list[int] | None = field(default=None, metadata={"help": "channels per stage, overriding the variant's"})
    drop_path: float | None = field(default=None, metadata={"help": "stochastic depth rate (default: the variant's)"})
    model_kwargs: dict = field(default_factory=dict, metadata={
        "help": "other MetaFormer arguments as YAML, e.g. \"{token_mixers: identity, norm: ln}\""})
    # data
    data: str | None = field(default=None, metadata={
        "help": "ImageNet-layout root with train/ and val/ class folders; 'builtin' or omitted: the digits"})
    img_size: int = field(default=224, metadata={"help": "training and eval resolution"})
    workers: int = field(default=8, metadata={"help": "DataLoader worker processes per rank"})
    strict_data: bool = field(default=False, metadata={"help": "stop at the first unreadable image instead of skipping"})
    # optimisation (paper: batch 4096, lr 4e-3 = 1e-3 per 1024 images)
    epochs: int = field(default=300, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "images per process per micro-step"})
    accum_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step (gradient accumulation)"})
    base_lr: float = field(default=1e-3, metadata={"help": "lr per 1024 images of global batch"})
    lr: float | None = field(default=None, metadata={"help": "absolute lr (default: base_lr x global batch / 1024)"})
    min_lr: float = field(default=1e-5, metadata={"help": "cosine floor"})
    warmup_lr: float = field(default=1e-6, metadata={"help": "lr at the start of warm-up"})
    warmup_epochs: int = field(default=5, metadata={"help": "linear warm-up epochs"})
    sched: str = field(default="cosine", metadata={"help": "timm scheduler name"})
    opt: str = field(default="adamw", metadata={"help": "timm optimizer name"})
    opt_eps: float = field(default=1e-8, metadata={"help": "optimizer epsilon"})
    opt_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "Adam betas"})
    weight_decay: float = field(default=0.05, metadata={"help": "decoupled weight decay (not on biases/norms/scales)"})
    clip_grad: float | None = field(default=None, metadata={"help": "clip the gradient norm to this (paper: none)"})
    # regularisation and augmentation
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (0: off)"})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0: off)"})
    mixup_prob: float = field(default=1.0, metadata={"help": "probability of Mixup or CutMix per batch"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "probability of CutMix when both are on"})
    aa: str | None = field(default="rand-m9-mstd0.5-inc1", metadata={"help": "timm auto-augment policy ('' : off)"})
    color_jitter: float = field(default=0.4, metadata={"help": "colour jitter (timm disables it under RandAugment)"})
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0], metadata={"help": "random-resized-crop scale"})
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip probability"})
    train_interpolation: str = field(default="random", metadata={"help": "train resize interpolation"})
    reprob: float = field(default=0.25, metadata={"help": "random erasing probability"})
    remode: str = field(default="pixel", metadata={"help": "random erasing mode"})
    recount: int = field(default=1, metadata={"help": "random erasing count"})
    ema: bool = field(default=False, metadata={"help": "keep an exponential moving average of the weights"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimizer step"})
    # speed
    amp: str = field(default="auto", metadata={"help": "mixed precision: auto (bf16 on GPU, off on CPU), none, bf16, fp16"})
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory"})
    fast_training: bool = field(default=False, metadata={
        "help": "PoolFormer blocks through metaformer.fast.training: same math, about half the activation "
                "memory, channels_last"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    # bookkeeping
    seed: int = field(default=0, metadata={"help": "random seed (each rank and epoch derives its own)"})
    output: str = field(default="runs/train", metadata={"help": "directory for checkpoints, logs and plots"})
    resume: str | None = field(default=None, metadata={
        "help": "checkpoint to resume, or 'auto' for OUTPUT/last.pth (options that change the network or the data "
                "order are refused; the others apply from here on, and the change is logged)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier run in --output instead of refusing"})
    log_interval: int = field(default=20, metadata={"help": "optimizer steps between TensorBoard points"})


# Scaled down for the built-in digits so the first run ends in ~3 minutes on 2 CPU cores:
# PoolFormer-S12's architecture at half depth and width, 32 px, and augmentations that suit
# digits (no flips: a mirrored 2 is not a 2; no Mixup/erasing: 1.4k images, 10 epochs).
DEMO = dict(model="poolformer_s12", depths=[1, 1, 3, 1], dims=[32, 64, 128, 256], drop_path=0.0, img_size=32,
            epochs=10, batch_size=64, base_lr=1.6e-2, warmup_epochs=1, mixup=0.0, cutmix=0.0,
            aa="rand-m5-mstd0.5-inc1", scale=[0.5, 1.0], hflip=0.0, reprob=0.0, train_interpolation="bicubic",
            workers=0, output="runs/digits")


def coerce_option(name: str, value, annotation: str, source: str):
    """``value`` as the option's declared type, or a ConfigError naming the option and the type."""
    optional = annotation.endswith("| None")
    kind = annotation.replace("| None", "").strip()
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name} needs a value ({kind})")

    def number(v, integer):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
            raise TypeError
        return int(v) if integer else float(v)

    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind in ("int", "float"):
            return number(value, kind == "int")
        if kind.startswith("list["):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [number(v, kind == "list[int]") for v in value]
        if kind == "dict":
            if not isinstance(value, dict):
                raise TypeError
            return value
        if not isinstance(value, str):
            raise TypeError
        return value
    except TypeError:
        kinds = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                 "dict": "a mapping", "list[int]": "a list of integers", "list[float]": "a list of numbers"}
        raise ConfigError(f"{source}: {name} must be {kinds.get(kind, kind)}{' or null' if optional else ''}, got "
                          f"{value!r} ({type(value).__name__})") from None


def resolve_config(flags: dict | None = None, config_file: str | None = None) -> TrainConfig:
    """Defaults (the paper's, or :data:`DEMO` for the built-in data) < YAML file < flags; every value
    checked against its option's type (so ``lr: 1e-3`` is a number, and ``epochs: ten`` an error)."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    from_file = {}
    if config_file:
        from_file = yaml12.load_file(config_file) or {}
        if not isinstance(from_file, dict):
            raise ConfigError(f"config file {config_file} must be a YAML mapping of option: value")
        from_file = {str(k).replace("-", "_"): v for k, v in from_file.items()}
        unknown = sorted(set(from_file) - set(fields))
        if unknown:
            raise ConfigError(f"unknown option(s) in {config_file}: {', '.join(unknown)} (see `metaformer train "
                              "--help`)")
        from_file = {k: coerce_option(k, v, fields[k], config_file) for k, v in from_file.items()}
    cli = {k: coerce_option(k, v, fields[k], f"--{k.replace('_', '-')}") for k, v in (flags or {}).items() if v is not None}
    user = {**from_file, **cli}
    base = dict(DEMO) if D.is_builtin(user.get("data")) else {}
    return TrainConfig(**{**base, **user})


# Options a resumed run may not change: they define the network, or the data order and the
# number of steps per epoch that the checkpoint's position (epoch, step) refers to. Every other
# option applies from the resumed step on (the schedule is re-planned), and the change is logged.
FIXED_ON_RESUME = ("model", "depths", "dims", "model_kwargs", "img_size", "seed", "batch_size", "accum_steps")
_NOT_COMPARED = ("resume", "output", "overwrite")


def resume_changes(saved: dict, cfg: TrainConfig, world: int, saved_world: int) -> dict[str, tuple]:
    """``{option: (checkpoint's value, this run's)}`` for options that changed; refuses the fixed ones."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as stored
    same_data = D.is_builtin(saved.get("data")) and D.is_builtin(now.get("data"))
    changed = {k: (saved[k], v) for k, v in now.items()
               if k in saved and k not in _NOT_COMPARED and saved[k] != v and not (k == "data" and same_data)}
    fixed = [k for k in FIXED_ON_RESUME if k in changed]
    if fixed:
        shown = "; ".join(f"--{k.replace('_', '-')} {changed[k][0]!r} -> {changed[k][1]!r}" for k in fixed)
        raise ConfigError(f"--resume: {shown}. These options define the network or the data order the checkpoint's "
                          "position refers to, so a run cannot change them midway: resume with the checkpoint's "
                          "values, or start a new run in another --output")
    if saved_world != world:
        raise ConfigError(f"--resume: the checkpoint was trained by {saved_world} process(es), this run has {world}; "
                          "the per-process data shards and random streams would not line up: resume with "
                          f"{saved_world} process(es)")
    return changed


def _keep_previous_config(out: Path) -> Path | None:
    """Rename ``config.yaml`` to the next free ``config.N.yaml`` (a resumed run never loses the original)."""
    current = out / "config.yaml"
    if not current.exists():
        return None
    n = 1
    while (out / f"config.{n}.yaml").exists():
        n += 1
    current.rename(out / f"config.{n}.yaml")
    return out / f"config.{n}.yaml"


# ----- distributed helpers -----

def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible")
    if world > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


# ----- checkpoints -----

def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and numbers (loadable with weights_only=True)."""
    py = random.getstate()
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": torch.tensor(py[1], dtype=torch.int64), "python_gauss": py[2],
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict:
    if Path(path).is_dir():
        raise ConfigError(f"--resume {path} is a folder: pass its last.pth, or --resume auto with --output {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: {str(e).strip().splitlines()[0][:200]}; it is probably "
                          "truncated or corrupt (an older one may be in the same folder)") from None
    if isinstance(ckpt, dict) and ckpt.get("task") in ("detect", "segment"):
        raise ConfigError(f"{path} is a `metaformer {ckpt['task']}` checkpoint: resume it with "
                          f"`metaformer {ckpt['task']} train --resume {path} ...`")
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "model" not in ckpt:
        raise ConfigError(f"{path} is not a training checkpoint of `metaformer train`: --resume needs its "
                          f"last.pth or best.pth (weights alone hold no optimizer or schedule state)")
    return ckpt


# ----- evaluation -----

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, unreadable: D.UnreadableLog | None = None, progress: bool = False) -> dict:
    """Top-1/top-5 (%) and mean cross-entropy; counts are summed over ranks when distributed."""
    from tqdm import tqdm

    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for x, y, bad in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        if unreadable is not None:
            unreadable.add(bad, len(x))
        if not len(x):
            continue
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y[:, None])
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hits[:, 0].sum().double(),
                               hits.any(1).sum().double(), torch.tensor(len(y), dtype=torch.float64, device=device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    n = max(n, 1)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "images": int(totals[3].item())}


# ----- feedback -----

def write_csv(history: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def plot_curves(history: list[dict], path: Path) -> None:
    matplotlib = require("matplotlib", "train", "plotting the training curves")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="val")
    ax[0].set_title("loss")
    ax[1].plot(ep, [h["val_top1"] for h in history], label="top-1")
    ax[1].plot(ep, [h["val_top5"] for h in history], label="top-5")
    if "ema_top1" in history[0]:
        ax[1].plot(ep, [h["ema_top1"] for h in history], label="EMA top-1")
    ax[1].set_title("val accuracy (%)")
    ax[2].plot(ep, [h["lr"] for h in history])
    ax[2].set_title("learning rate (end of epoch)")
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax[0].legend()
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----- the run -----

def train(cfg: TrainConfig) -> dict:
    """Run training; returns the summary (best top-1, wall time, images/s, paths)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    if cfg.batch_size < 1 or cfg.accum_steps < 1 or cfg.epochs < 1:
        raise ConfigError("--batch-size, --accum-steps and --epochs must be at least 1")
    if cfg.amp not in ("auto", "none", "bf16", "fp16"):
        raise ConfigError(f"--amp must be auto, none, bf16 or fp16, not {cfg.amp!r}")
    rank, world, device = setup_distributed(cfg.device)
    ddp, master = world > 1, rank == 0
    out = Path(cfg.output)
    log = tqdm.write if master else (lambda *a, **k: None)
    # The output folder is checked before any work (an earlier run is replaced only with --overwrite).
    on_main(lambda: check_output(out, resume=bool(cfg.resume), overwrite=cfg.overwrite), master)
    amp = ("bf16" if device.type == "cuda" else "none") if cfg.amp == "auto" else cfg.amp
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # --- data (checked before anything is built) ---
    info = get_model_info(cfg.model)
    if D.is_builtin(cfg.data):
        train_ds = D.Digits("train", cfg.img_size, D.train_transform(cfg, info))
        val_ds = D.Digits("val", cfg.img_size, D.eval_transform(info, cfg.img_size))
        class_names, data_name = D.Digits.classes, "builtin digits (sklearn, 1437 train / 360 val)"
    else:
        train_dir, val_dir, class_names = D.check_image_folder(cfg.data)
        train_ds = D.SafeImageFolder(train_dir, D.train_transform(cfg, info))
        val_ds = D.SafeImageFolder(val_dir, D.eval_transform(info, cfg.img_size), allow_empty=True)
        data_name = f"{cfg.data} ({len(train_ds)} train / {len(val_ds)} val images)"
    train_sampler = D.ResumableDistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(train_sampler) // (cfg.batch_size * cfg.accum_steps)
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_sampler)} training images per process are fewer than one optimizer step "
                         f"(batch {cfg.batch_size} x accum {cfg.accum_steps}); lower --batch-size or --accum-steps")
    loader_gen = torch.Generator()
    pin = device.type == "cuda"
    train_loader = D.make_loader(train_ds, cfg.batch_size, train_sampler, cfg.workers, drop_last=True,
                                 generator=loader_gen, pin_memory=pin)
    # Validation shards are disjoint and unpadded so the all-reduced counts are exact.
    val_loader = D.make_loader(val_ds, cfg.batch_size, list(range(rank, len(val_ds), world)), cfg.workers,
                               pin_memory=pin)
    unreadable = D.UnreadableLog(strict=cfg.strict_data)
    on_main(lambda: prepare_output(out, resume=bool(cfg.resume), overwrite=cfg.overwrite), master)

    # --- model ---
    overrides = dict(cfg.model_kwargs, img_size=cfg.img_size)
    for key, value in (("depths", cfg.depths), ("dims", cfg.dims), ("drop_path_rate", cfg.drop_path)):
        if value is not None:
            overrides[key] = value
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    try:
        raw_model = create_model(cfg.model, num_classes=len(class_names), **overrides)
    except TypeError as e:
        raise ConfigError(f"bad model option: {e}") from None
    if cfg.grad_checkpointing:
        raw_model.set_grad_checkpointing()
    raw_model.to(device)
    if cfg.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    if cfg.fast_training:
        enable_fast_training(raw_model)
        if not any(getattr(m, "fast_training", False) for m in raw_model.modules()):
            raise ConfigError(f"--fast-training covers PoolFormer blocks (pooling mixer, GroupNorm(1), layer "
                             f"scales, GELU MLP); {cfg.model} with these options has none: drop the flag")
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if pin else None)

    # --- the recipe, from timm ---
    global_batch = cfg.batch_size * cfg.accum_steps * world
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / 1024
    optimizer = create_optimizer_v2(raw_model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps,
                                    betas=tuple(cfg.opt_betas))
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing,
                      num_classes=len(class_names))
        criterion = SoftTargetCrossEntropy()  # Mixup already smooths the targets
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    ema = ModelEmaV3(raw_model, decay=cfg.ema_decay) if cfg.ema else None

    # --- resume ---
    start_epoch, start_step, step, best_top1, best_epoch, history, resume_rng = 0, 0, 0, -1.0, None, [], None
    resume, changed = cfg.resume, {}
    if resume == "auto":
        resume = str(out / "last.pth") if (out / "last.pth").exists() else None
        if resume is None:
            log(f"--resume auto: no {out / 'last.pth'} yet, starting from scratch")
    if resume:
        ckpt = load_checkpoint(resume)
        if list(ckpt.get("class_names") or class_names) != list(class_names):
            raise ConfigError(f"--resume: {resume} was trained on other classes ({len(ckpt['class_names'])}: "
                              f"{', '.join(ckpt['class_names'][:5])}...) than --data has ({len(class_names)}: "
                              f"{', '.join(class_names[:5])}...); resume on the same classes, or start a new run")
        changed = resume_changes(ckpt.get("train_config") or {}, cfg, world, len(ckpt["rng"]))
        try:
            raw_model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ConfigError(f"{resume} does not fit this model ({str(e).splitlines()[0]}); resume with the options "
                              f"it was trained with (see {Path(resume).parent}/config.yaml)") from None
        # The optimizer's state (moments, step counts) comes from the checkpoint; its hyperparameters and the
        # schedule come from this run's options, so a changed --lr or --epochs takes effect (as timm's train.py).
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, h in zip(optimizer.param_groups, hyper):
            group.update(h)
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            if ckpt.get("ema") is not None:
                ema.module.load_state_dict(ckpt["ema"])
            else:  # EMA switched on at resume: it starts from the resumed weights, not the initial ones
                ema = ModelEmaV3(raw_model, decay=cfg.ema_decay)
        start_epoch, start_step, step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
        history = list(ckpt["history"])
        if "best_epoch" not in ckpt and history:  # checkpoints of earlier versions
            ckpt["best_epoch"] = max(history, key=lambda h: h["val_top1"])["epoch"]
        if master and Path(resume).resolve() == (out / "last.pth").resolve():
            fixed = reconcile_best(out / "last.pth", ckpt, "best_top1")
            if fixed:
                log(f"resume: {fixed}")
        best_top1, best_epoch = ckpt["best_top1"], ckpt.get("best_epoch")
        resume_rng = ckpt["rng"][rank]
        scheduler.step_update(num_updates=step)
        log(f"resumed from {resume}: epoch {start_epoch + 1}, step {step}")
        if changed:
            log("resume: options changed since the checkpoint, applied from here on: " + ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    if start_epoch >= cfg.epochs:
        raise ConfigError(f"{resume} already finished {start_epoch} of {cfg.epochs} epochs; raise --epochs to "
                          "continue")

    # --- outputs (rank 0 only) ---
    writer = None
    if master:
        if changed:
            kept = _keep_previous_config(out)
            if kept:
                log(f"resume: the previous config is kept as {kept}")
        with open(out / "config.yaml", "w") as f:
            yaml.safe_dump(dict(dataclasses.asdict(cfg), resolved_lr=lr, global_batch=global_batch, world_size=world,
                                amp_resolved=amp), f, sort_keys=False)
        SummaryWriter = require("torch.utils.tensorboard", "train", "TensorBoard logging").SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=step if resume else None)

    def checkpoint(epoch: int, step_in_epoch: int, is_best: bool = False) -> Path | None:
        """Save on rank 0 (collective: every rank must call it, for the RNG gather)."""
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if not master:
            return None
        state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "ema": ema.module.state_dict() if ema is not None else None,
                 "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step, "rng": rngs,
                 "best_top1": best_top1, "best_epoch": best_epoch, "history": history,
                 "class_names": list(class_names), "model_config": raw_model.config, "variant": cfg.model,
                 "train_config": dataclasses.asdict(cfg), "world_size": world}
        return save_pair(state, out, is_best)

    # Ctrl-C / SIGTERM only raise a flag; the loop agrees on it across ranks and stops between steps.
    stop = GracefulStop(log).__enter__()

    log(f"data: {data_name}, {len(class_names)} classes | model: {cfg.model} {overrides} | "
        f"{world} process(es) on {device.type}, amp {amp} | global batch {global_batch} "
        f"({cfg.batch_size} x {cfg.accum_steps} accum x {world}), lr {lr:.3g} | output {out}")
    last_good = out / "last.pth" if resume else None
    t_run = time.time()
    images_seen, lr_now = 0, optimizer.param_groups[0]["lr"]
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # Seeding per (seed, epoch, rank) makes the epoch's randomness independent of history.
            seed = epoch_seed(cfg.seed, epoch, rank)
            D.seed_everything(seed)
            loader_gen.manual_seed(seed)
            train_sampler.set_epoch(epoch, start=start_step * cfg.batch_size * cfg.accum_steps)
            model.train()
            data_iter = iter(train_loader)
            if start_step and resume_rng is not None:
                # Mid-epoch (Ctrl-C) resume: continue the interrupted RNG streams. Exact with --workers 0;
                # with workers, their augmentation streams restart, so only the data order is exact.
                set_rng_state(resume_rng)
            loss_sum, loss_steps, epoch_images, t0 = 0.0, 0, 0, time.time()
            bar = tqdm(range(start_step, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not master,
                       leave=False, dynamic_ncols=True, mininterval=0.5)
            for it in bar:
                batch_loss = torch.zeros(2, device=device)  # [sum of micro-step losses, stop flag]
                for micro in range(cfg.accum_steps):
                    x, y, bad = next(data_iter)
                    unreadable.add(bad, len(x))
                    if mixup is not None and len(x) % 2:  # Mixup pairs images; an odd batch lost one to a bad file
                        x, y = x[:-1], y[:-1]
                    x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    if mixup is not None and len(x):
                        x, y = mixup(x, y)
                    # Gradients are all-reduced only on the last micro-step of an accumulation.
                    sync = not ddp or micro == cfg.accum_steps - 1
                    with contextlib.nullcontext() if sync else model.no_sync():
                        with autocast:
                            # A micro-batch of only unreadable files still joins the gradient all-reduce.
                            loss = criterion(model(x), y) if len(x) else sum(p.sum() * 0 for p in model.parameters())
                        scaler.scale(loss / cfg.accum_steps).backward()
                    batch_loss[0] += loss.detach().float()
                    epoch_images += len(x)
                batch_loss[1] = float(stop.requested)
                batch_loss = all_reduce_sum(batch_loss)
                loss_value = batch_loss[0].item() / (cfg.accum_steps * world)
                if not math.isfinite(loss_value):
                    where = f"{last_good} (resume with --resume {last_good})" if last_good else "none yet"
                    raise TrainingDiverged(
                        f"loss is {loss_value} at step {step + 1} (epoch {epoch + 1}, iteration {it + 1}); stopped "
                        f"without applying it. Last good checkpoint: {where}. Try a lower --lr"
                        f"{', --amp bf16 instead of fp16' if amp == 'fp16' else ''} or --clip-grad 1.0")
                if cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(num_updates=step)
                if ema is not None:
                    ema.update(raw_model, step=step)
                loss_sum, loss_steps = loss_sum + loss_value, loss_steps + 1
                lr_now = optimizer.param_groups[0]["lr"]
                ips = epoch_images * world / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}", img_s=f"{ips:.0f}", refresh=False)
                if writer is not None and step % cfg.log_interval == 0:
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/lr", lr_now, step)
                if batch_loss[1] > 0:
                    bar.close()
                    path = checkpoint(epoch, it + 1)
                    raise Interrupted(f"stopped by {stop.signal or 'another rank'} at epoch {epoch + 1}, step "
                                      f"{step}; saved {path}. Continue with the same command plus --resume auto")
            bar.close()
            start_step = 0
            epoch_time = time.time() - t0
            images_seen += epoch_images * world

            val = evaluate(model, val_loader, device, amp_dtype=amp_dtype, channels_last=cfg.channels_last,
                           unreadable=unreadable)
            row = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(loss_steps, 1), "lr": lr_now,
                   "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                   "images_per_s": epoch_images * world / epoch_time, "epoch_time_s": epoch_time}
            if ema is not None:
                row["ema_top1"] = evaluate(ema.module, val_loader, device, amp_dtype=amp_dtype,
                                           channels_last=cfg.channels_last, unreadable=unreadable)["top1"]
            bad_files = unreadable.end_epoch()
            row["unreadable"] = len(bad_files)
            history.append(row)
            is_best = val["top1"] > best_top1
            if is_best:
                best_top1, best_epoch = val["top1"], epoch + 1
            last_good = checkpoint(epoch + 1, 0, is_best)
            if master:
                for k, v in row.items():
                    if k not in ("epoch", "step"):
                        writer.add_scalar(f"epoch/{k}", v, epoch + 1)
                write_csv(history, out / "metrics.csv")
                log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f}  val loss {val['loss']:.4f}  "
                    f"top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%"
                    + (f"  EMA top-1 {row['ema_top1']:.2f}%" if ema is not None else "")
                    + f"  lr {lr_now:.2e}  {row['images_per_s']:.0f} img/s  {epoch_time:.1f}s" + ("  *best*" if is_best else ""))
                if bad_files:
                    log(f"  skipped {len(bad_files)} unreadable image(s) this epoch:")
                    for b in bad_files:
                        log(f"    {b.path}: {b.error}")
    finally:
        stop.__exit__()
        if writer is not None:
            writer.close()

    wall = time.time() - t_run
    # Every rank must end with the same weights; a difference means a desynchronised run.
    digest = hashlib.sha256(b"".join(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                                     for t in raw_model.state_dict().values())).hexdigest()
    digests = [digest]
    if ddp:
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            log(f"WARNING: the ranks ended with different weights: {digests}")
    best = max(history, key=lambda h: h["val_top1"])
    summary = {"best_top1": best["val_top1"], "best_epoch": best["epoch"], "final_top1": history[-1]["val_top1"],
               "final_top5": history[-1]["val_top5"], "epochs": cfg.epochs, "wall_time_s": round(wall, 1),
               "images_per_s": round(images_seen / wall, 1) if wall > 0 else None,
               "checkpoint": str(out / "best.pth"), "last": str(out / "last.pth"), "world_size": world,
               "weights_sha256_per_rank": digests}
    if master:
        write_csv(history, out / "metrics.csv")
        plot_curves(history, out / "curves.png")
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        log(f"done: best top-1 {summary['best_top1']:.2f}% (epoch {summary['best_epoch']}), "
            f"wall time {wall:.0f}s, {summary['images_per_s']} img/s | {out}/best.pth, metrics.csv, tb/, "
            f"curves.png, summary.json")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return summary

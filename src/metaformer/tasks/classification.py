"""Image classification: train a MetaFormer with the papers' recipe, from one CPU to many GPUs, and evaluate it.

The recipe is timm's, not rewritten: ``create_optimizer_v2`` (AdamW or LAMB, no decay on what
``model.no_weight_decay()`` names, timm's layer-wise lr decay over ``model.group_matcher()``),
``create_scheduler_v2`` (warm-up then cosine, stepped per update), ``Mixup`` +
``SoftTargetCrossEntropy``, ``LabelSmoothingCrossEntropy``, ``create_transform`` (RandAugment,
random erasing) and ``ModelEmaV3``. What every task shares (devices, torchrun, mixed precision,
checkpoints, metrics, Ctrl-C) is :mod:`metaformer.engine`; this file is what is particular to
classification training: :func:`train` wires ``build_data``, ``build_model``, ``build_recipe`` and
:func:`train_one_epoch` / :func:`~metaformer.tasks.inference.evaluate` together, as nanoGPT's and
torchvision's references do.

Exact resume: every epoch re-seeds python/numpy/torch and the loader generator from
``(seed, epoch, rank)`` and the sampler shuffles by epoch, so an epoch's data order,
Mixup and drop-path draws do not depend on what ran before it; each sample's augmentation is
seeded by the sample itself (:class:`~metaformer.data.PerSampleSeeds`), so it does not depend on
the DataLoader worker that reads it. Together with the model/optimizer/scaler/EMA state this
makes a resumed CPU run bit-identical to an uninterrupted one, with any number of workers. A
Ctrl-C checkpoint is taken between optimizer steps and resumes at the next batch of the same
epoch order, with the epoch's running loss.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data as D
from ..engine import checkpoint as ckpt_io
from ..engine.loop import (check_finite, check_weights_finite, freeze, optimizer_step, progress_bar, report_unreadable,
                           wrap_ddp)
from ..engine.metrics import MetricsLog, check_loggers, plot_curves
from ..engine.run import RunDir
from ..engine.runtime import Runtime, epoch_seed, rng_state, seed_everything, set_rng_state, setup
from ..engine.stop import GracefulStop, Interrupted
from ..errors import ConfigError, need
from ..fast.training import enable_fast_training, fast_training_report
from ..weights.io import state_dict_sha256
from ..zoo import create_model, eval_transform, get_model_info, get_weights, list_models, split_name
from .inference import eval_loader, evaluate
from .train_config import (TrainConfig, check_config, describe_recipe, keep_previous_config, resume_changes,
                           small_data_hint)


# ----------------------------------------------------------------------------------------- building

@dataclass
class Data:
    """The run's data: loaders, and how an epoch starts (its order, and where a resumed epoch picks up)."""

    train_loader: Any
    val_loader: Any
    class_names: list[str]
    steps_per_epoch: int
    description: str
    train_images: int | None = None
    sampler: Any = None  # map-style data: a ResumableDistributedSampler; shards: None
    stream: Any = None  # shards: the ShardStream
    generator: torch.Generator = field(default_factory=torch.Generator)

    def start_epoch(self, epoch: int, step: int, seed: int, micro_per_step: int, batch_size: int) -> None:
        self.generator.manual_seed(seed)
        if self.stream is not None:
            self.stream.set_epoch(epoch, skip_batches=step * micro_per_step)
        else:
            self.train_loader.dataset.set_seed(seed)
            self.sampler.set_epoch(epoch, start=step * micro_per_step * batch_size)


def preprocessing_for(cfg: TrainConfig) -> dict:
    """The eval preprocessing (crop, interpolation, mean/std) of the weights the run starts from: a tag's own,
    a checkpoint of ours' variant's, else the variant's default weights', at the run's input size."""
    if cfg.pretrained and split_name(cfg.pretrained)[0] in list_models() and not Path(cfg.pretrained).exists():
        return get_weights(cfg.pretrained).preprocessing(cfg.img_size)
    source = pretrained_source(cfg)
    variant = source.variant if source and source.variant in list_models() else cfg.model
    return get_model_info(variant).preprocessing(cfg.img_size)


def build_data(cfg: TrainConfig, rt: Runtime) -> Data:
    pre = preprocessing_for(cfg)
    crop = D.eval_crop(cfg.data)  # a built-in set may fix its own
    train_tf, eval_tf = D.train_transform(cfg, pre), eval_transform(**(dict(pre, crop_pct=crop) if crop else pre))
    source = D.open_source(cfg.data, train_tf, eval_tf, cfg.img_size)
    train_set, val_set, class_names, description = source.train, source.val, source.class_names, source.description
    micro = cfg.batch_size * cfg.accum_steps
    gen = torch.Generator()
    pin = rt.device.type == "cuda"
    stream = train_set if isinstance(train_set, D.ShardStream) else None
    if stream is not None:
        batches = stream.configure(rt.rank, rt.world, cfg.batch_size, cfg.seed, drop_last=True,
                                   workers=cfg.workers, accum_steps=cfg.accum_steps)
        steps = batches // cfg.accum_steps
        sampler, loader = None, D.make_loader(stream, cfg.batch_size, None, cfg.workers, generator=gen, pin_memory=pin)
    else:
        train_set = D.PerSampleSeeds(train_set)
        sampler = D.ResumableDistributedSampler(train_set, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                                seed=cfg.seed, drop_last=True)
        steps = len(sampler) // micro
        loader = D.make_loader(train_set, cfg.batch_size, sampler, cfg.workers, drop_last=True, generator=gen,
                               pin_memory=pin)
    if steps == 0:
        raise ConfigError(f"the training data holds fewer images per process than one optimizer step (batch "
                          f"{cfg.batch_size} x accum {cfg.accum_steps}); lower --batch-size or --accum-steps")
    val_loader = eval_loader(val_set, rt, cfg.batch_size, cfg.workers)
    return Data(loader, val_loader, list(class_names), steps, description, len(train_set), sampler, stream, gen)


@dataclass
class Pretrained:
    """What ``--pretrained`` names: the weights, and for a checkpoint of ours its architecture and classes."""

    weights: str
    variant: str | None = None
    config: dict | None = None
    class_names: list[str] | None = None


def pretrained_source(cfg: TrainConfig) -> Pretrained | None:
    if not cfg.pretrained:
        return None
    if not Path(cfg.pretrained).expanduser().exists() and "://" not in cfg.pretrained:
        arch, _ = split_name(cfg.pretrained)
        if arch in list_models():  # a tag, or a variant for its default weights
            return Pretrained(get_weights(cfg.pretrained).url, arch)
        raise ConfigError(f"--pretrained {cfg.pretrained}: no such file, and not a model or tag "
                          "(`metaformer info` lists them)")
    from ..weights.save import stored_metadata
    from .inference import resolve_checkpoint

    meta = stored_metadata(resolve_checkpoint(cfg.pretrained))
    if meta is None:
        return Pretrained(cfg.pretrained)
    return Pretrained(cfg.pretrained, meta["variant"], meta["config"], meta["class_names"])


def build_model(cfg: TrainConfig, rt: Runtime, class_names: list[str]):
    """``(raw model, the model the loop runs)``: the architecture, ``--pretrained`` weights (a new classifier
    when the classes differ), frozen stages, speed options, then torch.compile and DDP."""
    source, num_classes = pretrained_source(cfg), len(class_names)
    if source and source.variant and cfg.model not in (source.variant, TrainConfig.model) and not source.config:
        raise ConfigError(f"--pretrained {cfg.pretrained} holds {source.variant} weights, but --model is {cfg.model}")
    overrides = dict(cfg.model_kwargs, img_size=cfg.img_size)
    for key, value in (("depths", cfg.depths), ("dims", cfg.dims), ("drop_path_rate", cfg.drop_path)):
        if value is not None:
            overrides[key] = value
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    try:
        if source and source.config:  # one of ours: its own architecture, with this run's classifier and options
            from ..zoo import build_from_config

            config = {k: v for k, v in source.config.items() if k not in ("features_only", "out_indices")}
            raw = build_from_config({**config, **overrides, "num_classes": num_classes}, source.variant)
        else:
            raw = create_model(source.variant if source and source.variant else cfg.model, num_classes=num_classes,
                               **overrides)
    except TypeError as e:
        raise ConfigError(f"bad model option: {e}") from None
    if source:
        from ..zoo import load_weights

        report = load_weights(raw, source.weights, strict=True)
        renamed = source.class_names is not None and list(source.class_names) != list(class_names)
        if renamed and not report.reinitialised:  # as many classes, but other ones: its classifier means nothing here
            raw.reset_classifier(num_classes)
        rt.log(f"pretrained: {report.loaded} tensors from {source.weights} ({report.layout} layout)"
               + (", new classifier" if report.reinitialised or renamed else ""))
    freeze(raw, cfg.frozen_stages)
    if cfg.grad_checkpointing:
        raw.set_grad_checkpointing()
    raw.to(rt.device)
    if cfg.channels_last:
        raw.to(memory_format=torch.channels_last)
    if cfg.fast_training:
        enable_fast_training(raw)
        on, off = fast_training_report(raw)
        if not on:
            why = next(iter(off.values()), "it has no MetaFormer blocks")
            raise ConfigError(f"--fast-training covers PoolFormer blocks (pooling mixer, GroupNorm(1), layer "
                              f"scales, GELU MLP); {cfg.model} with these options has none ({why}): drop the flag")
        rt.log(f"fast training: {len(on)} of {len(on) + len(off)} blocks" + (
            f"; the others keep their forward ({next(iter(off.values()))})" if off else ""))
    model = torch.compile(raw) if cfg.compile else raw
    # A head-only warm-up leaves the body without gradients for a while: DDP must not wait for them.
    return raw, wrap_ddp(model, rt, find_unused=cfg.head_warmup_epochs > 0)


@dataclass
class Recipe:
    optimizer: Any
    scheduler: Any
    mixup: Any
    criterion: Any
    scaler: Any
    ema: Any
    lr: float
    global_batch: int


def build_recipe(cfg: TrainConfig, rt: Runtime, raw: nn.Module, num_classes: int, steps_per_epoch: int) -> Recipe:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    global_batch = cfg.batch_size * cfg.accum_steps * rt.world
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / 1024
    frozen = {id(p) for p in raw.parameters() if not p.requires_grad}  # --frozen-stages: never optimised
    with _all_trainable(raw, frozen):
        optimizer = create_optimizer_v2(raw, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps,
                                        betas=tuple(cfg.opt_betas), layer_decay=cfg.layer_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()  # Mixup already smooths the targets
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp == "fp16")  # bf16 needs no loss scaling
    ema = ModelEmaV3(raw, decay=cfg.ema_decay) if cfg.ema else None
    return Recipe(optimizer, scheduler, mixup, criterion, scaler, ema, lr, global_batch)


@contextlib.contextmanager
def _all_trainable(model: nn.Module, frozen: set):
    """The optimizer holds every parameter but the frozen stages', including a head-only warm-up's body (its
    gradients are simply absent until it thaws)."""
    body = [p for p in model.parameters() if not p.requires_grad and id(p) not in frozen]
    for p in body:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in body:
            p.requires_grad_(False)


def set_head_only(raw: nn.Module, head_only: bool, frozen_stages: int) -> None:
    """During a head warm-up only the classifier learns; afterwards everything but the frozen stages."""
    for name, p in raw.named_parameters():
        p.requires_grad_(name.startswith("head.") if head_only else True)
    freeze(raw, frozen_stages)


# ----------------------------------------------------------------------------------------- the loops

@dataclass
class RunState:
    """Where the run is; all of it goes into the checkpoint."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0
    step: int = 0  # optimizer steps so far
    best_top1: float = -1.0
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)
    rng: dict | None = None  # this rank's RNG streams at a mid-epoch checkpoint
    # The epoch in progress so far (a mid-epoch checkpoint carries them, so its row covers the whole epoch):
    loss_sum: float = 0.0
    loss_steps: int = 0
    images: int = 0  # over all ranks
    seconds: float = 0.0

    def sums(self) -> dict:
        return {"loss_sum": self.loss_sum, "loss_steps": self.loss_steps, "images": self.images,
                "seconds": self.seconds}


def train_one_epoch(model, raw, data: Data, recipe: Recipe, rt: Runtime, cfg: TrainConfig, state: RunState,
                    stop: GracefulStop, unreadable, metrics: MetricsLog, save) -> dict:
    """One epoch of optimizer steps (from ``state.step_in_epoch``); returns the epoch's row."""
    opt, pin = recipe.optimizer, rt.device.type == "cuda"
    images, t0 = 0, time.time() - state.seconds  # images: this process's, for its speed
    lr = max(g["lr"] for g in opt.param_groups)  # the top layer's, under --layer-decay
    data_iter = iter(data.train_loader)
    if state.step_in_epoch and state.rng is not None:
        # Mid-epoch (Ctrl-C) resume: continue the interrupted RNG streams (Mixup, drop path); the samples'
        # augmentation is seeded per sample, whatever the workers.
        set_rng_state(state.rng)
    with progress_bar(range(state.step_in_epoch, data.steps_per_epoch), main=rt.main,
                  desc=f"epoch {state.epoch + 1}/{cfg.epochs}") as bar:
        for it in bar:
            batch_loss = torch.zeros(2, device=rt.device)  # [sum of micro-step losses, stop flag]
            for micro in range(cfg.accum_steps):
                x, y, bad = next(data_iter)
                unreadable.add(bad, len(x))
                if recipe.mixup is not None and len(x) % 2:  # Mixup pairs images; an odd batch lost one to a bad file
                    x, y = x[:-1], y[:-1]
                x, y = x.to(rt.device, non_blocking=pin), y.to(rt.device, non_blocking=pin)
                if cfg.channels_last and len(x):  # an all-unreadable batch is an empty 1-d tensor
                    x = x.contiguous(memory_format=torch.channels_last)
                if recipe.mixup is not None and len(x):
                    x, y = recipe.mixup(x, y)
                # Gradients are all-reduced only on the last micro-step of an accumulation.
                sync = not rt.distributed or micro == cfg.accum_steps - 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    with rt.autocast():
                        # A micro-batch of only unreadable files still joins the gradient all-reduce.
                        loss = recipe.criterion(forward(model, x), y) if len(x) else \
                            sum(p.sum() * 0 for p in model.parameters())
                    recipe.scaler.scale(loss / cfg.accum_steps).backward()
                batch_loss[0] += loss.detach().float()
                images += len(x)
            batch_loss[1] = float(stop.requested)
            batch_loss = rt.all_reduce_sum(batch_loss)
            loss_value = batch_loss[0].item() / (cfg.accum_steps * rt.world)
            check_finite(loss_value, f"step {state.step + 1} (epoch {state.epoch + 1}, iteration {it + 1})", cfg.output,
                         rt.amp, " or --clip-grad 1.0")
            optimizer_step(opt, recipe.scaler, raw.parameters(), cfg.clip_grad)
            state.step += 1
            recipe.scheduler.step_update(num_updates=state.step)
            if recipe.ema is not None:
                recipe.ema.update(raw, step=state.step)
            state.loss_sum, state.loss_steps = state.loss_sum + loss_value, state.loss_steps + 1
            lr = max(g["lr"] for g in opt.param_groups)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{images * rt.world / max(time.time() - t0 - state.seconds, 1e-9):.0f}",
                            refresh=False)
            if state.step % cfg.log_interval == 0:
                metrics.scalar("train/loss", loss_value, state.step)
                metrics.scalar("train/lr", lr, state.step)
            if batch_loss[1] > 0:
                state.step_in_epoch, state.seconds = it + 1, time.time() - t0
                state.images += images * rt.world
                path = save()
                raise Interrupted(f"stopped by {stop.signal or 'another rank'} at epoch {state.epoch + 1}, step "
                                  f"{state.step}; saved {path}. Continue with the same command plus --resume auto")
    seconds, total = time.time() - t0, state.images + images * rt.world
    return {"epoch": state.epoch + 1, "step": state.step, "train_loss": state.loss_sum / max(state.loss_steps, 1),
            "lr": lr, "images_per_s": total / seconds, "epoch_time_s": seconds, "images": images * rt.world}


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in training; BatchNorm's complaint about a batch too small to normalise becomes a user error."""
    try:
        return model(x)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise ConfigError(f"BatchNorm cannot train on a batch of {len(x)} at {x.shape[-2]}x{x.shape[-1]} (one of its "
                          "norms would see one value per channel): use --batch-size 2 or more, or another norm than "
                          "bn") from None


# ----------------------------------------------------------------------------------------- resume

def resume(cfg: TrainConfig, rt: Runtime, run: RunDir, raw: nn.Module, recipe: Recipe, data: Data) -> tuple:
    """``(RunState, changed options)`` from ``--resume`` (see :mod:`.train_config` for what may change)."""
    out, class_names = Path(cfg.output), data.class_names
    path = run.resume_path()
    if path is None:
        if cfg.resume == "auto":
            rt.log(f"--resume auto: no {out / 'last.pth'} yet, starting from scratch")
        return RunState(), {}
    ckpt = run.load("train")
    if list(ckpt.get("class_names") or class_names) != list(class_names):
        raise ConfigError(f"--resume: {path} was trained on other classes ({len(ckpt['class_names'])}: "
                          f"{', '.join(ckpt['class_names'][:5])}...) than --data has ({len(class_names)}: "
                          f"{', '.join(class_names[:5])}...); resume on the same classes, or start a new run")
    changed = resume_changes(ckpt.get("train_config") or {}, cfg, rt.world, len(ckpt["rng"]))
    if "workers" in changed and data.stream is not None and ckpt["step_in_epoch"]:
        before, now = changed["workers"]
        if max(before or 0, 1) != max(now or 0, 1):  # 0 and 1 worker read the shards alike
            raise ConfigError(f"--resume: {path} stopped in the middle of epoch {ckpt['epoch'] + 1} on shards read by "
                              f"{before} worker(s). Shards are dealt out to the workers, so with --workers {now} the "
                              f"rest of that epoch would see some samples twice and others never: resume with "
                              f"--workers {before} (it may change from the next run that starts at an epoch's end)")
    try:
        raw.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ConfigError(f"{path} does not fit this model ({str(e).splitlines()[0]}); resume with the options "
                          f"it was trained with (see {path.parent}/config.yaml)") from None
    # The optimizer's state (moments, step counts) comes from the checkpoint; its hyperparameters and the
    # schedule come from this run's options, so a changed --lr or --epochs takes effect (as timm's train.py).
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in recipe.optimizer.param_groups]
    recipe.optimizer.load_state_dict(ckpt["optimizer"])
    for group, h in zip(recipe.optimizer.param_groups, hyper):
        group.update(h)
    recipe.scaler.load_state_dict(ckpt["scaler"])
    if recipe.ema is not None:
        if ckpt.get("ema") is not None:
            recipe.ema.module.load_state_dict(ckpt["ema"])
        else:  # EMA switched on at resume: it starts from the resumed weights, not the initial ones
            from timm.utils import ModelEmaV3

            recipe.ema = ModelEmaV3(raw, decay=cfg.ema_decay)
    history = list(ckpt["history"])
    if "best_epoch" not in ckpt and history:  # checkpoints of earlier versions
        ckpt["best_epoch"] = max(history, key=lambda h: h["val_top1"])["epoch"]
    if rt.main and path.resolve() == (out / "last.pth").resolve():
        fixed = ckpt_io.reconcile_best(out / "last.pth", ckpt, "best_top1")
        if fixed:
            rt.log(f"resume: {fixed}")
    state = RunState(ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"], ckpt["best_top1"], ckpt.get("best_epoch"),
                     history, ckpt["rng"][rt.rank], **(ckpt.get("epoch_sums") or {}))
    recipe.scheduler.step_update(num_updates=state.step)
    rt.log(f"resumed from {path}: epoch {state.epoch + 1}, step {state.step}")
    if changed:
        rt.log("resume: options changed since the checkpoint, applied from here on: " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return state, changed


def save_checkpoint(cfg, rt, run: RunDir, raw, recipe, state: RunState, class_names,
                    is_best: bool = False) -> Path | None:
    """Save on rank 0 (collective: every rank must call it, for the RNG gather)."""
    check_weights_finite(raw, f"step {state.step}", Path(cfg.output), " or --clip-grad 1.0")
    rngs = rt.gather(rng_state())
    if not rt.main:
        return None
    blob = {"task": "train", "model": raw.state_dict(), "optimizer": recipe.optimizer.state_dict(),
            "scheduler": recipe.scheduler.state_dict(), "scaler": recipe.scaler.state_dict(),
            "ema": recipe.ema.module.state_dict() if recipe.ema is not None else None,
            "epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "step": state.step, "rng": rngs,
            "best_top1": state.best_top1, "best_epoch": state.best_epoch, "history": state.history,
            "class_names": list(class_names), "model_config": raw.config, "variant": raw.variant,
            "train_config": dataclasses.asdict(cfg), "world_size": rt.world, "epoch_sums": state.sums()}
    return run.save(blob, is_best)


# ----------------------------------------------------------------------------------------- the run

def train(cfg: TrainConfig) -> dict:
    """Run training; returns the summary (best top-1, wall time, images/s, paths)."""
    check_config(cfg)  # resolve_config did for the command line; a TrainConfig built in Python is checked here
    check_extras(cfg)
    rt = setup(cfg.device, cfg.amp)
    state = None
    run = RunDir(cfg.output, cfg.resume, cfg.overwrite, rt, started=lambda: state is not None and state.step > 0)
    out = run.check()  # before any work
    rt.log(describe_recipe(cfg))
    data = build_data(cfg, rt)
    hint = small_data_hint(cfg, data.train_images)
    if hint:
        rt.log(hint)
    unreadable = D.UnreadableLog(strict=cfg.strict_data)
    with run:  # one run writes into a folder at a time; a run failing before its first step leaves nothing
        raw, model = build_model(cfg, rt, data.class_names)
        recipe = build_recipe(cfg, rt, raw, len(data.class_names), data.steps_per_epoch)
        state, changed = resume(cfg, rt, run, raw, recipe, data)
        if state.epoch >= cfg.epochs:
            raise ConfigError(f"{out / 'last.pth'} already finished {state.epoch} of {cfg.epochs} epochs; raise "
                              "--epochs to continue")
        if rt.main:
            write_config(cfg, rt, recipe, out, changed)
        summary = run_epochs(cfg, rt, run, data, raw, model, recipe, state, unreadable)
    rt.close()
    return summary


def check_extras(cfg: TrainConfig) -> None:
    """What the run will import is installed: checked now, not when the first epoch ends (a data source's own
    package is checked as it is opened)."""
    if D.is_builtin(cfg.data):
        need("sklearn", "train", "the built-in digits")
    check_loggers("train", cfg.wandb)
    need("matplotlib", "train", "plotting the training curves")


def run_epochs(cfg: TrainConfig, rt: Runtime, run: RunDir, data: Data, raw: nn.Module, model: nn.Module,
               recipe: Recipe, state: RunState, unreadable) -> dict:
    """Train from ``state`` to ``cfg.epochs``, evaluating and saving after each epoch; returns the summary."""
    out = Path(cfg.output)
    metrics = MetricsLog(out, rt.main, state.history, "epoch", wandb=cfg.wandb, config=dataclasses.asdict(cfg),
                         purge_step=state.step if state.step else None)
    rt.log(f"data: {data.description}, {len(data.class_names)} classes | model: {describe_model(raw)} | {rt.world} "
           f"process(es) on {rt.device.type}, amp {rt.amp} | global batch {recipe.global_batch} ({cfg.batch_size} "
           f"x {cfg.accum_steps} accum x {rt.world}), lr {recipe.lr:.3g} | output {out}")

    def save(is_best: bool = False):
        return save_checkpoint(cfg, rt, run, raw, recipe, state, data.class_names, is_best)

    t_run, images_seen = time.time(), 0
    with GracefulStop(rt.log) as stop:  # Ctrl-C / SIGTERM: the loop saves and stops between steps
        try:
            while state.epoch < cfg.epochs:
                seed = epoch_seed(cfg.seed, state.epoch, rt.rank)
                seed_everything(seed)
                data.start_epoch(state.epoch, state.step_in_epoch, seed, cfg.accum_steps, cfg.batch_size)
                if cfg.head_warmup_epochs:
                    set_head_only(raw, state.epoch < cfg.head_warmup_epochs, cfg.frozen_stages)
                model.train()
                freeze(raw, cfg.frozen_stages)  # frozen stages keep their norms' statistics
                row = train_one_epoch(model, raw, data, recipe, rt, cfg, state, stop, unreadable, metrics, save)
                images_seen += row.pop("images")
                val = evaluate(model, data.val_loader, rt.device, rt.amp_dtype, cfg.channels_last, unreadable)
                # Weights can overflow into NaN outputs while every training loss was finite: not an epoch to keep.
                check_finite(val["loss"], f"the evaluation after epoch {state.epoch + 1}", cfg.output, rt.amp,
                             " or --clip-grad 1.0", what="the validation loss", stopped="the epoch was not saved")
                row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
                if recipe.ema is not None:
                    ema = evaluate(recipe.ema.module, data.val_loader, rt.device, rt.amp_dtype, cfg.channels_last,
                                   unreadable)
                    row.update(ema_loss=ema["loss"], ema_top1=ema["top1"], ema_top5=ema["top5"])
                bad_files = unreadable.end_epoch()
                row["unreadable"] = len(bad_files)
                is_best = val["top1"] > state.best_top1
                if is_best:
                    state.best_top1, state.best_epoch = val["top1"], state.epoch + 1
                state.epoch, state.step_in_epoch, state.rng = state.epoch + 1, 0, None
                state.loss_sum, state.loss_steps, state.images, state.seconds = 0.0, 0, 0, 0.0
                metrics.add(row)
                save(is_best)
                log_epoch(rt, cfg, row, is_best, bad_files)
        finally:
            metrics.close()
    return finish(cfg, rt, raw, state, time.time() - t_run, images_seen)


# ----------------------------------------------------------------------------------------- feedback

def describe_model(raw: nn.Module) -> str:
    """The model as its variant's name, with what differs from the variant (the demo's S12 at half depth and width
    is not PoolFormer-S12), and its size."""
    params = f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters"
    if raw.variant not in list_models():
        return f"{raw.variant or 'a custom MetaFormer'}, {params}"
    with torch.device("meta"):
        ref = create_model(raw.variant, num_classes=raw.num_classes, img_size=raw.config.get("img_size", 224)).config
    training_only = ("drop_path_rate", "drop_rate", "head_dropout")
    changed = [f"{k} {v}" for k, v in raw.config.items() if k not in training_only and ref.get(k) != v]
    return f"{raw.variant}" + (f" with {', '.join(changed)}" if changed else "") + f", {params}"


def write_config(cfg: TrainConfig, rt: Runtime, recipe: Recipe, out: Path, changed: dict) -> None:
    import yaml

    if changed:
        kept = keep_previous_config(out)
        if kept:
            rt.log(f"resume: the previous config is kept as {kept}")
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(dict(dataclasses.asdict(cfg), resolved_lr=recipe.lr, global_batch=recipe.global_batch,
                            world_size=rt.world, amp_resolved=rt.amp), f, sort_keys=False)


def log_epoch(rt: Runtime, cfg: TrainConfig, row: dict, is_best: bool, bad_files: list) -> None:
    rt.log(f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
           f"top-1 {row['val_top1']:.2f}%  top-5 {row['val_top5']:.2f}%"
           + (f"  EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else "")
           + f"  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  {row['epoch_time_s']:.1f}s"
           + ("  *best*" if is_best else ""))
    report_unreadable(rt.log, bad_files, "this epoch")


def finish(cfg: TrainConfig, rt: Runtime, raw: nn.Module, state: RunState, wall: float, images_seen: int) -> dict:
    """The run's summary; every rank must end with the same weights (a difference means a desynchronised run)."""
    out = Path(cfg.output)
    digests = rt.gather(state_dict_sha256(raw.state_dict()))
    if len(set(digests)) > 1:
        rt.log(f"WARNING: the ranks ended with different weights: {digests}")
    history = state.history
    best = max(history, key=lambda h: h["val_top1"])
    summary = {"best_top1": best["val_top1"], "best_epoch": best["epoch"], "final_top1": history[-1]["val_top1"],
               "final_top5": history[-1]["val_top5"], "epochs": cfg.epochs, "wall_time_s": round(wall, 1),
               "images_per_s": round(images_seen / wall, 1) if wall > 0 else None,
               "checkpoint": str(out / "best.pth"), "last": str(out / "last.pth"), "world_size": rt.world,
               "weights_sha256_per_rank": digests}
    if rt.main:
        plot_curves(history, out / "curves.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        rt.log(f"done: best top-1 {summary['best_top1']:.2f}% (epoch {summary['best_epoch']}), wall time {wall:.0f}s, "
               f"{summary['images_per_s']} img/s | {out}/best.pth, metrics.csv, tb/, curves.png, summary.json")
    return summary

"""The options of `metaformer train` (one dataclass: every field is a flag and a YAML key), how they are
resolved (defaults < YAML < flags, each checked against its type), and what a resumed run may change."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import data as D
from .. import yaml12
from ..errors import ConfigError
from ..ranges import BATCH, IMG_SIZE, MAX_BATCH, MAX_EPOCHS, PROBABILITY, SEED, WORKERS, Range, real, whole


@dataclass
class TrainConfig:
    # model
    model: str = field(default="poolformer_s12", metadata={"help": "variant name (`metaformer info` lists them)"})
    depths: list[int] | None = field(default=None, metadata={"help": "blocks per stage, overriding the variant's"})
    dims: list[int] | None = field(default=None, metadata={"help": "channels per stage, overriding the variant's"})
    drop_path: float | None = field(default=None, metadata={"help": "stochastic depth rate (default: the variant's)"})
    model_kwargs: dict = field(default_factory=dict, metadata={
        "help": "other MetaFormer arguments as YAML, e.g. \"{token_mixers: identity, norm: ln}\""})
    # fine-tuning
    pretrained: str | None = field(default=None, metadata={
        "help": "start from these weights: a tag (caformer_s18.sail_in22k_ft_in1k, or a variant for its default "
                "weights), or a file/URL in any layout metaformer reads; a checkpoint of ours also brings its "
                "architecture. A new classifier when the classes differ"})
    layer_decay: float | None = field(default=None, metadata={
        "help": "layer-wise lr decay (timm's): lr x decay^(depth from the top), e.g. 0.75"})
    frozen_stages: int = field(default=-1, metadata={
        "help": "parts that keep their weights, as `metaformer detect`/`segment` (mmdet's meaning): -1 none, 0 the "
                "stem, N the stem and the first N stages"})
    head_warmup_epochs: int = field(default=0, metadata={
        "help": "train only the classifier for the first N epochs (a new head settles before it moves the rest)"})
    # data
    data: str | None = field(default=None, metadata={
        "help": "an ImageNet-layout root (train/ and val/ class folders), a folder of webdataset shards from "
                "`metaformer data pack`, or a Hugging Face datasets folder; 'builtin' or omitted: the digits"})
    img_size: int = field(default=224, metadata={"help": "training and eval resolution"})
    workers: int = field(default_factory=lambda: default_workers(), metadata={
        "help": "DataLoader worker processes per rank (default: the CPUs this process may use, shared by the ranks "
                "on this machine, at most 8)"})
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
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3], metadata={
        "help": "random-resized-crop aspect ratio range"})
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
    wandb: str | None = field(default=None, metadata={"help": "also log to this Weights & Biases project "
                                                               "(needs `pip install wandb`)"})


def default_workers() -> int:
    """What the machine has: the CPUs this process may use, divided among torchrun's ranks on it, at most 8 (more
    than the cores only makes the loader warn and the workers compete)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


# What `describe_recipe` leaves out of the changes it lists: where the run reads and writes, not how it trains.
_NOT_RECIPE = ("data", "output", "resume", "overwrite", "device", "log_interval", "wandb", "workers", "strict_data")
SMALL_DATA = 50_000  # training images below which the ImageNet recipe's defaults earn a hint (ImageNet: 1.28M)


def describe_recipe(cfg: "TrainConfig") -> str:
    """One line: which recipe the run follows (the papers' ImageNet recipe, or the digits demo's) and what was
    changed from it."""
    def changes(base: TrainConfig) -> list[str]:
        return [f"{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in dataclasses.fields(TrainConfig)
                if f.name not in _NOT_RECIPE and getattr(cfg, f.name) != getattr(base, f.name)]

    # the recipe the run is closest to: the demo's on other data too (--config configs/digits_demo.yaml)
    own = D.builtin_name(cfg.data)
    demo, paper = changes(TrainConfig(**BUILTIN_RECIPES[own or "digits"])), changes(TrainConfig())
    builtin = own is not None or len(demo) < len(paper)
    changed = demo if builtin else paper
    name = ("the built-in digits' demo recipe" if own in (None, "digits") else f"the built-in {own} recipe") \
        if builtin else "the papers' ImageNet recipe"
    return (f"recipe: {name}, {cfg.model}, {cfg.epochs} epochs at {cfg.img_size}px, batch {cfg.batch_size}"
            f"{f' x {cfg.accum_steps}' if cfg.accum_steps > 1 else ''} per process, base lr {cfg.base_lr:g}, "
            f"{cfg.workers} worker(s); " + (f"changed: {', '.join(changed)}" if changed else "unchanged"))


def small_data_hint(cfg: "TrainConfig", train_images: int | None) -> str | None:
    """For a small dataset trained with the ImageNet recipe's length and size unchanged: what to try instead."""
    if D.is_builtin(cfg.data) or train_images is None or train_images >= SMALL_DATA:
        return None
    if (cfg.epochs, cfg.img_size) != (TrainConfig.epochs, TrainConfig.img_size):
        return None
    return (f"hint: {train_images:,} training images, and the ImageNet recipe's {cfg.epochs} epochs at {cfg.img_size}px "
            "(made for 1.28M images): on a small set, start from ImageNet weights and train for less, e.g. "
            f"--pretrained {cfg.model} --epochs 30 --warmup-epochs 2 (docs/training.md: fine-tuning)")


POSITIVE = real(0, lo_open=True)
# The allowed values of every numeric option (each element of a list), checked when the options are resolved
# (flags and YAML alike) and shown in `metaformer train --help`.
RANGES: dict[str, Range] = {
    "depths": whole(1, 100), "dims": whole(1, 8192), "drop_path": real(0, 1, hi_open=True),
    "layer_decay": real(0, 1, lo_open=True), "frozen_stages": whole(-1, 16),
    "head_warmup_epochs": whole(0, MAX_EPOCHS),
    "img_size": IMG_SIZE, "workers": WORKERS, "epochs": whole(1, MAX_EPOCHS), "batch_size": BATCH,
    "accum_steps": whole(1, MAX_BATCH), "base_lr": POSITIVE, "lr": POSITIVE, "min_lr": real(0), "warmup_lr": real(0),
    "warmup_epochs": whole(0, MAX_EPOCHS), "opt_eps": POSITIVE, "opt_betas": real(0, 1, hi_open=True),
    "weight_decay": real(0), "clip_grad": POSITIVE, "smoothing": real(0, 1, hi_open=True), "mixup": real(0),
    "cutmix": real(0), "mixup_prob": PROBABILITY, "mixup_switch_prob": PROBABILITY, "color_jitter": real(0),
    "scale": real(0, 1, lo_open=True), "ratio": POSITIVE, "hflip": PROBABILITY, "reprob": PROBABILITY, "recount": whole(1, 100),
    "ema_decay": real(0, 1, hi_open=True), "seed": SEED, "log_interval": whole(1),
}
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "rsqrt", "constant")  # timm's, stepped per update
ERASE_MODES = ("pixel", "rand", "const")


def check_config(cfg: "TrainConfig") -> None:
    """Every option's value against its range and meaning, before anything is built: a ConfigError naming the
    option and what it takes."""
    for name, allowed in RANGES.items():
        value, flag = getattr(cfg, name), f"--{name.replace('_', '-')}"
        for v in value if isinstance(value, (list, tuple)) else [] if value is None else [value]:
            allowed.check(v, flag)
    if len(cfg.opt_betas) != (3 if cfg.opt.lower().endswith("adan") else 2):
        raise ConfigError(f"--opt-betas takes {3 if cfg.opt.lower().endswith('adan') else 2} values (e.g. 0.9 "
                          f"0.999), got {len(cfg.opt_betas)}")
    if cfg.batch_size < 2 and (cfg.mixup > 0 or cfg.cutmix > 0):
        raise ConfigError("Mixup and CutMix mix the images of a batch in pairs, so --batch-size must be at least 2; or "
                          "turn them off with --mixup 0 --cutmix 0")
    if len(cfg.scale) != 2 or cfg.scale[0] > cfg.scale[1]:
        raise ConfigError(f"--scale takes two values MIN MAX with MIN <= MAX (e.g. 0.08 1.0), got {cfg.scale}")
    if len(cfg.ratio) != 2 or cfg.ratio[0] > cfg.ratio[1]:
        raise ConfigError(f"--ratio takes two values MIN MAX with MIN <= MAX (e.g. 0.75 1.333), got {cfg.ratio}")
    from timm.data.transforms import str_to_interp_mode
    from timm.optim import get_optimizer_info

    try:
        get_optimizer_info(cfg.opt.lower().removeprefix("lookahead_"))
    except ValueError:
        raise ConfigError(f"--opt {cfg.opt!r}: timm has no such optimizer (e.g. adamw, lamb, sgd; "
                          "timm.optim.list_optimizers() lists them)") from None
    if cfg.sched not in SCHEDULERS:
        raise ConfigError(f"--sched {cfg.sched!r}: choose one of {', '.join(SCHEDULERS)} (timm's schedulers that step "
                          "with every update)")
    if cfg.train_interpolation != "random":
        try:
            str_to_interp_mode(cfg.train_interpolation)
        except KeyError:
            raise ConfigError(f"--train-interpolation {cfg.train_interpolation!r}: choose random, nearest, bilinear, "
                              "bicubic, box, hamming or lanczos") from None
    if cfg.remode not in ERASE_MODES:
        raise ConfigError(f"--remode {cfg.remode!r}: choose one of {', '.join(ERASE_MODES)}")
    if cfg.aa not in (None, "", "none"):
        from timm.data import create_transform

        try:
            create_transform(input_size=32, is_training=True, auto_augment=cfg.aa)
        except Exception as e:  # timm asserts, or fails to parse, a policy it does not know
            raise ConfigError(f"--aa {cfg.aa!r} is not a timm augmentation policy ({type(e).__name__}: {e}); e.g. "
                              "rand-m9-mstd0.5-inc1, augmix-m5-w3, original, v0, or '' for none") from None


# Scaled down for the built-in digits so the first run ends in ~3 minutes on 2 CPU cores:
# PoolFormer-S12's architecture at half depth and width, 32 px, and augmentations that suit
# digits (no flips: a mirrored 2 is not a 2; no Mixup/erasing: 1.4k images, 10 epochs).
DEMO = dict(model="poolformer_s12", depths=[1, 1, 3, 1], dims=[32, 64, 128, 256], drop_path=0.0, img_size=32,
            epochs=10, batch_size=64, base_lr=1.6e-2, warmup_epochs=1, mixup=0.0, cutmix=0.0,
            aa="rand-m5-mstd0.5-inc1", scale=[0.5, 1.0], hflip=0.0, reprob=0.0, train_interpolation="bicubic",
            workers=0, output="runs/digits")
# The built-in odd-one-out task (metaformer.data.builtin): the demo's network and schedule on whole images, as
# they are evaluated (uncropped: metaformer.data.eval_crop), with no augmentation that moves or blends the
# quadrants (crops, RandAugment's translations and shears, flips: the odd digit would change place; Mixup and
# CutMix are off already): the set's fixed layout is part of the task.
ODD_ONE_OUT = dict(DEMO, aa=None, color_jitter=0.0, scale=[1.0, 1.0], ratio=[1.0, 1.0], output="runs/odd-one-out")
BUILTIN_RECIPES = {"digits": DEMO, "odd-one-out": ODD_ONE_OUT}


def builtin_recipe(data) -> dict | None:
    """The defaults of a built-in data set's recipe (None for other data)."""
    name = D.builtin_name(data)
    return None if name is None else dict(BUILTIN_RECIPES[name])


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


CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the papers' recipes and the demo's, shipped in the package


def config_path(name: str) -> str:
    """``--config``: a YAML file, or a recipe shipped with metaformer by name (``digits_demo``), also under the
    clone's path (``configs/digits_demo.yaml``) in a folder that has no such file (an installed wheel)."""
    path = Path(name)
    if path.exists():
        return name
    packaged = CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if packaged.is_file() and (len(path.parts) == 1 or path.parent.name == "configs"):
        return str(packaged)
    shipped = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file {name} does not exist; the recipes shipped with metaformer (--config NAME): "
                      f"{shipped}")


def resolve_config(flags: dict | None = None, config_file: str | None = None) -> TrainConfig:
    """Defaults (the paper's, or :data:`DEMO` for the built-in data) < YAML file < flags; every value
    checked against its option's type (so ``lr: 1e-3`` is a number, and ``epochs: ten`` an error)."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    from_file = {}
    if config_file:
        from_file = yaml12.load_file(config_path(config_file)) or {}
        if not isinstance(from_file, dict):
            raise ConfigError(f"config file {config_file} must be a YAML mapping of option: value")
        from_file = {str(k).replace("-", "_"): v for k, v in from_file.items()}
        unknown = sorted(set(from_file) - set(fields))
        if unknown:
            raise ConfigError(f"unknown option(s) in {config_file}: {', '.join(unknown)} (see `metaformer train "
                              "--help`)")
        from_file = {k: coerce_option(k, v, fields[k], config_file) for k, v in from_file.items()}
        for k, v in from_file.items():
            for item in (v if isinstance(v, list) else [v]) if k in RANGES and v is not None else []:
                RANGES[k].check(item, f"{config_file}: {k}")
    cli = {k: coerce_option(k, v, fields[k], f"--{k.replace('_', '-')}") for k, v in (flags or {}).items() if v is not None}
    user = {**from_file, **cli}
    base = builtin_recipe(user.get("data")) or {}
    cfg = TrainConfig(**{**base, **user})
    check_config(cfg)
    return cfg


# Options a resumed run may not change: they define the network, or the data order and the
# number of steps per epoch that the checkpoint's position (epoch, step) refers to. Every other
# option applies from the resumed step on (the schedule is re-planned), and the change is logged.
FIXED_ON_RESUME = ("model", "depths", "dims", "model_kwargs", "img_size", "seed", "batch_size", "accum_steps")
_NOT_COMPARED = ("resume", "output", "overwrite", "pretrained")  # the weights a run started from


def resume_changes(saved: dict, cfg: TrainConfig, world: int, saved_world: int) -> dict[str, tuple]:
    """``{option: (checkpoint's value, this run's)}`` for options that changed; refuses the fixed ones."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as stored
    before = D.builtin_name(saved.get("data"))
    same_data = before is not None and before == D.builtin_name(now.get("data"))
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


def keep_previous_config(out: Path) -> Path | None:
    """Rename ``config.yaml`` to the next free ``config.N.yaml`` (a resumed run never loses the original)."""
    current = out / "config.yaml"
    if not current.exists():
        return None
    n = 1
    while (out / f"config.{n}.yaml").exists():
        n += 1
    current.rename(out / f"config.{n}.yaml")
    return out / f"config.{n}.yaml"

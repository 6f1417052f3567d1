"""``metaformer train``: every option of :class:`metaformer.tasks.train_config.TrainConfig` as a flag.

Flags beat ``--config file.yaml``, which beats the defaults (the paper's recipe, or the
scaled-down demo for the built-in digits).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .. import yaml12
from .common import add_json, logs_to_stderr, print_json


def _flag_type(annotation: str, allowed=None) -> dict:
    """argparse's type for an option; a numeric one is parsed and checked against its range (``allowed``)."""
    if annotation.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction}
    if annotation.startswith("list[int]"):
        return {"type": allowed or int, "nargs": "+"}
    if annotation.startswith("list[float]"):
        return {"type": allowed or float, "nargs": "+"}
    if annotation.startswith("dict"):
        return {"type": lambda text: yaml12.load(text, "--model-kwargs"), "metavar": "YAML"}
    if annotation.startswith("int"):
        return {"type": allowed or int}
    if annotation.startswith("float"):
        return {"type": allowed or float}
    return {"type": str}


def add_parser(subparsers) -> None:
    from ..tasks.train_config import DEMO, RANGES, TrainConfig

    p = subparsers.add_parser(
        "train", description="Train a MetaFormer with the paper's recipe (AdamW, warm-up + cosine, Mixup/CutMix, RandAugment, "
                    "random erasing, label smoothing). Without --data: the built-in digits with scaled-down "
                    "defaults (" + ", ".join(f"{k}={v}" for k, v in DEMO.items()) + "). "
                    "Distributed: torchrun --nproc_per_node=N -m metaformer train ... Recipes: docs/training.md.")
    p.add_argument("--config", metavar="FILE", help="YAML file of options (flags override it), or the name of a "
                   "recipe shipped with metaformer: digits_demo, poolformer_s12_imagenet, caformer_s18_imagenet, ... "
                   "(the clone's configs/ folder)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata["help"]
        if f.name in RANGES:
            text += f" ({RANGES[f.name].describe()})"
        if default not in (None, False) and "default" not in text:  # the real default is resolved later (YAML)
            text += f" (default: {default})"
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=text,
                       **_flag_type(str(f.type), RANGES.get(f.name)))
    add_json(p, "print the run's summary as JSON at the end")
    p.set_defaults(func=run, weights_flag="--pretrained")  # where a download that failed can be given as a file


def run(args) -> int:
    from . import UserError
    from ..engine.stop import Interrupted, TrainingDiverged
    from ..tasks.classification import train
    from ..tasks.train_config import TrainConfig, resolve_config

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if flags["model_kwargs"] is not None and not isinstance(flags["model_kwargs"], dict):
        raise UserError("--model-kwargs must be a YAML mapping, e.g. \"{token_mixers: identity}\"")
    cfg = resolve_config(flags, args.config)
    try:
        with logs_to_stderr(args.json):
            summary = train(cfg)
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    except Interrupted as e:
        print(f"metaformer train: {e}", file=sys.stderr)
        return 130
    if args.json and summary is not None:
        print_json(summary)
    return 0

"""Hub-style folders: ``model.safetensors`` + ``config.json`` (+ class names), nothing else needed.

``save_pretrained(model, dir)`` writes a folder that ``from_pretrained(dir)`` rebuilds exactly;
``from_pretrained`` also takes a Hugging Face hub id (``owner/name``) when online.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import nn

from ..atomic import atomic_write
from ..weights import WeightsError, jsonable_config, save_weights
from ..zoo import load_model, rebuild

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_pretrained(model: nn.Module, directory: str | os.PathLike, class_names: list[str] | None = None) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    class_names = class_names if class_names is not None else getattr(model, "class_names", None)
    save_weights(model, directory / WEIGHTS_NAME, class_names=class_names)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    config = {
        "architecture": getattr(model, "variant", None),
        "config": jsonable_config(model.config),
        "class_names": class_names,
        # what a user needs to preprocess as the numbers were measured (timm's pretrained_cfg keys)
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()
                          if k in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")} or None,
    }
    atomic_write(directory / CONFIG_NAME, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    return directory


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(f"{repo_id!r} is not a local folder, and loading a hub id needs huggingface_hub "
                           "(pip install huggingface_hub); or download the folder and pass its path") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME]))
    except Exception as e:  # offline, unknown repo, auth: one clear line either way
        raise WeightsError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no details'}); if this machine is offline, "
                           "download the folder elsewhere and pass its local path") from None


def from_pretrained(source: str | os.PathLike, **overrides) -> nn.Module:
    """Rebuild a model from a folder written by :func:`save_pretrained`, or from a hub id."""
    path = Path(source)
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith("."):
            path = _download(str(source))
        else:
            raise WeightsError(f"{source}: no such folder (a hub id looks like 'owner/name')")
    if path.is_file():
        return load_model(path, **overrides)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise WeightsError(f"{path} is not a metaformer folder: {f.name} is missing "
                               "(save one with metaformer.save_pretrained(model, dir))")
    try:
        saved = json.loads(cfg_file.read_text())
        config = dict(saved["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{cfg_file}: not a valid metaformer config.json ({e})") from None
    return rebuild(config, saved.get("architecture"), weights_file, saved.get("class_names"), **overrides)

"""Self-describing weights: a safetensors file whose metadata alone rebuilds the model."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from ..models.layers import ACTIVATIONS, NORMS
from ..models.mixers import TOKEN_MIXERS
from .io import WeightsError, read_safetensors_metadata, read_torch, resolve
from .layouts import FORMAT_NAME

FORMAT_VERSION = "1"


def _class_name(kind: str, registry: dict[str, type], obj: Any) -> str:
    for name, cls in registry.items():
        if cls is obj:
            return name
    if kind == "token mixer":
        raise WeightsError(
            f"cannot save the config: token mixer {getattr(obj, '__qualname__', obj)!r} is not registered by "
            "name, so a saved file could not rebuild the model. Register it with "
            "@metaformer.register_token_mixer('my_mixer') (and import it before metaformer.load_model).")
    raise WeightsError(f"cannot save the config: {kind} {getattr(obj, '__qualname__', obj)!r} has no registered "
                       f"name; use one of {sorted(registry)} so the saved file can rebuild the model.")


def jsonable_config(config: dict, strict: bool = True) -> dict:
    """The model's config as JSON: registered classes by name (an unregistered one cannot be rebuilt)."""
    registries = {"token_mixers": ("token mixer", TOKEN_MIXERS), "norm": ("norm", NORMS),
                  "head_norm": ("norm", NORMS), "stem_norm": ("norm", NORMS), "downsample_norm": ("norm", NORMS),
                  "act": ("activation", ACTIVATIONS)}

    def encode(key, value):
        if isinstance(value, (list, tuple)):
            return [encode(key, v) for v in value]
        if isinstance(value, dict):
            return {k: encode(k, v) for k, v in value.items()}
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if key in registries and callable(value):
            try:
                return _class_name(*registries[key], value)
            except WeightsError:
                if strict:
                    raise
                return repr(value)
        if strict:
            raise WeightsError(f"cannot save the config: {key}={value!r} is not JSON-serialisable")
        return repr(value)

    return {k: encode(k, v) for k, v in config.items()}


def save_weights(model: nn.Module, path: str | os.PathLike, *, class_names: list[str] | None = None,
                 extra: dict | None = None) -> Path:
    """Write ``model``'s weights as safetensors with metadata that alone rebuilds the model.

    Metadata: ``format=metaformer``, ``config`` (JSON of ``model.config``), ``variant``,
    optionally ``class_names`` (JSON list) and ``extra`` (any JSON). The file is written
    atomically: a crash never leaves a half-written file under ``path``.
    """
    from safetensors.torch import save as st_save

    from .. import __version__

    config = getattr(model, "config", None)
    if config is None:
        raise WeightsError(f"a {type(model).__name__} has no .config to rebuild it from: save_weights writes "
                           "MetaFormer models (metaformer.MetaFormer or metaformer.create_model)")
    if getattr(model, "pruned", False):
        raise WeightsError("this model was pruned with prune_intermediate_layers, so its config no longer "
                           "describes it: save the full model, and prune it again after loading")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        n = config.get("num_classes")
        if n and len(class_names) != n:
            raise WeightsError(f"{len(class_names)} class names for a {n}-class model")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(jsonable_config(config), sort_keys=True),
        "variant": getattr(model, "variant", None) or "",
        "metaformer_version": __version__,
    }
    if class_names is not None:
        metadata["class_names"] = json.dumps(class_names)
    if extra is not None:
        try:
            metadata["extra"] = json.dumps(extra, sort_keys=True)
        except TypeError as e:
            raise WeightsError(f"extra must be JSON-serialisable: {e}") from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    data = st_save(tensors, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


def read_metadata(path: str | os.PathLike) -> dict:
    """``{'config', 'variant', 'class_names', 'extra', 'format_version', 'metaformer_version'}`` of a file
    written by :func:`save_weights`."""
    path = resolve(path)
    try:
        meta = read_safetensors_metadata(path)
    except WeightsError:
        if not path.name.endswith(".safetensors"):
            raise WeightsError(f"{path}: not a metaformer safetensors file (written by metaformer.save_weights); "
                               "to load a checkpoint of another layout into a model, use load_weights") from None
        raise
    if meta.get("format") != FORMAT_NAME or "config" not in meta:
        raise WeightsError(f"{path}: a safetensors file without metaformer metadata, so it cannot rebuild a model: "
                           "create the model yourself and call metaformer.load_weights(model, path)")
    variant = meta.get("variant") or None
    return {
        "config": metadata_json(meta, "config", path),
        "variant": variant,
        "class_names": metadata_json(meta, "class_names", path) if "class_names" in meta else None,
        "extra": metadata_json(meta, "extra", path) if "extra" in meta else None,
        "format_version": meta.get("format_version"),
        "metaformer_version": meta.get("metaformer_version"),
    }


def metadata_json(meta: dict[str, str], key: str, path) -> Any:
    """The JSON value stored under ``key`` in a safetensors file's metadata; a damaged one is a WeightsError."""
    try:
        value = json.loads(meta[key])
    except ValueError as e:
        raise WeightsError(f"{path}: its {key!r} metadata is not valid JSON ({e}); the file was damaged or edited: "
                           "save or download it again") from None
    kinds = {"config": dict, "class_names": list}
    if key in kinds and not isinstance(value, kinds[key]):
        raise WeightsError(f"{path}: its {key!r} metadata holds a {type(value).__name__}, not a "
                           f"{kinds[key].__name__}; the file was damaged or edited: save or download it again")
    return value


def stored_metadata(path: Path) -> dict | None:
    """``{'config', 'variant', 'class_names'}`` of a checkpoint written by this library, else None."""
    if path.name.endswith(".safetensors"):
        try:
            ours = read_safetensors_metadata(path).get("format") == FORMAT_NAME
        except WeightsError:
            return None  # unreadable: load_weights says precisely why
        return read_metadata(path) if ours else None  # damaged metadata of ours is an error, not "no metadata"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        read_torch(path)  # raises the precise error: corrupt, truncated, or refused (pickled code)
        return None
    if isinstance(obj, dict) and obj.get("task") in ("detect", "segment"):
        raise WeightsError(f"{path} is a `metaformer {obj['task']}` checkpoint, not a classifier: evaluate it with "
                           f"`metaformer {obj['task']} eval --checkpoint {path} ...`")
    if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict):
        return {"config": obj["model_config"], "variant": obj.get("variant"), "class_names": obj.get("class_names")}
    return None

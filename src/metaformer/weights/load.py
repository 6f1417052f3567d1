"""One loader that detects the checkpoint layout and fits it to the model strictly.

Loading is strict: any missing, unexpected or shape-mismatched key raises
:class:`WeightsError` naming the file, the layout and the keys, with a hint (the
architecture the file holds, which the zoo turns into a variant name). The differences that
are expected are handled and reported in :class:`LoadReport`:

- another ``num_classes``: only the classifier is re-initialised (with a warning);
- another ``in_chans``: the stem is adapted (timm's ``adapt_input_conv``);
- a position embedding for another token grid: bicubic resize;
- a ``features_only`` backbone: the classifier is dropped, the new per-stage norms keep their
  initialisation;
- ``nn.Linear`` weights where the model has 1x1 convs (the Baselines' release, timm's CAFormer
  attention stages): reshaped, the same numbers.

**PoolFormer v1's head.** timm's PoolFormer v1 applies a channel LayerNorm *after* global
pooling; the authors (and this library) apply GroupNorm(1) to the last map *before* pooling.
The parameters have the same names and shapes, so timm-layout weights load without
conversion and the model keeps the authors' head math: with the same weights our logits
equal the authors' (they differ slightly from timm's), while every stage's features equal timm's.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .io import WeightsError, fmt_list, read_state_dict
from .layouts import detect_layout, to_ours


@dataclass
class LoadReport:
    """What :func:`load_weights` did. Keys are in this library's layout."""

    source: str
    layout: str
    loaded: int = 0  # tensors copied from the file
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, file shape, model shape)
    reinitialised: list[str] = field(default_factory=list)  # model tensors left at their initial values
    adapted: list[str] = field(default_factory=list)  # tensors converted to fit (stem channels, pos-embed grid)
    dropped: list[str] = field(default_factory=list)  # file tensors the model has no place for by design
    no_classifier: bool = False  # the file has none (num_classes=0): the model's stays at its initialisation

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


class NonFiniteWeights(WeightsError):
    """Weights holding NaN or inf (``load_weights(..., allow_nonfinite=True)`` loads them anyway)."""


def check_finite(sd: dict[str, torch.Tensor], path: Any) -> None:
    """Refuse weights holding NaN or inf: they load without complaint and every output is then NaN."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        # No word of a way around it here: only the verbs that inspect weights (eval, predict, export, cam) have
        # one, and they add it (metaformer.tasks.inference); training from or converting NaN has no use.
        raise NonFiniteWeights(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf values: {fmt_list(bad)}. These weights are broken "
            "(saved from a diverged run?): use a checkpoint from before the divergence")


def architecture(keys_shapes: dict[str, tuple]) -> dict | None:
    """Depths, dims, per-stage mixers and head of our-layout keys: which model a file holds."""
    depths: dict[int, int] = {}
    dims: dict[int, int] = {}
    mixer_params: dict[int, set] = {}
    for key, shape in keys_shapes.items():
        parts = key.split(".")
        if len(parts) < 6 or parts[0] != "stages" or parts[2] != "blocks":
            continue
        i, j = int(parts[1]), int(parts[3])
        depths[i] = max(depths.get(i, 0), j + 1)
        if parts[4:] == ["norm1", "weight"]:
            dims[i] = shape[0]
        if parts[4] == "token_mixer":
            mixer_params.setdefault(i, set()).add(parts[5])
    if not depths or sorted(depths) != list(range(len(depths))):
        return None
    n = len(depths)
    return dict(depths=[depths[i] for i in range(n)], dims=[dims.get(i) for i in range(n)],
                token_mixers=[mixer_of(mixer_params.get(i, set())) for i in range(n)],
                stem_norm="stem.norm.weight" in keys_shapes, mlp_head="head.fc.fc1.weight" in keys_shapes)


def mixer_of(params: set) -> str:
    """A stage's mixer from its parameter names. Parameter-free mixers (pooling, identity) leave no
    trace, so both read as "pooling"; :func:`architecture` compares like with like."""
    for name, mixer_name in (("qkv", "attention"), ("pwconv1", "sepconv"), ("proj", "spatial_mlp"),
                             ("conv", "dwconv"), ("random_matrix", "random")):
        if name in params:
            return mixer_name
    return "pooling"


def _hint(converted: dict[str, tuple], model: nn.Module, mismatched: list,
          name_match: Callable[[dict], list[str]] | None) -> str:
    file_arch = architecture({k: tuple(v.shape) for k, (_, v) in converted.items()})
    model_arch = architecture({k: tuple(v.shape) for k, v in model.state_dict().items()})
    if file_arch and model_arch and file_arch != model_arch:
        matches = name_match(file_arch) if name_match else []
        if matches:
            return (f"this looks like {' or '.join(matches)} weights: build that variant, e.g. "
                    f"metaformer.create_model({matches[0]!r}, pretrained=<this file>)")
        return (f"the file holds depths={file_arch['depths']}, dims={file_arch['dims']}, "
                f"mixers={file_arch['token_mixers']}; the model has depths={model_arch['depths']}, "
                f"dims={model_arch['dims']}, mixers={model_arch['token_mixers']}")
    if any(".token_mixer." in k or ".random_matrix" in k for k, _, _ in mismatched):
        return ("token-mixing parameters are sized for another token grid: rebuild the model with the input size "
                "the weights were trained at (img_size=..., 224 for the authors' releases)")
    return ("the model's config differs from the file's (norm, layer scale, MLP ratio?): build the model the file "
            "was saved from (from Python, load_weights(model, file, strict=False) loads only the tensors that fit)")


def load_weights(model: nn.Module, source: Any, strict: bool = True, allow_nonfinite: bool = False,
                 sha256: str | None = None, name_match: Callable[[dict], list[str]] | None = None,
                 ema: bool = False) -> LoadReport:
    """Load a checkpoint of any supported layout into ``model``; see the module docstring.

    Args:
        model: a :class:`metaformer.MetaFormer` (or its ``features_only`` backbone).
        source: a path (``str``/``Path``), an ``http(s)://``/``file://`` URL (cached), or a state dict.
        strict: raise :class:`WeightsError` on any missing, unexpected or mismatched key
            (besides the expected differences). ``False`` loads what fits and reports the rest.
        allow_nonfinite: load tensors holding NaN or inf instead of refusing the file.
        sha256: the file's published checksum, verified after a download.
        name_match: names the registered variants whose architecture a file holds (for the hint).
        ema: load a training checkpoint's EMA weights (ours, timm's ``state_dict_ema``, DeiT's ``model_ema``).
    """
    sd, metadata, path = read_state_dict(source, sha256, ema)
    if not allow_nonfinite:
        check_finite(sd, path)
    layout = detect_layout(sd, metadata)
    if layout is None:
        raise WeightsError(
            f"{path}: unknown key layout (first keys: {fmt_list(sorted(sd), 6)}). Known layouts: PoolFormer's "
            "release (patch_embed.proj, network.N.M.*), the MetaFormer Baselines' release (downsample_layers.*), "
            "timm (stem.conv, stages.i.blocks.j.*), Hugging Face transformers (poolformer.encoder.*), and "
            "metaformer's own safetensors. Is this a PoolFormer/MetaFormer checkpoint?")
    converted = to_ours(sd, layout)
    report = LoadReport(source=str(path), layout=layout)
    if layout == "metaformer":
        _warn_config_difference(model, metadata, path)

    own = model.state_dict()
    not_weights = [f"{k} ({v.dtype})" for k, (_, v) in converted.items()
                   if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if not_weights:  # load_state_dict would cast them silently: 0/1 or integer "weights" give a useless model
        raise WeightsError(f"{path}: {len(not_weights)} tensor(s) where the model has floating-point weights hold "
                           f"integers or booleans: {fmt_list(not_weights, 4)}. These are not weights (a damaged or "
                           "mislabelled file?); nothing was loaded")
    features_only = "feature_norms.0.weight" in own or getattr(model, "config", {}).get("features_only", False)
    accepted: dict[str, torch.Tensor] = {}
    for key, (orig, value) in converted.items():
        if key not in own:
            # A backbone (features_only) or a num_classes=0 model has no classifier: dropped by design.
            if key.startswith("head.") and (features_only or key.startswith("head.fc.")):
                report.dropped.append(key)
            elif features_only and key.startswith("stages.") and int(key.split(".")[1]) >= len(model.stages):
                report.dropped.append(key)  # stages after the last output are not part of the backbone
            else:
                report.unexpected.append(key if key == orig else f"{key} (file: {orig})")
            continue
        target = own[key]
        if value.shape != target.shape:
            value = _fit(key, value, target, report)
            if value is None:
                continue
        accepted[key] = value

    headless = not any(k.startswith("head.fc.") for k in converted)  # saved with num_classes=0 (features only)
    for key in own:
        if key in accepted or key in report.reinitialised or any(k == key for k, _, _ in report.mismatched):
            continue
        if features_only and key.startswith("feature_norms."):
            report.reinitialised.append(key)  # the backbone's new per-stage norms start at their init
        elif headless and key.startswith("head.fc."):
            if not report.no_classifier:
                warnings.warn(f"{path} has no classifier (saved with num_classes=0): the model's classifier keeps "
                              "its initialisation; every other tensor is loaded", stacklevel=2)
            report.reinitialised.append(key)
            report.no_classifier = True
        else:
            report.missing.append(key)

    if strict and not report.ok:
        raise WeightsError(_mismatch_message(path, layout, model, report, converted, name_match))

    if report.reinitialised and any(k.startswith("head.fc.") for k in report.reinitialised):
        _reinit_classifier(model)
    with torch.no_grad():
        model.load_state_dict(accepted, strict=False)
    report.loaded = len(accepted)
    return report


def _fit(key: str, value: torch.Tensor, target: torch.Tensor, report: LoadReport):
    """The expected shape differences; None (and a report entry) when the tensor cannot fit."""
    classifier = key in ("head.fc.weight", "head.fc.bias", "head.fc.fc2.weight", "head.fc.fc2.bias")
    if classifier and value.shape[1:] == target.shape[1:]:
        if not any(k.startswith("head.fc.") for k in report.reinitialised):
            warnings.warn(f"the weights have a {value.shape[0]}-class classifier and the model "
                          f"{target.shape[0]} classes: re-initialising the classifier ({key.rsplit('.', 1)[0]}); "
                          "every other tensor is loaded", stacklevel=3)
        report.reinitialised.append(key)
        return None
    if value.numel() == target.numel() and value.shape[:2] == target.shape[:2] \
            and (value.ndim == 2 or target.ndim == 2) and max(value.ndim, target.ndim) == 4:
        return value.reshape(target.shape)  # nn.Linear <-> 1x1 conv: the same weights
    if key == "stem.conv.weight" and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:] \
            and value.shape[1] == 3:
        from timm.models import adapt_input_conv

        report.adapted.append(f"{key}: {value.shape[1]} -> {target.shape[1]} input channels")
        return adapt_input_conv(target.shape[1], value)
    if key.endswith("pos_embed.pos") and value.ndim == 4 and value.shape[:2] == target.shape[:2]:
        report.adapted.append(f"{key}: {value.shape[2]}x{value.shape[3]} -> {target.shape[2]}x{target.shape[3]} "
                              "grid (bicubic)")
        return F.interpolate(value.float(), size=tuple(target.shape[2:]), mode="bicubic",
                             align_corners=False).to(value.dtype)
    report.mismatched.append((key, tuple(value.shape), tuple(target.shape)))
    return None


def _reinit_classifier(model: nn.Module) -> None:
    fc = model.head.fc
    init = getattr(model, "_init_weights", None)
    if init is not None:
        fc.apply(init)
    else:
        for m in fc.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t) + "]"


def _mismatch_message(path: Path, layout: str, model: nn.Module, report: LoadReport, converted: dict,
                      name_match) -> str:
    name = getattr(model, "variant", None) or type(model).__name__
    lines = [f"cannot load {path} (layout: {layout}) into {name} strictly:"]
    if report.missing:
        lines.append(f"  missing from the file ({len(report.missing)}): {fmt_list(report.missing)}")
    if report.unexpected:
        lines.append(f"  unexpected in the file ({len(report.unexpected)}): {fmt_list(report.unexpected)}")
    if report.mismatched:
        shown = [f"{k} {_shape(a)} in file vs {_shape(b)} in model" for k, a, b in report.mismatched]
        lines.append(f"  shape mismatch ({len(shown)}): {fmt_list(shown)}")
    lines.append("hint: " + _hint(converted, model, report.mismatched, name_match))
    return "\n".join(lines)


# Options that change only the classifier, the inputs or training, not the weights' meaning: a file saved with
# other values still loads into the model as its architecture.
NOT_ARCHITECTURE = {"num_classes", "in_chans", "features_only", "out_indices", "drop_path_rate", "drop_rate",
                    "img_size", "head_dropout", "global_pool", "feature_norm"}


def _warn_config_difference(model: nn.Module, metadata: dict, path: Path) -> None:
    from .save import jsonable_config

    ours = getattr(model, "config", None)
    if not ours or "config" not in metadata:
        return
    from .save import metadata_json

    saved = metadata_json(metadata, "config", path)
    mine = json.loads(json.dumps(jsonable_config(ours, strict=False)))
    diff = sorted(k for k in set(saved) | set(mine) if k not in NOT_ARCHITECTURE and k in saved and k in mine
                  and saved.get(k) != mine.get(k))
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (model: {mine.get(k)!r})" for k in diff)
        warnings.warn(f"{path} was saved from a model with {shown}; the weights fit but the outputs will "
                      "differ. metaformer.load_model(path) rebuilds the saved model.", stacklevel=3)

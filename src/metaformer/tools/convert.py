"""Convert a checkpoint from any layout we read to another: ours, the authors', timm's, Hugging Face's.

The file is loaded strictly into the model it describes (its own config for our files; the
registered variant its layers match, or ``--model``), written in the target layout to a
temporary name, read back and run, and renamed into place only when its logits equal the
source's: a converted file is never silently different. A Hugging Face folder is checked in
``transformers.PoolFormerForImageClassification`` itself when transformers is installed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path, check_writable
from ..errors import MetaFormerError, MissingDependency, require
from ..weights import architecture, detect_layout, from_ours, read_state_dict, save_weights, to_ours
from ..weights.io import WeightsError
from ..zoo import build_from_config, create_model, load_weights, variants_matching
from ..zoo.registry import split_name

TARGETS = ("ours", "authors", "authors_v2", "timm", "hf")
TOLERANCE = 1e-5  # max |logit difference| relative to the largest |logit| (the same numbers, other kernels)


class ConvertError(MetaFormerError):
    """A checkpoint that cannot be written in the layout asked for, or whose conversion does not check out."""


@dataclass
class ConvertResult:
    path: Path
    layout: str
    variant: str | None
    source_layout: str
    max_diff: float  # relative to the largest |logit|
    checked_in: list[str] = field(default_factory=list)  # the runtimes the written file was run in
    skipped: list[str] = field(default_factory=list)  # checks that could not run here, and why


def _num_classes(converted: dict) -> int:
    for key in ("head.fc.weight", "head.fc.fc2.weight"):
        if key in converted:
            return int(converted[key][1].shape[0])
    return 0


def load_source(src: str, model_name: str | None = None, img_size: int | None = None) -> tuple[nn.Module, str]:
    """The model a checkpoint describes, with its weights loaded strictly; and the file's layout."""
    from ..tasks.inference import resolve_checkpoint
    from ..weights.save import stored_metadata

    path = resolve_checkpoint(src, "SRC")
    sd, metadata, path = read_state_dict(path)
    layout = detect_layout(sd, metadata)
    if layout is None:
        raise ConvertError(f"{path}: not a checkpoint layout metaformer reads (first keys: {sorted(sd)[:4]})")
    meta = stored_metadata(path)  # ours: a save_weights file or a training checkpoint, with its config
    extra = {"img_size": img_size} if img_size else {}
    if meta is not None:
        model = build_from_config({**meta["config"], **extra}, meta["variant"])
        model.class_names = meta["class_names"]
    else:
        converted = to_ours(sd, layout)
        arch = architecture({k: tuple(v.shape) for k, (_, v) in converted.items()})
        if model_name is None:
            matches = variants_matching(arch) if arch else []
            if len(matches) != 1:
                what = f"it matches {', '.join(matches)}" if matches else "no registered variant has its layers"
                raise ConvertError(f"{path}: cannot tell which model this is ({what}); name the variant it is (or is "
                                   "a smaller or larger copy of) with --model")
            model_name = matches[0]
        if arch:  # a variant's design at the file's depths and widths (a scaled-down copy, say)
            extra.update(depths=arch["depths"], dims=arch["dims"])
        model = create_model(split_name(model_name)[0], num_classes=_num_classes(converted), **extra)
        model.class_names = None
    load_weights(model, path, strict=True)
    return model.eval(), layout


def _is_registered_size(model: nn.Module) -> bool:
    from ..zoo import get_model_info

    info = get_model_info(model.variant)
    return all(model.config[k] == list(info.config[k]) for k in ("depths", "dims"))


def _timm_own_names() -> set:
    import timm

    return {n for n in timm.list_models() if not n.startswith("metaformer_")}


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def hf_config(model: nn.Module, class_names: list[str] | None) -> dict:
    """transformers' PoolFormerConfig for a PoolFormer v1 model; an error for anything it cannot express."""
    c = model.config
    per_stage_same = all(not isinstance(c.get(k), (list, tuple)) or len(set(c[k])) == 1
                         for k in ("mlp_ratios", "layer_scale_init_value", "pool_size"))
    representable = (c.get("token_mixers", "pooling") in ("pooling", ["pooling"] * len(c["depths"])) and
                     c.get("norm", "mln") in ("mln", "gn1") and c.get("act", "gelu") == "gelu" and per_stage_same and
                     c.get("pool_subtract", True) and c.get("residual", True) and c.get("mixer_residual", True) and
                     c.get("use_mlp", True) and
                     c.get("layer_scale", True) is True and c.get("head_style", "norm_pool") == "norm_pool" and
                     c.get("mlp_bias", True) and not c.get("stem_norm") and len(c["depths"]) == 4 and
                     c.get("in_chans", 3) == 3 and c.get("norm_eps") in (None, 1e-5))
    if not representable:
        raise ConvertError("transformers' PoolFormer is PoolFormer v1 only (pooling with the subtraction, GroupNorm(1), "
                           "GELU, LayerScale, 4 stages, the same MLP ratio and pool size everywhere); this model is "
                           "another MetaFormer: convert it to ours, timm's or the authors' layout instead")

    def one(v):
        return v[0] if isinstance(v, (list, tuple)) else v

    n = c["num_classes"]
    names = class_names or [str(i) for i in range(n)]
    return {
        "architectures": ["PoolFormerForImageClassification"], "model_type": "poolformer",
        "num_channels": 3, "depths": list(c["depths"]), "hidden_sizes": list(c["dims"]),
        "patch_sizes": [7, 3, 3, 3], "strides": [4, 2, 2, 2], "padding": [2, 1, 1, 1], "num_encoder_blocks": 4,
        "mlp_ratio": float(one(c.get("mlp_ratios", 4))), "pool_size": int(one(c.get("pool_size", 3))),
        "hidden_act": "gelu", "use_layer_scale": True,
        "layer_scale_init_value": float(one(c.get("layer_scale_init_value", 1e-5))),
        "drop_path_rate": 0.0, "initializer_range": 0.02,
        "id2label": {str(i): name for i, name in enumerate(names)}, "label2id": {name: i for i, name in enumerate(names)},
    }


def _write(model: nn.Module, dst: Path, to: str, class_names: list[str] | None) -> None:
    if to == "ours":
        save_weights(model, dst, class_names=class_names)
        return
    hf = hf_config(model, class_names) if to == "hf" else None
    sd = {k: v.detach().contiguous() for k, v in from_ours(model.state_dict(), "huggingface" if to == "hf"
                                                              else to).items()}
    if hf is not None:
        from safetensors.torch import save_file

        dst.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    elif dst.name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(dst))
    else:
        torch.save(sd, dst)


def _check(model: nn.Module, written: Path, to: str, x: torch.Tensor,
           ref: torch.Tensor) -> tuple[float, list[str], list[str]]:
    """Run the written file; the largest relative logit difference, where it was run, and the checks skipped."""
    worst, ran, skipped = 0.0, [], []
    if to == "hf":
        try:
            transformers = require("transformers", "hf", "checking the folder in transformers itself")
        except MissingDependency as e:  # the folder is still checked in metaformer; say what was not run
            skipped.append(f"{e}; it was checked in metaformer only")
        else:
            hf = transformers.PoolFormerForImageClassification.from_pretrained(str(written)).eval()
            worst = max(worst, _rel(_logits(hf, x), ref))
            ran.append("transformers")
        written = written / "model.safetensors"
    if to == "timm" and model.variant in _timm_own_names() and _is_registered_size(model):
        # timm's own model of the same name, strictly: its stage features must be ours (its heads differ by
        # design: PoolFormer v1 normalises after pooling, the MLP head's LayerNorm eps is 1e-6).
        import timm

        theirs = timm.create_model(model.variant, pretrained=False, num_classes=model.num_classes).eval()
        sd = torch.load(written, map_location="cpu", weights_only=True) if not written.name.endswith(
            ".safetensors") else _read_safetensors(written)
        theirs.load_state_dict(sd, strict=True)
        with torch.no_grad():
            worst = max(worst, _rel(theirs.forward_features(x), model.forward_features(x)))
        ran.append("timm (features)")
    if to == "ours":
        from ..zoo import load_model

        back = load_model(written)
    else:
        back = build_from_config(model.config, model.variant)
        load_weights(back, written, strict=True)
    worst = max(worst, _rel(_logits(back.eval(), x), ref))
    ran.insert(0, "metaformer")
    return worst, ran, skipped


def convert(src: str, dst: str | os.PathLike, to: str, model_name: str | None = None,
            img_size: int | None = None) -> ConvertResult:
    """Write the checkpoint ``src`` as ``dst`` in layout ``to`` (see the module docstring)."""
    if to not in TARGETS:
        raise ConvertError(f"unknown layout {to!r}; choose one of {', '.join(TARGETS)}")
    dst = Path(dst)
    if to == "ours" and not dst.name.endswith(".safetensors"):
        raise ConvertError(f"our layout is a safetensors file: name it {dst.with_suffix('.safetensors')}")
    if dst.exists():
        raise ConvertError(f"{dst} already exists: remove it or choose another name")
    check_writable(dst, f"DST {dst}", folder=to == "hf")  # before the work
    model, source_layout = load_source(src, model_name, img_size)
    class_names = getattr(model, "class_names", None)
    torch.manual_seed(0)
    x = torch.randn(2, model.in_chans, *model.img_size)
    ref = _logits(model, x)
    with atomic_path(dst) as tmp:  # renamed to dst only once its logits are checked
        try:
            _write(model, tmp, to, class_names)
        except WeightsError as e:
            raise ConvertError(str(e)) from None
        diff, ran, skipped = _check(model, tmp, to, x, ref)
        if diff > TOLERANCE:
            raise ConvertError(f"the {to} file gives other logits than {src} (max relative difference {diff:.3g} > "
                               f"{TOLERANCE:g}); nothing was written")
    return ConvertResult(dst, to, model.variant, source_layout, diff, ran, skipped)

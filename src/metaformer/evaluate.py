"""Evaluation (top-1/top-5 with the variant's eval transform) and prediction.

A checkpoint trained here (``last.pth``/``best.pth`` of ``metaformer train``, or a
``save_weights`` safetensors file) carries its model config and class names, so the model
is rebuilt from it; any other layout ``metaformer.load_weights`` detects (the authors',
timm, Hugging Face) is loaded into the named variant.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from .data import DataError
from .models import build_from_config, create_model, get_model_info
from .weights import WeightsError


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


def imagenet_classes() -> tuple[list[str], list[str]]:
    """``(WordNet ids, short names)`` of ImageNet-1K in the standard order (sorted ids), shipped with the package."""
    from importlib.resources import files

    rows = [line.split("\t") for line in files("metaformer").joinpath("imagenet_classes.tsv").read_text().splitlines()
            if line and not line.startswith("#")]
    return [r[0] for r in rows], [r[1] for r in rows]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1K class names in the standard (sorted wnid) order."""
    return imagenet_classes()[1]


def default_class_names(num_classes: int) -> tuple[list[str], list[str] | None]:
    """``(names, aliases)`` for a model whose checkpoint names no classes: ImageNet's names (and its
    WordNet ids, so wnid folders map by name) for 1000 classes, else the indices ``'0'..'N-1'``."""
    if num_classes == 1000:
        wnids, names = imagenet_classes()
        return names, wnids
    return [str(i) for i in range(num_classes)], None


@dataclass
class Loaded:
    model: nn.Module
    class_names: list[str]
    img_size: int
    transform: object
    source: str
    preprocessing: dict = field(default_factory=dict)  # what built `transform`, as data
    class_aliases: list[str] | None = None  # other names of the same classes (ImageNet's WordNet ids)
    variant: str | None = None


def _resolve_checkpoint(checkpoint: str) -> Path:
    """A local checkpoint file: URLs are downloaded (cached); a folder or a missing path is named as such."""
    from .weights import EXTENSIONS, _is_url, _resolve

    if _is_url(checkpoint):
        return _resolve(checkpoint)
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        inside = sorted(q.name for q in path.iterdir() if q.name.endswith(EXTENSIONS))
        hint = f": pass one of the files inside, e.g. {path / inside[0]} ({', '.join(inside[:6])})" if inside else \
            f" without checkpoint files ({', '.join(EXTENSIONS)})"
        raise WeightsError(f"--checkpoint {checkpoint} is a folder, not a checkpoint file{hint}")
    if not path.exists():
        raise WeightsError(f"checkpoint {checkpoint} does not exist")
    return path


def _stored_metadata(path: Path) -> dict | None:
    """``{'config', 'variant', 'class_names'}`` of a checkpoint written by this library, else None."""
    from .weights import WeightsError, _read_torch, read_metadata

    if path.name.endswith(".safetensors"):
        try:
            return read_metadata(path)
        except WeightsError:
            return None  # a plain safetensors file: load_weights decides what it is
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        _read_torch(path)  # raises the precise error: corrupt, truncated, or refused (pickled code)
        return None
    if isinstance(obj, dict) and obj.get("task") in ("detect", "segment"):
        raise WeightsError(f"{path} is a `metaformer {obj['task']}` checkpoint, not a classifier: evaluate it with "
                           f"`metaformer {obj['task']} eval --checkpoint {path} ...`")
    if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict):
        return {"config": obj["model_config"], "variant": obj.get("variant"), "class_names": obj.get("class_names")}
    return None


def load_for_inference(model_name: str | None, checkpoint: str | None = None, num_classes: int | None = None,
                       device: str | torch.device = "cpu", allow_nonfinite: bool = False) -> Loaded:
    """The model, its class names and its eval transform, ready for ``evaluate``/``predict``."""
    from .weights import load_weights

    path = _resolve_checkpoint(checkpoint) if checkpoint else None
    meta = _stored_metadata(path) if path else None
    if meta is not None:
        if model_name and meta["variant"] and model_name != meta["variant"]:
            warnings.warn(f"{checkpoint} was trained as {meta['variant']}, not {model_name}: using its stored "
                          f"config", stacklevel=2)
        model = build_from_config(meta["config"], meta["variant"])
        class_names = meta["class_names"]
    else:
        if not model_name:
            raise WeightsError("name the model (e.g. poolformer_s12): the checkpoint does not say which it is"
                               if checkpoint else "name the model (e.g. poolformer_s12) or pass --checkpoint")
        model = create_model(model_name, num_classes=num_classes)
        class_names = None
    if path:
        report = load_weights(model, path, strict=True, allow_nonfinite=allow_nonfinite)
        if any(k.startswith("head.fc.") for k in report.reinitialised):
            raise WeightsError(f"{checkpoint} has a classifier for another number of classes than the model's "
                               f"{model.num_classes}; pass --num-classes N to match it")
        source = checkpoint
    else:
        from .weights import load_pretrained

        load_pretrained(model, model.pretrained_cfg.url if model.pretrained_cfg else None, name=model_name,
                        allow_nonfinite=allow_nonfinite)
        source = f"{model_name} release weights"
    aliases = None
    if class_names is None:
        class_names, aliases = default_class_names(model.num_classes)
    info = model.pretrained_cfg or get_model_info("poolformer_s12")
    img_size = model.img_size[0] if isinstance(getattr(model, "img_size", None), tuple) else info.input_size[-1]
    model.to(device).eval()
    return Loaded(model, list(class_names), img_size, D.eval_transform(info, img_size), source,
                  info.preprocessing(img_size), aliases, getattr(model, "variant", None))


def export_metadata(loaded: Loaded) -> dict:
    """What an exported file must carry to be run correctly alone: classes, input, preprocessing."""
    from . import __version__

    return {"format": "metaformer", "variant": loaded.variant, "num_classes": len(loaded.class_names),
            "class_names": loaded.class_names, "in_chans": loaded.model.in_chans,
            "preprocessing": loaded.preprocessing, "metaformer_version": __version__}


def _described_by(model_name: str | None, checkpoint: str | None) -> dict:
    """Classes, input size and preprocessing that ``--checkpoint`` (or else the variant) stands for."""
    stored = (_stored_metadata(_resolve_checkpoint(checkpoint)) if checkpoint else None) or {}
    variant = stored.get("variant") or model_name
    info = get_model_info(variant) if variant else None
    config = stored.get("config") or {}
    size = config.get("img_size", info.input_size[-1] if info else None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    n = config.get("num_classes", info.num_classes if info else None)
    names, aliases = (stored["class_names"], None) if stored.get("class_names") else default_class_names(n)
    return {"what": f"--checkpoint {checkpoint}" if checkpoint else model_name, "variant": variant,
            "num_classes": n, "class_names": names, "aliases": aliases, "img_size": size,
            "preprocessing": info.preprocessing(size) if info else None}


def load_exported(path: str, model_name: str | None, checkpoint: str | None = None) -> Loaded:
    """An exported file (ONNX, TorchScript, torch.export) run in its own runtime, with the class names and
    preprocessing it carries (files from `metaformer export`), or else those of ``checkpoint``/the variant;
    a ``checkpoint`` or variant that disagrees with what the file carries is refused."""
    from .export import load_runtime
    from .models.registry import eval_transform

    run = load_runtime(path)
    ref = _described_by(model_name, checkpoint) if (checkpoint or model_name) else None
    meta = run.metadata
    if meta:
        if ref is not None:
            _check_exported_against(path, meta, ref)
        names, pre, variant = meta["class_names"], meta["preprocessing"], meta.get("variant")
        default_names, default_aliases = default_class_names(len(names))
        aliases = default_aliases if names == default_names else None  # ImageNet's wnids for its names
    elif ref is not None and ref["preprocessing"] is not None:
        names, pre, variant, aliases = ref["class_names"], ref["preprocessing"], ref["variant"], ref["aliases"]
    else:
        raise WeightsError(f"{path} carries no metaformer metadata (not written by `metaformer export`): name the "
                           "model (e.g. poolformer_s12) or pass the --checkpoint it was exported from, so the images "
                           "get the right preprocessing and class names")
    return Loaded(run, list(names), pre["img_size"], eval_transform(**pre), path, pre, aliases, variant)


def _check_exported_against(path: str, meta: dict, ref: dict) -> None:
    def show(names):
        return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

    problems = []
    if meta["num_classes"] != ref["num_classes"]:
        problems.append(f"{meta['num_classes']} classes ({show(meta['class_names'])}) vs {ref['num_classes']}")
    elif meta["class_names"] != ref["class_names"]:
        problems.append(f"classes {show(meta['class_names'])} vs {show(ref['class_names'])}")
    if ref["img_size"] and meta["preprocessing"]["img_size"] != ref["img_size"]:
        problems.append(f"input {meta['preprocessing']['img_size']}px vs {ref['img_size']}px")
    if problems:
        raise WeightsError(f"{path} was exported from another model than {ref['what']}: {'; '.join(problems)}. "
                           f"Pass the checkpoint it was exported from, or drop --checkpoint and the model name to "
                           f"use the class names and preprocessing stored in the file")


def class_targets(folder: Path, folder_classes: list[str], names: list[str], aliases: list[str] | None = None,
                  positional: bool = False) -> list[int]:
    """The model's class index of each class folder, matched by name (or alias), never by position unless
    asked: a subset of the classes, or another order, still scores right, and unknown names are an error."""
    if positional:
        if len(folder_classes) != len(names):
            raise DataError(f"--positional maps the i-th class folder to class i, but {folder} has "
                            f"{len(folder_classes)} class folders and the model {len(names)} classes")
        return list(range(len(folder_classes)))
    index = {n: i for i, n in enumerate(aliases or [])}
    index.update({n: i for i, n in enumerate(names)})
    unknown = [c for c in folder_classes if c not in index]
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        model = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        unnamed = names == [str(i) for i in range(len(names))]
        hint = (" The checkpoint stores no class names, so its classes are 0..{}: name the folders by class index, "
                "or pass --positional to map the sorted folders to classes in order (as torchvision's ImageFolder "
                "does).".format(len(names) - 1) if unnamed else
                " Evaluate on folders named like the classes the model was trained on.")
        raise DataError(f"{folder}: {len(unknown)} of {len(folder_classes)} class folders are not classes of the "
                        f"model: {shown}. The model's {len(names)} classes: {model}.{hint}")
    return [index[c] for c in folder_classes]


def eval_dataset(loaded: Loaded, data: str | None, positional: bool = False):
    """The built-in digits val split, or a class-folder directory mapped onto the model's classes by name."""
    if D.is_builtin(data):
        if loaded.class_names != D.Digits.classes:
            raise DataError("the built-in digits need a model trained on them (10 classes '0'..'9'): pass "
                            "--checkpoint runs/digits/best.pth, or --data DIR for other data")
        return D.Digits("val", loaded.img_size, loaded.transform)
    folder = D.find_eval_dir(data)
    ds = D.SafeImageFolder(folder, loaded.transform, allow_empty=True)
    targets = class_targets(folder, ds.classes, loaded.class_names, loaded.class_aliases, positional)
    if targets != list(range(len(ds.classes))):
        ds.target_transform = targets.__getitem__
    return ds


def predict(loaded: Loaded, images: list[str], topk: int = 5, device: str | torch.device = "cpu") -> list[dict]:
    """For each image: ``{'image', 'predictions': [(class name, probability), ...]}``, best first."""
    batch = [loaded.transform(D.open_rgb(p)) for p in images]
    with torch.no_grad():
        probs = loaded.model(torch.stack(batch).to(device)).float().softmax(dim=1)
    if probs.shape[1] != len(loaded.class_names):
        raise WeightsError(f"{loaded.source} gives {probs.shape[1]} class scores but {len(loaded.class_names)} class "
                           f"names were given with it: predict with the checkpoint it was made from")
    k = min(topk, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [{"image": p, "predictions": [(loaded.class_names[i], v) for v, i in zip(vs.tolist(), ix.tolist())]}
            for p, vs, ix in zip(images, values, indices)]

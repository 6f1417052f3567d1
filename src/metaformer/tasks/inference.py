"""Evaluation (top-1/top-5 with the variant's eval transform, on one process or many) and prediction.

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
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .. import data as D
from ..data import DataError
from ..engine.loop import progress_bar
from ..engine.metrics import ranked, top_hits
from ..engine.runtime import Runtime
from ..weights import WeightsError
from ..weights.save import stored_metadata
from ..weights.load import NonFiniteWeights
from ..zoo import build_from_config, create_model, load_weights
from ..zoo.imagenet import categories, imagenet_classes
from ..zoo.registry import eval_transform


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1K class names in the standard (sorted wnid) order."""
    return imagenet_classes()[1]


def default_class_names(num_classes: int) -> tuple[list[str], list[str] | None]:
    """``(names, aliases)`` for a model whose checkpoint names no classes: ImageNet's names (and their
    WordNet ids, so wnid folders map by name) for 1000 or 21,841 classes, else the indices ``'0'..'N-1'``."""
    if num_classes in (1000, 21841):
        return categories("imagenet-1k" if num_classes == 1000 else "imagenet-22k")
    return [str(i) for i in range(num_classes)], None


def preprocessing_of(model: nn.Module) -> dict:
    """The eval preprocessing a model's ``pretrained_cfg`` describes, at the model's own input size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = getattr(model, "img_size", None)
    return {"img_size": int(size[0] if isinstance(size, (tuple, list)) else cfg.get("input_size", (3, 224, 224))[-1]),
            "crop_pct": float(cfg.get("crop_pct", 0.9)), "interpolation": cfg.get("interpolation", "bicubic"),
            "mean": list(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), "std": list(cfg.get("std", IMAGENET_DEFAULT_STD))}


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
    class_names_stored: bool = True  # False: the weights name no classes, so class_names are defaults


def resolve_checkpoint(checkpoint: str, flag: str = "--checkpoint") -> Path:
    """A local checkpoint file: URLs are downloaded (cached); a folder or a missing path is named as such (``flag``:
    how the command line names the argument)."""
    from ..weights.io import EXTENSIONS, is_url, resolve

    if is_url(checkpoint):
        return resolve(checkpoint)
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        inside = sorted(q.name for q in path.iterdir() if q.name.endswith(EXTENSIONS))
        hint = f": pass one of the files inside, e.g. {path / inside[0]} ({', '.join(inside[:6])})" if inside else \
            f" without checkpoint files ({', '.join(EXTENSIONS)})"
        raise WeightsError(f"{flag} {checkpoint} is a folder, not a checkpoint file{hint}")
    if not path.exists():
        raise WeightsError(f"checkpoint {checkpoint} does not exist")
    return path


def load_for_inference(model_name: str | None, checkpoint: str | None = None, num_classes: int | None = None,
                       device: str | torch.device = "cpu", allow_nonfinite: bool = False, ema: bool = False) -> Loaded:
    """The model, its class names and its eval transform, ready for ``evaluate``/``predict``.

    ``checkpoint``: one of ours (its config and class names rebuild the model), any other layout
    loaded into ``model_name``, or None for the variant's published weights (``name.tag`` picks them).
    ``ema``: the training checkpoint's EMA weights instead of its model weights.
    """
    if ema and not checkpoint:
        raise WeightsError("--ema needs --checkpoint: a training checkpoint that kept EMA weights (train --ema)")
    path = resolve_checkpoint(checkpoint) if checkpoint else None
    meta = stored_metadata(path) if path else None
    class_names = None
    if meta is not None:
        if model_name and meta["variant"] and model_name != meta["variant"]:
            warnings.warn(f"{checkpoint} was trained as {meta['variant']}, not {model_name}: using its stored "
                          f"config", stacklevel=2)
        model = build_from_config(meta["config"], meta["variant"])
        class_names = meta["class_names"]
    elif not model_name:
        raise WeightsError("name the model (e.g. poolformer_s12): the checkpoint does not say which it is"
                           if checkpoint else "name the model (e.g. poolformer_s12) or pass --checkpoint")
    try:
        if meta is None and path is None:
            model = create_model(model_name, pretrained=True, num_classes=num_classes,
                                 allow_nonfinite=allow_nonfinite)
        elif meta is None:
            model = create_model(model_name, num_classes=num_classes)
        report = load_weights(model, path, strict=True, allow_nonfinite=allow_nonfinite, ema=ema) if path else None
    except NonFiniteWeights as e:
        raise NonFiniteWeights(f"{e}; or pass --allow-nonfinite (allow_nonfinite=True) to load them anyway and "
                               "inspect them") from None
    if path:
        if report.no_classifier:
            raise WeightsError(f"{checkpoint} has no classifier (saved with num_classes=0), so it cannot classify: "
                               "use a checkpoint with its classifier")
        if any(k.startswith("head.fc.") for k in report.reinitialised):
            raise WeightsError(f"{checkpoint} has a classifier for another number of classes than the model's "
                               f"{model.num_classes}; pass --num-classes N to match it")
        source = f"{checkpoint} (EMA weights)" if ema else checkpoint
    else:
        source = f"{model_name} published weights"
    aliases, stored = None, class_names is not None
    if class_names is None:
        class_names, aliases = default_class_names(model.num_classes)
    pre = preprocessing_of(model)
    model.to(device).eval()
    return Loaded(model, list(class_names), pre["img_size"], eval_transform(**pre), source, pre, aliases,
                  getattr(model, "variant", None), stored)


def class_targets(folder: Path, folder_classes: list[str], names: list[str], aliases: list[str] | None = None,
                  positional: bool = False, names_stored: bool = True) -> list[int]:
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
        numbered = names == [str(i) for i in range(len(names))]
        whose = ("The checkpoint stores no class names, so its" if not names_stored else
                 "The model's classes are named by number:")
        hint = (f" {whose} classes are 0..{len(names) - 1}: name the folders by class index, or pass --positional to "
                "map the sorted folders to classes in order (as torchvision's ImageFolder does)." if numbered else
                " Evaluate on folders named like the classes the model was trained on.")
        raise DataError(f"{folder}: {len(unknown)} of {len(folder_classes)} class folders are not classes of the "
                        f"model: {shown}. The model's {len(names)} classes: {model}.{hint}")
    return [index[c] for c in folder_classes]


def require_classifier(loaded: Loaded) -> None:
    if not loaded.class_names:
        raise WeightsError(f"{loaded.source} has no classifier (num_classes=0: its output is the feature vector), so "
                           "it cannot classify: use a checkpoint with its classifier")


def eval_dataset(loaded: Loaded, data: str | None, positional: bool = False):
    """What ``--data`` names (the built-in digits' val split, a class-folder directory or an ImageNet root's
    ``val/``, val shards, a Hugging Face folder's validation split), its classes mapped onto the model's by name."""
    require_classifier(loaded)
    crop = D.eval_crop(data)  # a built-in set may fix its own
    transform = eval_transform(**dict(loaded.preprocessing, crop_pct=crop)) if crop and loaded.preprocessing \
        else loaded.transform
    ds, classes = D.open_eval_source(data, transform, loaded.img_size)
    name = D.builtin_name(data)
    if name is not None and loaded.class_names != list(classes):
        from .train_config import BUILTIN_RECIPES

        raise DataError(f"the built-in {name} need a model trained on them ({len(classes)} classes "
                        f"{', '.join(map(repr, classes[:4]))}{', ...' if len(classes) > 4 else ''}): pass --checkpoint "
                        f"{BUILTIN_RECIPES[name]['output']}/best.pth, or --data DIR for other data")
    targets = class_targets(Path(str(data)), list(classes), loaded.class_names, loaded.class_aliases, positional,
                            loaded.class_names_stored)
    if targets != list(range(len(classes))):
        ds.target_transform = targets.__getitem__
    return ds


def eval_loader(dataset, rt: Runtime, batch_size: int, workers: int):
    """This rank's share of an evaluation set: disjoint and unpadded, so the all-reduced counts are exact."""
    pin = rt.device.type == "cuda"
    if isinstance(dataset, D.ShardStream):
        dataset.configure(rt.rank, rt.world, batch_size, seed=0, drop_last=False, workers=workers)
        return D.make_loader(dataset, batch_size, None, workers, pin_memory=pin)
    return D.make_loader(dataset, batch_size, list(range(rt.rank, len(dataset), rt.world)), workers, pin_memory=pin)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, unreadable=None, progress: bool = False, tta: str | None = None) -> dict:
    """Top-1/top-5 (%) and mean cross-entropy; counts are summed over ranks when distributed. Equal scores rank
    by class index (:func:`metaformer.engine.metrics.ranked`), as every other count and label list here.

    ``tta='flip'`` averages the softmax of each image and its mirror image.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for x, y, bad in progress_bar(loader, main=progress, desc="eval"):
        if unreadable is not None:
            unreadable.add(bad, len(x))
        if not len(x):
            continue
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
            if tta == "flip":
                probs = (logits.softmax(1) + model(x.flip(-1)).float().softmax(1)) / 2
                logits = probs.clamp_min(1e-12).log()  # cross-entropy of the averaged prediction
        hits = top_hits(logits, y, (1, 5))
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hits[1].double(),
                               hits[5].double(), torch.tensor(len(y), dtype=torch.float64, device=device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    n = max(n, 1)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "images": int(totals[3].item())}


def prepare(loaded: Loaded, device: torch.device, fused: bool = True, channels_last: bool = False) -> list[str]:
    """Put ``loaded.model`` on ``device`` and make it fast: fused (:func:`metaformer.fuse`, the same numbers)
    when the model has blocks ``fuse`` covers, else channels_last when asked. Returns what was applied."""
    model, applied = loaded.model.to(device).eval(), []
    if fused:
        from ..fast import fuse, fusion_report

        candidate = fuse(model)
        report = fusion_report(candidate)
        if report.fused:
            model = candidate
            applied.append(f"fused ({report.summary()})")
    if channels_last and not applied:
        model = model.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    loaded.model = model
    return applied


@torch.no_grad()
def predict(loaded: Loaded, images: list, topk: int = 5, device: str | torch.device = "cpu", batch_size: int = 32,
            amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> list[dict]:
    """For each image, in order: ``{'image', 'predictions': [(class name, probability), ...]}``, best first; or
    ``{'image', 'error'}`` for a file that cannot be read (skipped: one bad file in a folder does not stop the
    others). Images are read and run ``batch_size`` at a time."""
    require_classifier(loaded)
    device = torch.device(device)
    k = min(topk, len(loaded.class_names))
    results = []
    starts = range(0, len(images), batch_size)
    for start in progress_bar(starts, main=len(starts) > 1, desc="predict", unit="batch"):
        batch, pixels = [], []
        for p in images[start:start + batch_size]:
            try:
                pixels.append(loaded.transform(D.open_rgb(p)))
                batch.append({"image": str(p)})
            except DataError as e:
                batch.append({"image": str(p), "error": str(e)})
        results += batch
        if not pixels:
            continue
        x = torch.stack(pixels).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probs = loaded.model(x).float().softmax(dim=1)
        if probs.shape[1] != len(loaded.class_names):
            raise WeightsError(f"{loaded.source} gives {probs.shape[1]} class scores but {len(loaded.class_names)} "
                               "class names were given with it: predict with the checkpoint it was made from")
        indices = ranked(probs, k)
        values = probs.gather(1, indices)
        for r, vs, ix in zip([r for r in batch if "error" not in r], values.cpu(), indices.cpu()):
            r["predictions"] = [(loaded.class_names[i], v) for v, i in zip(vs.tolist(), ix.tolist())]
    return results

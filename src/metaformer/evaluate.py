"""Evaluation (top-1/top-5 with the variant's eval transform) and prediction.

A checkpoint trained here (``last.pth``/``best.pth`` of ``metaformer train``, or a
``save_weights`` safetensors file) carries its model config and class names, so the model
is rebuilt from it; any other layout ``metaformer.load_weights`` detects (the authors',
timm, Hugging Face) is loaded into the named variant.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from .models import build_from_config, create_model, get_model_info


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, unreadable: D.UnreadableLog | None = None, progress: bool = False) -> dict:
    """Top-1/top-5 (%) and mean cross-entropy; counts are summed over ranks when distributed."""
    from tqdm import tqdm

    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for x, y, bad in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        if unreadable is not None:
            unreadable.add(bad)
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


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1K class names in the standard (sorted wnid) order, from torchvision's metadata."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@dataclass
class Loaded:
    model: nn.Module
    class_names: list[str]
    img_size: int
    transform: object
    source: str


def _stored_metadata(checkpoint: str) -> dict | None:
    """``{'config', 'variant', 'class_names'}`` of a checkpoint written by this library, else None."""
    from .weights import WeightsError, read_metadata

    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"checkpoint {checkpoint} does not exist")
    if path.name.endswith(".safetensors"):
        try:
            return read_metadata(path)
        except WeightsError:
            return None  # a plain safetensors file: load_weights decides what it is
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None  # load_weights gives the precise error
    if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict):
        return {"config": obj["model_config"], "variant": obj.get("variant"), "class_names": obj.get("class_names")}
    return None


def load_for_inference(model_name: str | None, checkpoint: str | None = None, num_classes: int | None = None,
                       device: str | torch.device = "cpu") -> Loaded:
    """The model, its class names and its eval transform, ready for ``evaluate``/``predict``."""
    from .weights import load_weights

    meta = _stored_metadata(checkpoint) if checkpoint else None
    if meta is not None:
        if model_name and meta["variant"] and model_name != meta["variant"]:
            warnings.warn(f"{checkpoint} was trained as {meta['variant']}, not {model_name}: using its stored "
                          f"config", stacklevel=2)
        model = build_from_config(meta["config"], meta["variant"])
        class_names = meta["class_names"]
    else:
        if not model_name:
            raise ValueError("name the model (e.g. poolformer_s12): the checkpoint does not say which it is"
                             if checkpoint else "name the model (e.g. poolformer_s12) or pass --checkpoint")
        model = create_model(model_name, num_classes=num_classes)
        class_names = None
    if checkpoint:
        report = load_weights(model, checkpoint, strict=True)
        if any(k.startswith("head.fc.") for k in report.reinitialised):
            raise ValueError(f"{checkpoint} has a classifier for another number of classes than the model's "
                             f"{model.num_classes}; pass --num-classes N to match it")
        source = checkpoint
    else:
        from .weights import load_pretrained

        load_pretrained(model, model.pretrained_cfg.url if model.pretrained_cfg else None, name=model_name)
        source = f"{model_name} release weights"
    if class_names is None:
        class_names = imagenet_class_names() if model.num_classes == 1000 else [str(i) for i in range(model.num_classes)]
    info = model.pretrained_cfg or get_model_info("poolformer_s12")
    img_size = model.img_size[0] if isinstance(getattr(model, "img_size", None), tuple) else info.input_size[-1]
    model.to(device).eval()
    return Loaded(model, list(class_names), img_size, D.eval_transform(info, img_size), source)


def load_exported(path: str, model_name: str | None, checkpoint: str | None = None) -> Loaded:
    """An exported file (ONNX, TorchScript, torch.export) run in its own runtime, with the same
    preprocessing and class names as the PyTorch path (from ``checkpoint`` or the variant)."""
    from .export import load_runtime

    meta = _stored_metadata(checkpoint) if checkpoint else None
    variant = (meta or {}).get("variant") or model_name
    if not variant:
        raise ValueError("name the model (e.g. poolformer_s12) or pass the --checkpoint it was exported from, "
                         "so the images get the right preprocessing")
    info = get_model_info(variant)
    config = (meta or {}).get("config") or {}
    size = config.get("img_size", info.input_size[-1])
    img_size = size[0] if isinstance(size, (list, tuple)) else size
    num_classes = config.get("num_classes", info.num_classes)
    names = (meta or {}).get("class_names")
    if names is None:
        names = imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)]
    return Loaded(load_runtime(path), list(names), img_size, D.eval_transform(info, img_size), path)


def eval_dataset(loaded: Loaded, data: str | None):
    """The built-in digits val split, or a class-folder directory mapped onto the model's classes."""
    if D.is_builtin(data):
        if loaded.class_names != D.Digits.classes:
            raise ValueError("the built-in digits need a model trained on them (10 classes '0'..'9'): pass "
                             "--checkpoint runs/digits/best.pth, or --data DIR for other data")
        return D.Digits("val", loaded.img_size, loaded.transform)
    folder = D.find_eval_dir(data)
    ds = D.SafeImageFolder(folder, loaded.transform, allow_empty=True)
    names = loaded.class_names
    if set(ds.classes) <= set(names):
        if ds.classes != names:  # folder order -> the model's order, by class name
            ds.target_transform = [names.index(c) for c in ds.classes].__getitem__
    elif len(ds.classes) != len(names):
        raise ValueError(f"{folder} has {len(ds.classes)} class folders (e.g. {ds.classes[0]}) that do not match the "
                         f"model's {len(names)} classes (e.g. {names[0]}); evaluate on data with the classes the "
                         f"model was trained on")
    # else: as many folders as classes under other names (ImageNet's wnid folders): sorted order is the index.
    return ds


def predict(loaded: Loaded, images: list[str], topk: int = 5, device: str | torch.device = "cpu") -> list[dict]:
    """For each image: ``{'image', 'predictions': [(class name, probability), ...]}``, best first."""
    from PIL import Image

    batch = []
    for p in images:
        try:
            with Image.open(p) as img:
                batch.append(loaded.transform(img.convert("RGB")))
        except FileNotFoundError:
            raise ValueError(f"image {p} does not exist") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
    with torch.no_grad():
        probs = loaded.model(torch.stack(batch).to(device)).float().softmax(dim=1)
    k = min(topk, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [{"image": p, "predictions": [(loaded.class_names[i], v) for v, i in zip(vs.tolist(), ix.tolist())]}
            for p, vs, ix in zip(images, values, indices)]

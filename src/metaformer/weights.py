"""Weights I/O: one loader that detects the checkpoint format, and a self-describing saver.

Loading (:func:`load_weights`, :func:`load_pretrained`) accepts a local path or a URL
(downloaded once into ``$METAFORMER_CACHE``, default ``~/.cache/metaformer``); files
``.pth``/``.pth.tar``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``: a weight
file never runs code) or ``.safetensors``; a raw state dict or one wrapped in
``{'state_dict': ...}`` / ``{'model': ...}``, with or without DDP's ``module.`` prefix.
It recognises four key layouts and converts them to this library's:

- ``authors``: the paper's release (``patch_embed.proj``, ``network.{k}.{j}.*``, ``norm``,
  ``head``). ``network`` is one flat list: block lists, downsampling convs and, in the
  attention hybrids, a position embedding entry right before its stage, which shifts the
  indices of everything after it. The mapping is therefore read off the file's own entries
  (a block list has ``{k}.{j}.`` keys, a downsampler ``{k}.proj``, a position embedding
  ``{k}.pos_embed``), for any depth and any hybrid, and then checked strictly against the
  model. The authors' ``SpatialFc`` weight (``token_mixer.fc``, ``[N, N]``, or ``[N, N, 1]``
  when stored as a Conv1d) becomes our ``token_mixer.proj`` ``[N, N]``.
- ``timm``: ``stem.conv``, ``stages.{i}.downsample.conv``, ``stages.{i}.blocks.{j}.*``,
  ``head.norm``/``head.fc``. These are also our own key names, so a plain ``.pth`` of one of
  our models reads as this layout.
- ``huggingface``: transformers' ``poolformer.encoder.patch_embeddings.{i}.projection``
  (``i = 0`` the stem, ``i >= 1`` stage ``i``'s downsampling), ``encoder.block.{i}.{j}.*``
  with ``before_norm``/``after_norm``/``output.conv1``/``output.conv2``, top-level ``norm``
  and ``classifier``.
- ``metaformer``: a safetensors file written by :func:`save_weights`, recognised by its
  metadata; it also carries the config, so :func:`load_model` rebuilds the model from it.

**timm's head is not the authors' head.** timm's PoolFormer v1 applies a channel LayerNorm
*after* global pooling; the authors (and this library) apply GroupNorm(1) to the last
feature map *before* pooling. The parameters have the same names and shapes, so timm-layout
weights load without conversion, and the model keeps the authors' head math: with the
same weights our logits equal the authors' (they differ slightly from timm's), while every
stage's features equal timm's.

Loading is strict: any missing, unexpected or shape-mismatched key raises
:class:`WeightsError` naming the file, the layout and the keys, with a hint (for instance
which registered variant the file matches). Four differences are expected and handled:
another ``num_classes`` (only the classifier is re-initialised, with a warning); another
``in_chans`` (the stem is adapted); a position embedding for another token grid (bicubic
resize); and a ``features_only`` backbone (the classifier is dropped, the new per-stage
norms keep their initialisation). :class:`LoadReport` lists what happened.
"""
from __future__ import annotations

import json
import os
import pickle
import urllib.parse
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write
from .errors import MetaFormerError
from .models.layers import ACTIVATIONS, NORMS
from .models.mixers import TOKEN_MIXERS
from .models.registry import build_from_config, get_model_info, list_models

FORMAT_NAME = "metaformer"
FORMAT_VERSION = "1"
EXTENSIONS = (".pth", ".pth.tar", ".pt", ".bin", ".safetensors")
_LIST_LIMIT = 10  # keys shown per list in an error message


class WeightsError(MetaFormerError):
    """A weights file that cannot be read, or does not fit the model it is loaded into."""


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

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("METAFORMER_CACHE") or Path.home() / ".cache" / "metaformer")


def _is_url(source: Any) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https", "file")


def _download(url: str) -> Path:
    name = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pth"
    dest = cache_dir() / name
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        # download_url_to_file writes to a temporary file and renames it, so an interrupted
        # download never leaves a truncated file in the cache.
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    except Exception as e:  # urllib raises URLError, HTTPError, socket errors, ...
        raise WeightsError(
            f"could not download {url} ({type(e).__name__}: {e}). If this machine is offline, download the "
            f"file on a machine that is online and pass its local path instead, e.g. "
            f"create_model(name, pretrained='/path/to/{name}') or load_weights(model, '/path/to/{name}'); "
            f"or copy it to {dest}.") from None
    return dest


def _resolve(source: Any) -> Path:
    if _is_url(source):
        return _download(source)
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file. Pass the path of a weights file ({', '.join(EXTENSIONS)}) "
                           "or a URL.")
    if path.is_dir():
        raise WeightsError(f"{path} is a directory, not a weights file: pass the path of the file inside it "
                           f"({', '.join(EXTENSIONS)}).")
    return path


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(head) >= 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ... from inside the Rust reader
        raise _unreadable(path, e) from None
    return tensors, metadata


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise WeightsError(
                f"{path}: refused to load. The file contains Python objects other than tensors and plain "
                f"containers, and unpickling them could run arbitrary code. Only load files you trust; "
                f"to use a trusted one, re-save its state dict (torch.save(obj['state_dict'], ...)) or convert "
                f"it to safetensors. ({str(e).splitlines()[0]})") from None
        raise _unreadable(path, e) from None
    except Exception as e:  # RuntimeError from the zip reader, EOFError, ...
        raise _unreadable(path, e) from None


def _unreadable(path: Path, err: Exception) -> WeightsError:
    size = path.stat().st_size if path.exists() else 0
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return WeightsError(
        f"{path}: not a readable weights file ({size} bytes; {type(err).__name__}: {reason}). It is probably "
        f"truncated or corrupt, e.g. an interrupted download: download or save it again. Supported: "
        f"{', '.join(EXTENSIONS)}.")


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints wrap the weights (timm: 'state_dict', DeiT/our trainer: 'model').
    for _ in range(3):
        if isinstance(obj, dict) and not _all_tensors(obj):
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path}: holds {type(obj).__name__}, not a state dict (a dict of tensors, possibly "
                           "wrapped in {'state_dict': ...} or {'model': ...}).")
    if not _all_tensors(obj):
        bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise WeightsError(f"{path}: not a state dict: entries {_fmt_list(bad)} are not tensors (a training "
                           "checkpoint? its weights should be under 'state_dict' or 'model').")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _all_tensors(d: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def read_state_dict(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """``(state_dict, safetensors metadata, local path)`` of any supported file, keys as stored."""
    path = _resolve(source)
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty (an interrupted download or save?): get it again.")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.name.endswith(".safetensors") or (_looks_like_safetensors(head) and not zipfile.is_zipfile(path)):
        tensors, metadata = _read_safetensors(path)
    else:
        tensors, metadata = _read_torch(path), {}
    return _unwrap(tensors, path), metadata, path


# --------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------

def detect_layout(keys: Iterable[str], metadata: dict[str, str] | None = None) -> str | None:
    """One of ``metaformer``, ``authors``, ``huggingface``, ``timm``, or ``None`` when unknown."""
    if (metadata or {}).get("format") == FORMAT_NAME:
        return "metaformer"
    keys = list(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("network.") or has("patch_embed.proj."):
        return "authors"
    if has("poolformer.encoder.") or has("encoder.patch_embeddings.") or has("encoder.block."):
        return "huggingface"
    if has("stem.conv.") or has("stages."):
        return "timm"
    return None


def _rename(rest: str, table: dict[str, str]) -> str:
    """Replace the longest leading dotted component sequence of ``rest`` found in ``table``."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return rest


# Inside one block: the authors' names -> ours (unlisted names are the same in both).
AUTHORS_BLOCK = {
    "layer_scale_1": "layer_scale1.scale",
    "layer_scale_2": "layer_scale2.scale",
    "token_mixer.fc": "token_mixer.proj",  # SpatialFc
}
AUTHORS_TOP = {"patch_embed.proj": "stem.conv", "norm": "head.norm", "head": "head.fc"}

HF_BLOCK = {
    "before_norm": "norm1",
    "after_norm": "norm2",
    "output.conv1": "mlp.fc1",
    "output.conv2": "mlp.fc2",
    "layer_scale_1": "layer_scale1.scale",
    "layer_scale_2": "layer_scale2.scale",
}
HF_TOP = {"norm": "head.norm", "classifier": "head.fc"}


def _authors_network_map(keys: Iterable[str]) -> dict[int, tuple[str, int]]:
    """``network`` index -> (``blocks``/``downsample``/``pos_embed``, our stage index), read off the file."""
    kinds: dict[int, str] = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] != "network" or len(parts) < 3 or not parts[1].isdigit():
            continue
        k = int(parts[1])
        kinds[k] = "blocks" if parts[2].isdigit() else "pos_embed" if parts[2] == "pos_embed" else "downsample"
    # A downsampler or a position embedding belongs to the stage whose block list follows it.
    mapping, stage = {}, 0
    for k in sorted(kinds):
        mapping[k] = (kinds[k], stage)
        stage += kinds[k] == "blocks"
    return mapping


def _from_authors(sd: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    network = _authors_network_map(sd)
    out = {}
    for key, value in sd.items():
        new = _rename(key, AUTHORS_TOP)
        parts = key.split(".")
        if parts[0] == "network" and len(parts) >= 3 and parts[1].isdigit():
            kind, stage = network[int(parts[1])]
            rest = ".".join(parts[2:])
            if kind == "blocks":
                j, rest = rest.split(".", 1)
                new = f"stages.{stage}.blocks.{j}.{_rename(rest, AUTHORS_BLOCK)}"
                if rest.startswith("token_mixer.fc.") and value.ndim == 3 and value.shape[-1] == 1:
                    value = value[..., 0]  # Conv1d(N, N, 1) -> Linear(N, N)
            elif kind == "pos_embed":
                new = f"stages.{stage}.pos_embed.pos"
            elif rest.startswith("proj."):
                new = f"stages.{stage}.downsample.conv.{rest[len('proj.'):]}"
        out[new] = (key, value)
    return out


def _from_huggingface(sd: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    out = {}
    for key, value in sd.items():
        rest = key[len("poolformer."):] if key.startswith("poolformer.") else key
        parts = rest.split(".")
        new = _rename(rest, HF_TOP)
        if parts[:2] == ["encoder", "patch_embeddings"] and len(parts) > 4 and parts[3] == "projection":
            i = int(parts[2])
            target = "stem.conv" if i == 0 else f"stages.{i}.downsample.conv"
            new = ".".join([target] + parts[4:])
        elif parts[:2] == ["encoder", "block"] and len(parts) > 4:
            i, j = parts[2], parts[3]
            new = f"stages.{i}.blocks.{j}.{_rename('.'.join(parts[4:]), HF_BLOCK)}"
        out[new] = (key, value)
    return out


def convert_state_dict(sd: dict[str, torch.Tensor], layout: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Our key -> (the file's key, tensor)."""
    if layout == "authors":
        return _from_authors(sd)
    if layout == "huggingface":
        return _from_huggingface(sd)
    return {k: (k, v) for k, v in sd.items()}  # timm and ours share the key names


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def _fmt_list(items: list, limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t) + "]"


def _architecture(keys_shapes: dict[str, tuple]) -> dict | None:
    """Depths, dims and per-stage mixers implied by our-layout keys, to name the variant a file holds."""
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

    def mixer(params: set) -> str:
        # Parameter-free mixers leave no trace in a state dict: assume PoolFormer's pooling.
        for name, mixer_name in (("qkv", "attention"), ("proj", "spatial_mlp"), ("conv", "dwconv"),
                                 ("random_matrix", "random")):
            if name in params:
                return mixer_name
        return "pooling"

    n = len(depths)
    return dict(depths=[depths[i] for i in range(n)], dims=[dims.get(i) for i in range(n)],
                token_mixers=[mixer(mixer_params.get(i, set())) for i in range(n)])


def _variant_architecture(name: str) -> dict:
    cfg = get_model_info(name).config
    n = len(cfg["depths"])
    mix = cfg.get("token_mixers", "pooling")
    mix = list(mix) if isinstance(mix, (list, tuple)) else [mix] * n
    return dict(depths=list(cfg["depths"]), dims=list(cfg["dims"]), token_mixers=mix)


def _hint(converted: dict[str, tuple], model: nn.Module, mismatched: list) -> str:
    file_arch = _architecture({k: tuple(v.shape) for k, (_, v) in converted.items()})
    model_arch = _architecture({k: tuple(v.shape) for k, v in model.state_dict().items()})
    if file_arch and model_arch and file_arch != model_arch:
        matches = [n for n in list_models() if _variant_architecture(n) == file_arch]
        if matches:
            return (f"this looks like {' or '.join(matches)} weights: build that variant, e.g. "
                    f"metaformer.create_model({matches[0]!r}, pretrained=<this file>)")
        return (f"the file holds depths={file_arch['depths']}, dims={file_arch['dims']}, "
                f"mixers={file_arch['token_mixers']}; the model has depths={model_arch['depths']}, "
                f"dims={model_arch['dims']}, mixers={model_arch['token_mixers']}")
    if any(".token_mixer." in k or ".random_matrix" in k for k, _, _ in mismatched):
        return ("token-mixing parameters are sized for another token grid: rebuild the model with the input size "
                "the weights were trained at (img_size=..., 224 for the authors' releases)")
    return "the model's config differs from the file's (norm, layer scale, MLP ratio?); " \
           "or pass strict=False to load only the tensors that fit"


def _adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    from timm.models import adapt_input_conv

    return adapt_input_conv(in_chans, weight)


def check_finite(sd: dict[str, torch.Tensor], path: Any) -> None:
    """Refuse weights holding NaN or inf: they load without complaint and every output is then NaN."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf values: {_fmt_list(bad)}. These weights are broken "
            "(saved from a diverged run?): use a checkpoint from before the divergence, or pass "
            "allow_nonfinite=True (command line: --allow-nonfinite) to load them anyway")


def load_weights(model: nn.Module, source: Any, strict: bool = True, allow_nonfinite: bool = False) -> LoadReport:
    """Load a checkpoint of any supported layout into ``model``; see the module docstring.

    Args:
        model: a :class:`metaformer.MetaFormer`.
        source: a path (``str``/``Path``) or an ``http(s)://``/``file://`` URL (cached).
        strict: raise :class:`WeightsError` on any missing, unexpected or mismatched key
            (besides the four expected differences). ``False`` loads what fits and reports the rest.
        allow_nonfinite: load tensors holding NaN or inf instead of refusing the file.
    """
    sd, metadata, path = read_state_dict(source)
    if not allow_nonfinite:
        check_finite(sd, path)
    layout = detect_layout(sd, metadata)
    if layout is None:
        raise WeightsError(
            f"{path}: unknown key layout (first keys: {_fmt_list(sorted(sd), 6)}). Known layouts: the authors' "
            "release (patch_embed.proj, network.N.M.*), timm (stem.conv, stages.i.blocks.j.*), Hugging Face "
            "transformers (poolformer.encoder.*), and metaformer's own safetensors. Is this a PoolFormer/"
            "MetaFormer checkpoint?")
    converted = convert_state_dict(sd, layout)
    report = LoadReport(source=str(path), layout=layout)
    if layout == "metaformer":
        _warn_config_difference(model, metadata, path)

    own = model.state_dict()
    features_only = getattr(model, "features_only", False)
    accepted: dict[str, torch.Tensor] = {}
    for key, (orig, value) in converted.items():
        if key not in own:
            # A backbone (features_only) or a num_classes=0 model has no classifier: drop it by design.
            if key.startswith("head.") and (features_only or key.startswith("head.fc.")):
                report.dropped.append(key)
            else:
                report.unexpected.append(key if key == orig else f"{key} (file: {orig})")
            continue
        target = own[key]
        if value.shape != target.shape:
            value = _fit(model, key, value, target, report)
            if value is None:
                continue
        accepted[key] = value

    for key in own:
        if key in accepted or key in report.reinitialised or any(k == key for k, _, _ in report.mismatched):
            continue
        if features_only and key.startswith("feature_norms."):
            report.reinitialised.append(key)  # the backbone's new per-stage norms start at their init
        else:
            report.missing.append(key)

    if strict and not report.ok:
        raise WeightsError(_mismatch_message(path, layout, model, report, converted))

    if report.reinitialised and any(k.startswith("head.fc.") for k in report.reinitialised):
        _reinit_classifier(model)
    with torch.no_grad():
        model.load_state_dict(accepted, strict=False)
    report.loaded = len(accepted)
    return report


def _fit(model: nn.Module, key: str, value: torch.Tensor, target: torch.Tensor, report: LoadReport):
    """The expected shape differences; None (and a report entry) when the tensor cannot fit."""
    if key in ("head.fc.weight", "head.fc.bias") and value.shape[1:] == target.shape[1:]:
        if not any(k.startswith("head.fc.") for k in report.reinitialised):
            warnings.warn(f"the weights have a {value.shape[0]}-class classifier and the model "
                          f"{target.shape[0]} classes: re-initialising the classifier (head.fc); every other "
                          "tensor is loaded", stacklevel=3)
        report.reinitialised.append(key)
        return None
    if key == "stem.conv.weight" and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:] \
            and value.shape[1] == 3:
        report.adapted.append(f"{key}: {value.shape[1]} -> {target.shape[1]} input channels")
        return _adapt_stem(value, target.shape[1])
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
        init(fc)
    else:
        fc.reset_parameters()


def _mismatch_message(path: Path, layout: str, model: nn.Module, report: LoadReport, converted: dict) -> str:
    name = getattr(model, "variant", None) or type(model).__name__
    lines = [f"cannot load {path} (layout: {layout}) into {name} strictly:"]
    if report.missing:
        lines.append(f"  missing from the file ({len(report.missing)}): {_fmt_list(report.missing)}")
    if report.unexpected:
        lines.append(f"  unexpected in the file ({len(report.unexpected)}): {_fmt_list(report.unexpected)}")
    if report.mismatched:
        shown = [f"{k} {_shape(a)} in file vs {_shape(b)} in model" for k, a, b in report.mismatched]
        lines.append(f"  shape mismatch ({len(shown)}): {_fmt_list(shown)}")
    lines.append("hint: " + _hint(converted, model, report.mismatched))
    return "\n".join(lines)


# Options that change only the classifier, the inputs or training, not the weights' meaning.
_NON_ARCH = {"num_classes", "in_chans", "features_only", "out_indices", "drop_path_rate", "drop_rate", "img_size"}


def _warn_config_difference(model: nn.Module, metadata: dict, path: Path) -> None:
    ours = getattr(model, "config", None)
    if not ours or "config" not in metadata:
        return
    saved = json.loads(metadata["config"])
    mine = json.loads(json.dumps(_jsonable_config(ours, strict=False)))
    diff = sorted(k for k in set(saved) | set(mine) if k not in _NON_ARCH and saved.get(k) != mine.get(k))
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (model: {mine.get(k)!r})" for k in diff)
        warnings.warn(f"{path} was saved from a model with {shown}; the weights fit but the outputs will "
                      "differ. metaformer.load_model(path) rebuilds the saved model.", stacklevel=3)


def load_pretrained(model: nn.Module, source: Any, name: str | None = None, allow_nonfinite: bool = False) -> LoadReport:
    """What ``create_model(..., pretrained=...)`` calls: strict :func:`load_weights` with a clear error for
    variants without published weights."""
    if source is None:
        raise WeightsError(f"{name or 'this model'} has no published weights to download: pass the path of a "
                           f"checkpoint instead, e.g. create_model({name or 'name'!r}, pretrained='/path/to/weights."
                           "pth'), or call metaformer.load_weights(model, path).")
    return load_weights(model, source, strict=True, allow_nonfinite=allow_nonfinite)


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------

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


def _jsonable_config(config: dict, strict: bool = True) -> dict:
    registries = {"token_mixers": ("token mixer", TOKEN_MIXERS), "norm": ("norm", NORMS),
                  "head_norm": ("norm", NORMS), "act": ("activation", ACTIVATIONS)}

    def encode(key, value):
        if isinstance(value, (list, tuple)):
            return [encode(key, v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if key in registries and callable(value):
            mixer_name = getattr(value, "mixer_name", None)
            if key == "token_mixers" and mixer_name and TOKEN_MIXERS.get(mixer_name) is value:
                return mixer_name
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

    config = getattr(model, "config", None)
    if config is None:
        raise WeightsError("the model has no .config: build it with metaformer.create_model or "
                           "metaformer.build_from_config so the saved file can rebuild it")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        n = config.get("num_classes")
        if n and len(class_names) != n:
            raise WeightsError(f"{len(class_names)} class names for a {n}-class model")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(_jsonable_config(config), sort_keys=True),
        "variant": getattr(model, "variant", None) or "",
    }
    if class_names is not None:
        metadata["class_names"] = json.dumps(class_names)
    if extra is not None:
        try:
            metadata["extra"] = json.dumps(extra, sort_keys=True)
        except TypeError as e:
            raise WeightsError(f"extra must be JSON-serialisable: {e}") from None
    from . import __version__

    metadata["metaformer_version"] = __version__
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    data = st_save(tensors, metadata=metadata)

    return atomic_write(path, lambda f: f.write(data))


def read_metadata(path: str | os.PathLike) -> dict:
    """``{'config', 'variant', 'class_names', 'extra', 'format_version', 'metaformer_version'}`` of a file
    written by :func:`save_weights`."""
    from safetensors import safe_open

    path = _resolve(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:
        if not path.name.endswith(".safetensors"):
            raise WeightsError(f"{path}: not a metaformer safetensors file (written by metaformer.save_weights); "
                               "to load a checkpoint of another layout into a model, use load_weights") from None
        raise _unreadable(path, e) from None
    if meta.get("format") != FORMAT_NAME or "config" not in meta:
        raise WeightsError(f"{path}: a safetensors file without metaformer metadata, so it cannot rebuild a model: "
                           "create the model yourself and call metaformer.load_weights(model, path)")
    variant = meta.get("variant") or None
    return {
        "config": json.loads(meta["config"]),
        "variant": variant,
        "class_names": json.loads(meta["class_names"]) if "class_names" in meta else None,
        "extra": json.loads(meta["extra"]) if "extra" in meta else None,
        "format_version": meta.get("format_version"),
        "metaformer_version": meta.get("metaformer_version"),
    }


def load_model(path: str | os.PathLike, allow_nonfinite: bool = False, **overrides: Any) -> nn.Module:
    """Rebuild the model saved by :func:`save_weights` and load its weights strictly.

    ``overrides`` change config entries, e.g. ``num_classes=10`` (classifier re-initialised),
    ``features_only=True`` or ``img_size=384``.
    """
    meta = read_metadata(path)
    return rebuild(meta["config"], meta["variant"], path, meta["class_names"], allow_nonfinite=allow_nonfinite,
                   **overrides)


def rebuild(config: dict, variant: str | None, weights: Any, class_names: list[str] | None = None,
            allow_nonfinite: bool = False, **overrides: Any) -> nn.Module:
    """Build ``config`` (with ``overrides``), load ``weights`` strictly, attach the class names."""
    config = {**config, **overrides}
    model = build_from_config(config, variant)
    load_weights(model, weights, strict=True, allow_nonfinite=allow_nonfinite)
    model.class_names = class_names if class_names and len(class_names) == config.get("num_classes") else None
    return model

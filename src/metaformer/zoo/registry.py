"""The model zoo: architectures and their trained weights, as data (torchvision's idea).

An architecture (:class:`ModelInfo`) is a name, the :class:`~metaformer.MetaFormer` config that
builds it and the paper's figures. It has zero or more sets of weights (:class:`Weights`),
named by tag with timm's syntax (``poolformer_s12.sail_in1k``): each carries its URL, the
hub id of timm's copy, a checksum to check against where one is pinned, the eval preprocessing its
numbers were measured with, its dataset's class names and the authors' metrics. The first
tag is the default (``pretrained=True``).

Names: our models keep the papers' names here (``poolformer_s12``, ``caformer_s18``). In
timm's registry they are prefixed ``metaformer_`` (``timm.create_model('metaformer_poolformer_s12')``)
so that they never shadow timm's own models (timm's PoolFormer v1 head is not the
authors'); both spellings work here.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import set_layer_config
from timm.models import load_checkpoint as timm_load_checkpoint
from torch import nn

from ..errors import ConfigError
from ..models.features import MetaFormerFeatures, feature_cfg_for, feature_model, resolve_feature_cls
from ..models.metaformer import MetaFormer, describe_config
from ..weights import load_weights as _load_weights
from ..weights import WeightsError, read_metadata
from ..weights.io import hub_file, is_url, resolve
from ..weights.load import NOT_ARCHITECTURE, LoadReport, mixer_of
from ..weights.save import stored_metadata
from .imagenet import categories

TIMM_PREFIX = "metaformer_"
ORIGIN_URL = "https://github.com/sail-sg"  # where every architecture and release file here is published
# Where a pretrained_cfg says weights come from, in the order timm reads them.
SOURCES = ("state_dict", "file", "hf_hub_id", "url")


@dataclass(frozen=True)
class Weights:
    """One set of trained weights (a tag of an architecture)."""

    tag: str
    url: str | None = None  # the authors' release file
    hf_hub_id: str | None = None  # timm's copy on the Hugging Face hub, in timm's layout
    sha256: str | None = None  # a published SHA-256 to check the download against; none is pinned (docs/install.md)
    dataset: str = "imagenet-1k"  # the classifier's classes: imagenet-1k or imagenet-22k
    img_size: int = 224
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_DEFAULT_MEAN
    std: tuple = IMAGENET_DEFAULT_STD
    top1: float | None = None  # the authors' ImageNet-1K top-1 (%) for these weights
    gmacs: float | None = None  # MACs at img_size as the authors print them
    recipe: str | None = None  # how they were trained
    license: str = "apache-2.0"
    notes: str = ""

    @property
    def num_classes(self) -> int:
        return 21841 if self.dataset == "imagenet-22k" else 1000

    @property
    def categories(self) -> list[str]:
        """The class names, in the classifier's order."""
        return categories(self.dataset)[0]

    def eval_resize(self) -> int:
        """Shorter side before the centre crop: ``floor(img_size / crop_pct)`` (248 for S12 at 224)."""
        return math.floor(self.img_size / self.crop_pct)

    def preprocessing(self, img_size: int | None = None) -> dict:
        """What :func:`eval_transform` needs, as plain data (stored with exported models)."""
        return {"img_size": img_size or self.img_size, "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}

    def transforms(self, img_size: int | None = None):
        """The eval preprocessing these weights' numbers were measured with."""
        return eval_transform(**self.preprocessing(img_size))


def eval_transform(img_size: int, crop_pct: float, interpolation: str, mean, std):
    """Resize the shorter side to ``floor(img_size / crop_pct)``, centre-crop ``img_size``, normalise
    (what ``timm.data.create_transform(**resolve_model_data_config(model))`` builds, to the pixel)."""
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    return T.Compose([
        T.Resize(math.floor(img_size / crop_pct), interpolation=interp),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


@dataclass(frozen=True)
class ModelInfo:
    """What an architecture is and what its paper measured (ImageNet-1K, 224, 300 epochs)."""

    name: str
    config: dict
    description: str
    params: int | None  # exact count of trainable parameters, 1000 classes (None: count it)
    paper_params: str  # as printed in the paper
    paper_macs: float | None  # GMACs at 224 as printed in the paper
    top1: float | None  # the paper's ImageNet-1K top-1 at 224
    family: str = "poolformer"
    paper: str = "arXiv:2111.11418"
    weights: tuple[Weights, ...] = ()
    defaults: Weights = field(default_factory=lambda: Weights(tag=""))  # preprocessing when there are no weights
    base: str | None = None  # for ablations: the variant they modify
    overrides: dict = field(default_factory=dict)  # for ablations: what changed

    @property
    def default_weights(self) -> Weights:
        return self.weights[0] if self.weights else self.defaults

    def get_weights(self, tag: str | None = None) -> Weights:
        if not tag:
            if not self.weights:
                raise WeightsError(f"{self.name} has no published weights: pass the path of a checkpoint instead, "
                                  f"e.g. create_model({self.name!r}, pretrained='/path/to/weights.pth')")
            return self.weights[0]
        for w in self.weights:
            if w.tag == tag:
                return w
        tags = ", ".join(f"{self.name}.{w.tag}" for w in self.weights) or "none"
        raise WeightsError(f"{self.name} has no weights tagged {tag!r}; its weights: {tags}")

    def preprocessing(self, img_size: int | None = None) -> dict:
        return self.default_weights.preprocessing(img_size)

    def transforms(self, img_size: int | None = None):
        return self.default_weights.transforms(img_size)

    def weights_cfg(self, weights: Weights | None = None) -> dict:
        """What ``weights`` (or the architecture's defaults) add to a model's ``pretrained_cfg``, in timm's names: the
        tag and where it is published, its eval preprocessing, license, paper and description."""
        w = weights or self.default_weights
        cfg = {"architecture": self.name, "tag": w.tag or None, "url": w.url, "hf_hub_id": w.hf_hub_id,
               "crop_pct": w.crop_pct, "crop_mode": "center", "interpolation": w.interpolation, "mean": tuple(w.mean),
               "std": tuple(w.std), "license": w.license, "paper_ids": self.paper, "description": self.description,
               "origin_url": ORIGIN_URL}
        return {k: v for k, v in cfg.items() if v is not None}

    def pretrained_cfg(self, weights: Weights | None = None) -> dict:
        """timm's ``pretrained_cfg`` of this architecture built for ``weights`` (their input size and classes; the
        default weights' when none are given): what timm's registry holds, and what a model built so describes."""
        w = weights or self.default_weights
        return describe_config({**self.config, "img_size": w.img_size, "num_classes": w.num_classes},
                               self.weights_cfg(w))


_REGISTRY: dict[str, ModelInfo] = {}

# Parameters and MACs of every model at 224 (1000 classes), measured by metaformer.tools.complexity
# and stored so that listing them needs no counting; a test re-measures every entry.
COMPLEXITY_FILE = Path(__file__).with_name("complexity.json")


@lru_cache(maxsize=None)
def _complexity() -> dict:
    try:
        return json.loads(COMPLEXITY_FILE.read_text())
    except FileNotFoundError:
        return {}


def complexity(name: str) -> dict | None:
    """``{'params', 'frozen', 'macs', 'macs_conv_linear'}`` of a registered model at 224, as measured."""
    return _complexity().get(split_name(name)[0])


def register(info: ModelInfo) -> ModelInfo:
    _REGISTRY[info.name] = info
    return info


def split_name(name: str) -> tuple[str, str | None]:
    """``'poolformer_s12.sail_in1k'`` -> ``('poolformer_s12', 'sail_in1k')``; timm's prefixed names too."""
    arch, _, tag = name.partition(".")
    if arch not in _REGISTRY and arch.startswith(TIMM_PREFIX) and arch[len(TIMM_PREFIX):] in _REGISTRY:
        arch = arch[len(TIMM_PREFIX):]
    return arch, tag or None


def timm_name(name: str) -> str:
    """The name an architecture has in timm's registry (never one of timm's own names)."""
    return name if name.startswith(TIMM_PREFIX) else TIMM_PREFIX + name


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style pattern, e.g. ``list_models('poolformer_*')``,
    in registration order (PoolFormer S12..M48, the S12 hybrids, then the Baselines' families)."""
    return [n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)]


def list_pretrained(pattern: str = "*") -> list[str]:
    """``name.tag`` of every set of published weights matching ``pattern``."""
    return [f"{n}.{w.tag}" for n, info in _REGISTRY.items() for w in info.weights
            if fnmatch.fnmatch(f"{n}.{w.tag}", pattern) or fnmatch.fnmatch(n, pattern)]


def get_model_info(name: str) -> ModelInfo:
    arch, _ = split_name(name)
    try:
        return _REGISTRY[arch]
    except KeyError:
        close = difflib.get_close_matches(arch, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint} Known models: {', '.join(list_models())}") from None


def get_weights(name: str) -> Weights:
    """The weights a ``name[.tag]`` stands for (the default tag when none is given)."""
    arch, tag = split_name(name)
    return get_model_info(arch).get_weights(tag)


def _architecture_of(config: dict) -> dict:
    n = len(config["depths"])
    mix = config.get("token_mixers", "pooling")
    mix = list(mix) if isinstance(mix, (list, tuple)) else [mix] * n
    return dict(depths=list(config["depths"]), dims=list(config["dims"]),
                token_mixers=[mixer_of({"qkv"} if m == "attention" else {"pwconv1"} if m == "sepconv" else
                                       {"proj"} if m == "spatial_mlp" else {"conv"} if m == "dwconv" else
                                       {"random_matrix"} if m == "random" else set()) for m in mix],
                stem_norm=bool(config.get("stem_norm")), mlp_head=bool(config.get("mlp_head")))


def variants_matching(file_arch: dict) -> list[str]:
    """The registered architectures with the layers a checkpoint holds (to name what a file is)."""
    return [n for n, info in _REGISTRY.items() if info.family != "poolformer ablation"
            and _architecture_of(info.config) == file_arch]


def load_weights(model: nn.Module, source: Any, strict: bool = True, allow_nonfinite: bool = False,
                 sha256: str | None = None, ema: bool = False) -> LoadReport:
    """:func:`metaformer.weights.load_weights`, naming the variant a mismatched file looks like."""
    return _load_weights(model, source, strict=strict, allow_nonfinite=allow_nonfinite, sha256=sha256,
                         name_match=variants_matching, ema=ema)


def _finish(model: MetaFormer, variant: str | None, weights: Weights | None, cfg: dict | None = None) -> None:
    """Record what the zoo knows: the variant name, and timm's pretrained_cfg of the model as built, described
    with the weights' entries (``cfg``: the caller's entries replacing them, timm's ``pretrained_cfg_overlay``)."""
    model.variant = variant
    info = _REGISTRY.get(variant) if variant else None
    entries = info.weights_cfg(weights) if info is not None else {}
    model.pretrained_cfg = model.default_cfg = model.describe({**entries, **(cfg or {})})


def feature_args(features_only: bool, out_indices, feature_cls, feature_cfg: dict | None,
                 output_stride: int | None) -> tuple:
    """timm's ``features_only``, ``out_indices``, ``feature_cls``, ``feature_cfg`` and ``output_stride``, checked and
    read with timm's precedence (``out_indices`` and ``feature_cls`` given directly win over ``feature_cfg``'s).
    Returns ``(out_indices, the wrapper class, its options)``.

    ``output_stride``: these networks have one, 32 (strided convolutions between the stages, no dilated form),
    so any other value is refused rather than ignored."""
    if output_stride is not None and output_stride != 32:
        raise ConfigError(f"output_stride={output_stride!r}: MetaFormer's stages downsample by 4, 8, 16 and 32 with "
                          "strided convolutions and have no dilated form, so only 32 is possible; for a stride-"
                          "16 map take features_only=True, out_indices=(2,) (stage 3)")
    cfg = dict(feature_cfg or {})
    out_indices = cfg.pop("out_indices", None) if out_indices is None else out_indices
    feature_cls = cfg.pop("feature_cls", None) if feature_cls is None else feature_cls
    cfg.pop("out_indices", None)
    cfg.pop("feature_cls", None)
    if not features_only and (out_indices is not None or feature_cls is not None or cfg):
        raise ConfigError("out_indices, feature_cls and feature_cfg describe a features_only backbone: "
                          "pass features_only=True with them")
    cls = resolve_feature_cls(feature_cls)
    return out_indices, cls, feature_cfg_for(cls, cfg)


def _cfg_overrides(arch: str, pretrained_cfg, overlay: dict | None) -> dict:
    """The entries of timm's ``pretrained_cfg`` (a dict or ``PretrainedCfg``; a tag string is handled as a
    tag) and ``pretrained_cfg_overlay`` that replace the registered ones."""
    out = {}
    if pretrained_cfg is not None and not isinstance(pretrained_cfg, str):
        if not isinstance(pretrained_cfg, dict):
            pretrained_cfg = pretrained_cfg.to_dict()  # timm's PretrainedCfg
        out.update({k: v for k, v in pretrained_cfg.items() if v is not None})
    if overlay:
        out.update(overlay)
    out.pop("architecture", None)
    if out.get("tag") is not None and out["tag"] not in {w.tag for w in get_model_info(arch).weights}:
        out.pop("tag")  # a tag of someone else's registry names no weights here
    return out


def requested_weights(arch: str, tag: str | None, pretrained, pretrained_cfg, overlay: dict | None) -> tuple:
    """What timm's weight arguments ask of ``arch``: ``(the tagged weights, the pretrained_cfg entries replacing the
    registered ones)``. The tag is the name's, or ``pretrained_cfg`` given as a tag (which wins, as in timm), or the
    one in its entries; with none, ``pretrained=True`` asks for the default weights, unless the entries name a
    source of their own. ``None`` for weights when none are asked for."""
    if isinstance(pretrained_cfg, str):
        tag = pretrained_cfg
    cfg = _cfg_overrides(arch, pretrained_cfg, overlay)
    tag = tag or cfg.get("tag")
    elsewhere = any(cfg.get(k) for k in SOURCES)
    weights = get_model_info(arch).get_weights(tag) if (tag or (pretrained is True and not elsewhere)) else None
    return weights, cfg


def weights_source(cfg: dict, weights: Weights | None, pretrained, cache_dir) -> Any:
    """What ``pretrained`` loads: a path or URL given as ``pretrained``; else the source the caller's
    pretrained_cfg names (timm's order: state_dict, file, hub, url); else the tag's release file, checksummed.
    None when there is none."""
    if pretrained is not True:
        return resolve(pretrained, None, cache_dir) if isinstance(pretrained, str) and is_url(pretrained) \
            else pretrained
    if cfg.get("state_dict"):
        return cfg["state_dict"]
    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub_id"):
        return hub_file(cfg["hf_hub_id"], cfg.get("hf_hub_filename"), cache_dir)
    if cfg.get("url"):
        return resolve(cfg["url"], None, cache_dir)
    if weights is None or weights.url is None:
        return None
    return resolve(weights.url, weights.sha256, cache_dir)


def create_model(name: str, pretrained: bool | str = False, num_classes: int | None = None,
                 in_chans: int | None = None, features_only: bool = False, out_indices=None, feature_cls=None,
                 feature_cfg: dict | None = None, output_stride: int | None = None, pretrained_cfg=None,
                 pretrained_cfg_overlay: dict | None = None, checkpoint_path=None, cache_dir=None,
                 scriptable: bool | None = None, exportable: bool | None = None, no_jit: bool | None = None,
                 allow_nonfinite: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered variant, optionally with weights. Takes every argument of ``timm.create_model``
    with timm's meaning.

    Args:
        name: a variant from :func:`list_models`, optionally with a weights tag
            (``'caformer_s18.sail_in22k_ft_in1k_384'``); timm's prefixed names work too.
        pretrained: ``False``; ``True`` for the tag's (or the default) published weights (downloaded
            once, cached, checksummed); or a path/URL to any checkpoint layout
            :func:`metaformer.load_weights` detects.
        num_classes: classifier width (default: the weights', else 1000). With pretrained weights of
            another width only the classifier is re-initialised (with a warning).
        in_chans: input channels (default 3); pretrained stem weights are adapted.
        features_only: return a backbone giving one map per stage in ``out_indices`` (default: all).
        feature_cls: ``None`` (default): each map through its own new norm, as the authors' dense
            backbones; or one of timm's wrappers of the raw stage outputs: ``'list'``, ``'dict'``,
            ``'hook'``, ``'fx'``, ``'getter'``. ``feature_cfg``: a dict of these options and the
            wrapper's own (e.g. ``{'feature_cls': 'fx'}``).
        output_stride: 32 or None; these networks have no other.
        pretrained_cfg: a tag (as ``name.tag``), or a dict / timm ``PretrainedCfg`` describing the
            weights; ``pretrained_cfg_overlay``: entries replacing the registered ones. Their
            preprocessing entries become ``model.pretrained_cfg``; ``state_dict``, ``file``,
            ``hf_hub_id`` or ``url`` say where ``pretrained=True`` reads the weights.
        checkpoint_path: a checkpoint of this very model, loaded strictly after it is built (timm's
            ``load_checkpoint``: its EMA weights when it has them).
        cache_dir: where downloads are kept (default ``$METAFORMER_CACHE`` or ``~/.cache/metaformer``;
            the hub's own cache for ``hf_hub_id``).
        scriptable, exportable, no_jit: timm's layer config while the model is built.
        **overrides: any :class:`MetaFormer` argument, e.g. ``token_mixers='identity'``,
            ``norm='ln'``, ``pool_size=5``, ``drop_path_rate=0.2``, ``img_size=384``.
    """
    out_indices, feature_cls, feature_cfg = feature_args(features_only, out_indices, feature_cls, feature_cfg,
                                                         output_stride)
    arch, tag = split_name(name)
    info = get_model_info(arch)
    weights, cfg_overrides = requested_weights(arch, tag, pretrained, pretrained_cfg, pretrained_cfg_overlay)
    cfg = copy.deepcopy(info.config)
    if weights is not None and weights.img_size != 224:
        cfg["img_size"] = weights.img_size  # size-bound parts and the eval transform follow the weights
    cfg.update(overrides)
    recorded = _check_recorded_architecture(name, cfg, pretrained) if isinstance(pretrained, (str, Path)) else None
    known = weights.num_classes if weights is not None else (recorded or {}).get("num_classes", 1000)
    source_classes = cfg_overrides.get("num_classes", known)
    cfg["num_classes"] = source_classes if num_classes is None else num_classes
    cfg["in_chans"] = 3 if in_chans is None else in_chans
    if features_only and pretrained:
        cfg["num_classes"] = source_classes  # load the whole network, then drop the head
    with set_layer_config(scriptable=scriptable, exportable=exportable, no_jit=no_jit):
        model = MetaFormer(**cfg)
        _finish(model, arch, weights, {k: v for k, v in cfg_overrides.items() if k != "state_dict"})
        if features_only and pretrained and feature_cls is MetaFormerFeatures:
            warnings.warn(f"{name} with features_only=True is the authors' detection/segmentation backbone: each stage's "
                          "map goes through a new norm (feature_norms), initialised here, not from the classifier "
                          "weights, so the maps are not the network's raw stage outputs (timm's features_only "
                          "gives those: pass feature_cls='list')", UserWarning, stacklevel=2)
        if pretrained:
            source = weights_source(cfg_overrides, weights, pretrained, cache_dir)
            if source is None:
                raise WeightsError(f"{name}: its weights have no download URL in this version; pass the path of "
                                   "the file instead (pretrained='/path/to/weights.pth')")
            load_weights(model, source, strict=True, allow_nonfinite=allow_nonfinite)
        if features_only:
            model = feature_model(model, out_indices, feature_cls, **feature_cfg)
    if checkpoint_path:
        try:
            timm_load_checkpoint(model, str(checkpoint_path))
        except (RuntimeError, OSError, KeyError) as e:
            problems = " ".join(str(e).split())
            raise WeightsError(f"checkpoint_path {checkpoint_path} does not load into this {name} strictly "
                               f"(timm's load_checkpoint: {problems[:400]})") from None
    return model


def _check_recorded_architecture(name: str, cfg: dict, pretrained) -> dict | None:
    """``pretrained=FILE`` of ours records the network it holds (returned): another architecture than ``name``'s
    is named, with the call that rebuilds it, instead of a page of missing keys."""
    path = Path(pretrained).expanduser()
    if not path.is_file():
        return None
    stored = stored_metadata(path)
    if not stored:
        return None
    recorded = stored["config"]
    diffs = [f"{k} {recorded[k]!r} (not {cfg.get(k)!r})" for k in sorted(recorded)
             if k not in NOT_ARCHITECTURE and k in cfg and recorded[k] != cfg[k]]
    if diffs:
        what = stored.get("variant") or "a MetaFormer"
        raise WeightsError(f"{pretrained} holds {what} with {', '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}, "
                           f"recorded in the file: not {name}'s architecture. Rebuild it as saved with "
                           f"metaformer.load_model({str(pretrained)!r}) (overrides as keyword arguments, e.g. "
                           "num_classes=10), or pass weights of this architecture")
    return recorded


def build_from_config(config: dict, variant: str | None = None) -> nn.Module:
    """Rebuild a model from a saved config (``model.config``; see :func:`metaformer.save_weights`)."""
    config = dict(config)
    features_only = config.pop("features_only", False)
    out_indices = config.pop("out_indices", None)
    try:
        model = MetaFormer(**config)
    except TypeError as e:
        raise ConfigError(f"this config cannot build a MetaFormer ({e}); was it saved by another version?") from None
    _finish(model, variant if variant in _REGISTRY else None, None)
    model.variant = variant  # also a name the registry does not know (a saved ablation's)
    if features_only:
        model = MetaFormerFeatures(model, out_indices if out_indices is not None else range(model.num_stages))
    return model


def load_model(path, allow_nonfinite: bool = False, **overrides: Any) -> nn.Module:
    """Rebuild the model saved by :func:`metaformer.save_weights` (or trained by ``metaformer train``: its
    ``last.pth``/``best.pth``) and load its weights strictly.

    ``overrides`` change config entries, e.g. ``num_classes=10`` (classifier re-initialised),
    ``features_only=True`` or ``img_size=384``.
    """
    resolved = resolve(path)
    meta = stored_metadata(resolved) if not resolved.name.endswith(".safetensors") else read_metadata(resolved)
    if meta is None:
        raise WeightsError(f"{path} does not record which model it holds (not written by metaformer.save_weights or "
                           "metaformer train): create the model and call metaformer.load_weights(model, path)")
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

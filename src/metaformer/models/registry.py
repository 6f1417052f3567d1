"""Named variants: the paper's PoolFormers, its S12 hybrids and its ablation models.

Weights are data, not code (the torchvision idea): each variant is a :class:`ModelInfo`
carrying its config, the checkpoint URL, the eval preprocessing its numbers were measured
with, and the paper's figures. ``create_model`` builds from it; ``info.transforms()`` gives
the exact eval transform.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ConfigError

from .metaformer import MetaFormer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASE_URL = "https://github.com/sail-sg/poolformer/releases/download/v1.0/{}.pth.tar"


@dataclass(frozen=True)
class ModelInfo:
    """What a variant is and what it was measured to do (ImageNet-1K, 224, 300 epochs)."""

    name: str
    config: dict
    description: str
    params: int  # exact count of trainable parameters, 1000 classes
    paper_params: str  # as printed in the paper
    paper_macs: float | None  # GMACs as printed in the paper (fvcore-style, norms included)
    top1: float | None  # the paper's ImageNet-1K top-1
    url: str | None = None
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    input_size: tuple = (3, 224, 224)
    num_classes: int = 1000
    base: str | None = None  # for ablations: the variant they modify
    overrides: dict = field(default_factory=dict)  # for ablations: what changed

    def eval_resize(self, img_size: int | None = None) -> int:
        """Shorter side before the centre crop: ``floor(size / crop_pct)`` (248 for S12 at 224)."""
        return math.floor((img_size or self.input_size[-1]) / self.crop_pct)

    def transforms(self, img_size: int | None = None):
        """The eval preprocessing the paper's numbers imply (resize bicubic, centre crop, normalise)."""
        return eval_transform(img_size or self.input_size[-1], self.crop_pct, self.interpolation, self.mean, self.std)

    def preprocessing(self, img_size: int | None = None) -> dict:
        """What :func:`eval_transform` needs, as plain data (stored with exported models)."""
        return {"img_size": img_size or self.input_size[-1], "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def eval_transform(img_size: int, crop_pct: float, interpolation: str, mean, std):
    """Resize the shorter side to ``floor(img_size / crop_pct)``, centre-crop ``img_size``, normalise."""
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    return T.Compose([
        T.Resize(math.floor(img_size / crop_pct), interpolation=interp),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


_REGISTRY: dict[str, ModelInfo] = {}


def register(info: ModelInfo) -> ModelInfo:
    _REGISTRY[info.name] = info
    return info


def _poolformer(name, depths, dims, ls, dpr, crop, params, pmacs, top1, pparams):
    cfg = dict(depths=list(depths), dims=list(dims), token_mixers="pooling", norm="mln", act="gelu",
               mlp_ratios=4, layer_scale_init_value=ls, drop_path_rate=dpr)
    return register(ModelInfo(name, cfg, f"PoolFormer-{name.split('_')[1].upper()}", params, pparams, pmacs, top1,
                              url=RELEASE_URL.format(name), crop_pct=crop))


S12 = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512))
M_DIMS = (96, 192, 384, 768)
_poolformer("poolformer_s12", (2, 2, 6, 2), S12["dims"], 1e-5, 0.1, 0.9, 11_915_176, 1.8, 77.2, "11.9M")
_poolformer("poolformer_s24", (4, 4, 12, 4), S12["dims"], 1e-5, 0.1, 0.9, 21_388_968, 3.4, 80.3, "21.4M")
_poolformer("poolformer_s36", (6, 6, 18, 6), S12["dims"], 1e-6, 0.2, 0.9, 30_862_760, 5.0, 81.4, "30.9M")
_poolformer("poolformer_m36", (6, 6, 18, 6), M_DIMS, 1e-6, 0.3, 0.95, 56_172_520, 8.8, 82.1, "56.2M")
_poolformer("poolformer_m48", (8, 8, 24, 8), M_DIMS, 1e-6, 0.4, 0.95, 73_473_448, 11.6, 82.5, "73.5M")

# The paper's S12 hybrids (Table 5, bottom). Attention hybrids used channel LayerNorm (eps 1e-6)
# throughout and a learnable position embedding before the first attention stage.
_HYBRIDS = {
    # name: (mixers, norm, eps, params, paper params, paper MACs, top1)
    "pppa": (["pooling", "pooling", "pooling", "attention"], "ln", 1e-6, 14_038_440, "14.0M", 1.9, 78.3),
    "ppaa": (["pooling", "pooling", "attention", "attention"], "ln", 1e-6, 16_535_592, "16.5M", 2.5, 81.0),
    "pppf": (["pooling", "pooling", "pooling", "spatial_mlp"], "mln", None, 11_919_978, "11.9M", 1.8, 77.5),
    "ppff": (["pooling", "pooling", "spatial_mlp", "spatial_mlp"], "mln", None, 12_150_474, "12.2M", 1.9, 77.9),
}
for _code, (_mixers, _norm, _eps, _params, _pp, _pm, _top1) in _HYBRIDS.items():
    _cfg = dict(depths=list(S12["depths"]), dims=list(S12["dims"]), token_mixers=_mixers, norm=_norm, act="gelu",
                mlp_ratios=4, layer_scale_init_value=1e-5, drop_path_rate=0.1)
    if _eps is not None:
        _cfg["norm_eps"] = _eps
    _stages = "".join("A" if m == "attention" else "F" if m == "spatial_mlp" else "P" for m in _mixers)
    register(ModelInfo(f"metaformer_{_code}_s12", _cfg, f"S12 hybrid, stages [{', '.join(_stages)}]", _params, _pp,
                       _pm, _top1, url=None, base="poolformer_s12", overrides={"token_mixers": _mixers}))

# The paper's ablations of PoolFormer-S12 (Table 5): each is S12 plus config overrides.
# name: (overrides, what changed, paper params, paper MACs, paper top-1)
ABLATIONS: dict[str, tuple[dict, str, str, float, float]] = {
    "baseline": ({}, "PoolFormer-S12 (pool 3, MLN, GELU)", "11.9M", 1.8, 77.2),
    "identity": ({"token_mixers": "identity"}, "pooling -> identity", "11.9M", 1.8, 74.3),
    "random": ({"token_mixers": "random"}, "pooling -> frozen random matrix", "11.9M (+21M frozen)", 3.3, 75.8),
    "dwconv": ({"token_mixers": "dwconv"}, "pooling -> depthwise conv", "11.9M", 1.8, 78.1),
    "pool_no_subtract": ({"pool_subtract": False}, "pool(x) instead of pool(x) - x", "11.9M", 1.8, None),
    "pool5": ({"pool_size": 5}, "pool size 3 -> 5", "11.9M", 1.8, 77.2),
    "pool7": ({"pool_size": 7}, "pool size 3 -> 7", "11.9M", 1.8, 77.1),
    "pool9": ({"pool_size": 9}, "pool size 3 -> 9", "11.9M", 1.8, 76.8),
    "ln": ({"norm": "ln"}, "MLN -> LayerNorm (channels)", "11.9M", 1.8, 76.5),
    "bn": ({"norm": "bn"}, "MLN -> BatchNorm", "11.9M", 1.8, 76.4),
    "no_norm": ({"norm": "none"}, "MLN -> no norm", "11.9M", 1.8, 46.1),
    "relu": ({"act": "relu"}, "GELU -> ReLU", "11.9M", 1.8, 76.4),
    "silu": ({"act": "silu"}, "GELU -> SiLU", "11.9M", 1.8, 77.2),
    "no_residual": ({"residual": False}, "no residual connections", "11.9M", 1.8, 0.1),
    "no_mlp": ({"use_mlp": False}, "no channel MLP", "2.5M", 0.2, 5.7),
    "hybrid_pppa": ({"variant": "metaformer_pppa_s12"}, "stages [P, P, P, Attention]", "14.0M", 1.9, 78.3),
    "hybrid_ppaa": ({"variant": "metaformer_ppaa_s12"}, "stages [P, P, Attention, Attention]", "16.5M", 2.5, 81.0),
    "hybrid_pppf": ({"variant": "metaformer_pppf_s12"}, "stages [P, P, P, SpatialFC]", "11.9M", 1.8, 77.5),
    "hybrid_ppff": ({"variant": "metaformer_ppff_s12"}, "stages [P, P, SpatialFC, SpatialFC]", "12.2M", 1.9, 77.9),
}


def ablation_spec(row: str, base: str = "poolformer_s12") -> tuple[str, dict]:
    """(variant name, overrides) that build ablation ``row`` of the paper's Table 5."""
    if row not in ABLATIONS:
        raise ConfigError(f"unknown ablation row {row!r}; rows: {', '.join(ABLATIONS)}")
    overrides = dict(ABLATIONS[row][0])
    variant = overrides.pop("variant", base)
    return variant, overrides


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style pattern, e.g. ``list_models('poolformer_*')``.

    In registration order: PoolFormer S12, S24, S36, M36, M48, then the S12 hybrids.
    """
    return [n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)]


def get_model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint} Known models: {', '.join(list_models())}") from None


def create_model(name: str, pretrained: bool | str = False, num_classes: int | None = None,
                 in_chans: int | None = None, features_only: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered variant, optionally with weights.

    Args:
        name: a variant from :func:`list_models`.
        pretrained: ``False``; ``True`` for the authors' release checkpoint (downloaded once,
            cached); or a path/URL to any checkpoint layout :func:`metaformer.load_weights` detects.
        num_classes: classifier width (default 1000). With pretrained weights of another width
            only the classifier is re-initialised (with a warning).
        in_chans: input channels (default 3); pretrained stem weights are adapted.
        features_only: return a backbone giving one normed feature map per stage.
        **overrides: any :class:`MetaFormer` argument, e.g. ``token_mixers='identity'``,
            ``norm='ln'``, ``pool_size=5``, ``drop_path_rate=0.2``, ``img_size=384``.
    """
    info = get_model_info(name)
    cfg = copy.deepcopy(info.config)
    cfg.update(overrides)
    cfg["num_classes"] = info.num_classes if num_classes is None else num_classes
    cfg["in_chans"] = 3 if in_chans is None else in_chans
    if features_only:
        cfg["features_only"] = True
    model = MetaFormer(**cfg)
    model.variant = name
    model.pretrained_cfg = info
    if pretrained:
        from ..weights import load_pretrained

        load_pretrained(model, info.url if pretrained is True else pretrained, name=name)
    return model


def build_from_config(config: dict, variant: str | None = None) -> nn.Module:
    """Rebuild a model from a saved config (see :func:`metaformer.save_weights`)."""
    model = MetaFormer(**config)
    model.variant = variant
    model.pretrained_cfg = _REGISTRY.get(variant) if variant else None
    return model

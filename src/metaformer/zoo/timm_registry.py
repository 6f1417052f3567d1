"""Our models in timm's registry: ``timm.create_model('metaformer_poolformer_s12')`` builds ours.

Every architecture of the zoo, and every row of PoolFormer's ablation table, is registered under
a name with the ``metaformer_`` prefix (``metaformer_poolformer_s12``, ``metaformer_caformer_s18``,
``metaformer_s12_identity``; the hybrids already are ``metaformer_*``), with its weights as timm
tags (``metaformer_poolformer_s12.sail_in1k``). No name is one of timm's, so importing metaformer
never changes what timm's own names build. timm's builder does the rest: ``pretrained_cfg``,
``features_only`` (our backbone with the authors' per-stage norms), ``pretrained=True``
(the same release file as ``metaformer.create_model``, see :func:`authors_file`, read through
:func:`checkpoint_filter`, which reads any layout we read), ``train.py --model`` and
``validate.py --model``.
"""
from __future__ import annotations

import sys

import torch
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._registry import _model_entrypoints

from ..models.features import feature_cfg_for, resolve_feature_cls
from ..models.metaformer import MetaFormer, conv_out
from ..weights.io import DownloadError, resolve, unwrap
from ..weights.layouts import detect_layout, to_ours
from .registry import _REGISTRY, ModelInfo, check_output_stride, split_feature_args, timm_name

default_cfgs: dict = {}  # read by timm's register_model from this module


def checkpoint_filter(state_dict: dict, model: torch.nn.Module) -> dict:
    """Any layout we read (the authors', timm's, Hugging Face's) -> this model's keys and shapes."""
    sd = unwrap(state_dict, "pretrained weights")
    own = model.state_dict()
    out = {}
    for key, (_, value) in to_ours(sd, detect_layout(sd) or "timm").items():
        target = own.get(key)
        if target is not None and value.shape != target.shape and value.numel() == target.numel():
            value = value.reshape(target.shape)  # nn.Linear <-> 1x1 conv
        out[key] = value
    return out


def authors_file(variant: str, pretrained_cfg, overlay: dict | None) -> dict | None:
    """The ``pretrained_cfg_overlay`` with which timm's ``pretrained=True`` loads what ``metaformer.create_model``
    loads: the tag's release file from the authors (:attr:`Weights.url`), downloaded and checked by metaformer
    into its cache (one line, at once, when offline, instead of timm's retries of its Hub copy). A source the
    caller names (``state_dict``, ``file``, ``hf_hub_id``, ``url``) is left to timm."""
    given = dict(overlay or {})
    if pretrained_cfg is not None and not isinstance(pretrained_cfg, str):
        given = {**(pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()), **given}
    if any(given.get(k) for k in ("state_dict", "file", "hf_hub_id", "url")):
        return overlay
    tag = pretrained_cfg if isinstance(pretrained_cfg, str) else given.get("tag")
    weights = _REGISTRY[variant].get_weights(tag)
    if weights.url is None:
        return overlay
    try:
        path = resolve(weights.url, weights.sha256)
    except DownloadError as e:  # timm's way to pass the file instead
        raise DownloadError(e.url, e.dest, e.reason, "pretrained_cfg_overlay=dict(file='{}')") from None
    return {**(overlay or {}), "file": str(path)}


def token_grid(size: tuple) -> tuple:
    """The last stage's token grid for an input of ``size`` (height, width): stem k7 s4 p2, three k3 s2 p1."""
    out = []
    for s in size:
        for kernel, stride, padding in ((7, 4, 2), (3, 2, 1), (3, 2, 1), (3, 2, 1)):
            s = conv_out(s, kernel, stride, padding)
        out.append(s)
    return tuple(out)


def _timm_cfg(info: ModelInfo, cfg: dict, model_cfg: dict) -> dict:
    """A dict timm's PretrainedCfg accepts: what the test-suite and data pipeline read."""
    mlp_head = bool(model_cfg.get("mlp_head"))
    fixed = any(m in ("random", "spatial_mlp") for m in _as_list(model_cfg.get("token_mixers", "pooling")))
    keep = ("url", "hf_hub_id", "input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "num_classes",
            "license", "paper_ids", "description", "architecture", "tag")
    out = {k: v for k, v in cfg.items() if k in keep}
    out.update(pool_size=token_grid(cfg["input_size"][1:]), min_input_size=(3, 32, 32), fixed_input_size=fixed, first_conv="stem.conv",
               classifier="head.fc.fc2" if mlp_head else "head.fc", origin_url="https://github.com/sail-sg")
    out.pop("architecture", None)
    out.pop("tag", None)
    return out


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _variant_builder(variant: str):
    def build(**kwargs) -> MetaFormer:
        model = MetaFormer(**kwargs)
        model.variant = variant
        return model

    return build


def _entrypoint(name: str, variant: str, model_cfg: dict):
    def entry(pretrained: bool = False, **kwargs) -> torch.nn.Module:
        check_output_stride(kwargs.pop("output_stride", None))
        depths = kwargs.get("depths", model_cfg["depths"])
        out_indices, feature_cls, feature_cfg = split_feature_args(
            kwargs.get("features_only", False), kwargs.pop("out_indices", None), kwargs.pop("feature_cls", None),
            kwargs.pop("feature_cfg", None))
        cls = resolve_feature_cls(feature_cls)
        feature_cfg = dict(feature_cfg_for(cls, feature_cfg), feature_cls=cls,
                           out_indices=tuple(range(len(depths))) if out_indices is None else out_indices)
        if "img_size" in kwargs:
            # built for a size of the caller's: describe the model as built, so timm's data config fits it
            size = to_2tuple(kwargs["img_size"])
            kwargs["pretrained_cfg_overlay"] = {"input_size": (kwargs.get("in_chans", 3), *size),
                                                "pool_size": token_grid(size),
                                                **(kwargs.get("pretrained_cfg_overlay") or {})}
        if pretrained:
            kwargs["pretrained_cfg_overlay"] = authors_file(variant, kwargs.get("pretrained_cfg"),
                                                            kwargs.get("pretrained_cfg_overlay"))
        return build_model_with_cfg(_variant_builder(variant), name, pretrained,
                                    pretrained_filter_fn=checkpoint_filter, feature_cfg=feature_cfg,
                                    **{**model_cfg, **kwargs})

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"metaformer's {variant} (see metaformer.create_model)"
    return entry


def _specs() -> list[tuple[str, str, dict, ModelInfo]]:
    """(timm name, our variant, MetaFormer config, info) of every architecture (ablation rows included)."""
    return [(timm_name(n), n, dict(info.config), info) for n, info in _REGISTRY.items()]


def register_all() -> list[str]:
    """Register every model in timm (idempotent: already registered names are left as they are)."""
    names = []
    module = sys.modules[__name__]
    for name, variant, model_cfg, info in _specs():
        names.append(name)
        if name in _model_entrypoints:
            continue
        tags = {f"{name}.{w.tag}": _timm_cfg(info, info.pretrained_cfg(w), model_cfg) for w in info.weights}
        if not tags:
            tags = {name: _timm_cfg(info, info.pretrained_cfg(), model_cfg)}
        module.default_cfgs.update(generate_default_cfgs(tags))
        register_model(_entrypoint(name, variant, model_cfg))
    return names

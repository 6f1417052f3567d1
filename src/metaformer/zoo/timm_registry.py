"""Our models in timm's registry: ``timm.create_model('metaformer_poolformer_s12')`` builds ours.

Every architecture of the zoo, and every row of PoolFormer's ablation table, is registered under
a name with the ``metaformer_`` prefix (``metaformer_poolformer_s12``, ``metaformer_caformer_s18``,
``metaformer_s12_identity``; the hybrids already are ``metaformer_*``), with its weights as timm
tags (``metaformer_poolformer_s12.sail_in1k``). No name is one of timm's, so importing metaformer
never changes what timm's own names build. Each tag's ``pretrained_cfg`` is the one
:meth:`ModelInfo.pretrained_cfg` writes, and timm's creation arguments are read by the functions
``metaformer.create_model`` reads them with (:func:`~.registry.feature_args`,
:func:`~.registry.requested_weights`, :func:`~.registry.weights_source`). timm's builder does the rest:
``features_only`` (our backbone with the authors' per-stage norms), ``pretrained=True`` (the same release
file as ``metaformer.create_model``, see :func:`authors_file`, read through :func:`checkpoint_filter`, which
reads any layout we read), ``train.py --model`` and ``validate.py --model``.
"""
from __future__ import annotations

import sys

import torch
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._registry import _model_entrypoints

from ..models.metaformer import MetaFormer, token_grids
from ..weights.io import DownloadError, unwrap
from ..weights.layouts import detect_layout, to_ours
from .registry import _REGISTRY, SOURCES, ModelInfo, feature_args, requested_weights, timm_name, weights_source

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


def authors_file(variant: str, pretrained_cfg, overlay: dict | None, cache_dir=None) -> dict | None:
    """The ``pretrained_cfg_overlay`` with which timm's ``pretrained=True`` loads what ``metaformer.create_model``
    loads: the tag's release file from the authors (:attr:`Weights.url`), downloaded and checked by metaformer
    into ``cache_dir`` (default: its cache; one line, at once, when offline, instead of timm's retries of its Hub
    copy). A source the caller names (``state_dict``, ``file``, ``hf_hub_id``, ``url``) is left to timm."""
    weights, cfg = requested_weights(variant, None, True, pretrained_cfg, overlay)
    if any(cfg.get(k) for k in SOURCES):
        return overlay
    try:
        path = weights_source(cfg, weights, True, cache_dir)
    except DownloadError as e:  # timm's way to pass the file instead
        raise DownloadError(e.url, e.dest, e.reason, "pretrained_cfg_overlay=dict(file='{}')") from None
    return overlay if path is None else {**(overlay or {}), "file": str(path)}


def _variant_builder(variant: str):
    def build(**kwargs) -> MetaFormer:
        model = MetaFormer(**kwargs)
        model.variant = variant
        return model

    return build


def _entrypoint(name: str, variant: str, model_cfg: dict):
    def entry(pretrained: bool = False, **kwargs) -> torch.nn.Module:
        out_indices, cls, feature_cfg = feature_args(
            kwargs.get("features_only", False), kwargs.pop("out_indices", None), kwargs.pop("feature_cls", None),
            kwargs.pop("feature_cfg", None), kwargs.pop("output_stride", None))
        num_stages = len(kwargs.get("depths", model_cfg["depths"]))
        feature_cfg = dict(feature_cfg, feature_cls=cls,
                           out_indices=tuple(range(num_stages)) if out_indices is None else out_indices)
        if "img_size" in kwargs:
            # built for a size of the caller's: describe the model as built, so timm's data config fits it
            size = to_2tuple(kwargs["img_size"])
            kwargs["pretrained_cfg_overlay"] = {"input_size": (kwargs.get("in_chans", 3), *size),
                                                "pool_size": token_grids(size, num_stages)[-1],
                                                **(kwargs.get("pretrained_cfg_overlay") or {})}
        if pretrained:
            kwargs["pretrained_cfg_overlay"] = authors_file(variant, kwargs.get("pretrained_cfg"),
                                                            kwargs.get("pretrained_cfg_overlay"),
                                                            kwargs.get("cache_dir"))
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
        # timm sets each cfg's architecture and tag from its key
        tags = {f"{name}.{w.tag}": info.pretrained_cfg(w) for w in info.weights} or {name: info.pretrained_cfg()}
        module.default_cfgs.update(generate_default_cfgs(tags))
        register_model(_entrypoint(name, variant, model_cfg))
    return names

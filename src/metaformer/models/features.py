"""A MetaFormer as a multi-scale backbone (``create_model(..., features_only=True)``).

The default is the authors' detection and segmentation backbone (Yu et al., CVPR 2022;
docs/dense.md, "What is the paper's"): the output of each stage (strides 4/8/16/32, channels = ``dims``), each through its
own new norm, no classifier. The wrapper holds the network's stem and stages (their state-dict
keys stay those of the classifier, so an ImageNet checkpoint loads into it with only the head
left out) and the new norms under ``feature_norms``. timm's own wrappers (``feature_cls``
``'list'``, ``'dict'``, ``'hook'``, ``'fx'``, ``'getter'``) give the raw stage outputs instead,
with timm's meaning (:func:`feature_model`).
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet, FeatureInfo, FeatureListNet
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet
from torch import nn

from ..errors import ConfigError
from .layers import eager, norm_factory
from .metaformer import MetaFormer, NormPoolHead, check_image_input


class MetaFormerFeatures(nn.Module):
    """One normed map per index in ``out_indices`` (stage ``i`` has stride ``4 * 2**i``).

    ``feature_info`` is timm's :class:`FeatureInfo`; ``config`` rebuilds it
    (``features_only``/``out_indices`` added to the network's config). The new norms are
    GroupNorm(1) for PoolFormer-style models (the authors' choice) and channel LayerNorm for the
    Baselines, unless the network's ``feature_norm`` says otherwise.
    """

    def __init__(self, model: MetaFormer, out_indices: Sequence[int] = (0, 1, 2, 3), output_fmt: str = "NCHW"):
        super().__init__()
        if output_fmt != "NCHW":
            raise ConfigError(f"MetaFormer backbones output NCHW maps, not {output_fmt}")
        n = model.num_stages
        try:
            self.out_indices = tuple(sorted({int(i) % n for i in out_indices}))
        except (TypeError, ValueError):
            raise ConfigError(f"out_indices must be stage indices (0..{n - 1}), got {out_indices!r}") from None
        if any(not -n <= int(i) < n for i in out_indices):
            raise ConfigError(f"out_indices {list(out_indices)} out of range for a {n}-stage model (0..{n - 1})")
        self.in_chans = model.in_chans
        self.num_stages = n
        self.img_size = model.img_size
        self.stem = model.stem
        self.stages = model.stages[:max(self.out_indices) + 1]  # later stages feed no output
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        spec = model.config.get("feature_norm") or ("mln" if isinstance(model.head, NormPoolHead) else "ln")
        self.feature_norms = nn.ModuleList(norm_factory(spec)(model.dims[i]) for i in self.out_indices)
        self.config: Dict[str, Any] = {**model.config, "features_only": True, "out_indices": list(self.out_indices)}
        cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("num_classes", "classifier", "pool_size")}
        self.pretrained_cfg = self.default_cfg = cfg
        self.variant, self.class_names = model.variant, model.class_names

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if not torch.jit.is_scripting():  # never compiled: eager calls only
            if eager():
                check_image_input(x, self.in_chans)
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                out.append(x)
        return [norm(f) for norm, f in zip(self.feature_norms, out)]


# timm's feature_cls names (timm.models.build_model_with_cfg), each a wrapper returning the raw stage outputs.
FEATURE_CLASSES: Dict[str, Callable[..., nn.Module]] = {
    "list": FeatureListNet, "dict": FeatureDictNet, "hook": FeatureHookNet, "fx": FeatureGraphNet,
    "getter": FeatureGetterNet}


def resolve_feature_cls(feature_cls: Union[None, str, Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    """``None`` -> :class:`MetaFormerFeatures`; one of timm's names (any name containing ``'hook'`` is the
    hook wrapper, as in timm) or a class -> that wrapper."""
    if feature_cls is None:
        return MetaFormerFeatures
    if not isinstance(feature_cls, str):
        return feature_cls
    name = feature_cls.lower()
    if "hook" in name:
        return FeatureHookNet
    try:
        return FEATURE_CLASSES[name]
    except KeyError:
        raise ConfigError(f"unknown feature_cls {feature_cls!r}; choose one of {sorted(FEATURE_CLASSES)}, a class, "
                          "or leave it unset for the normed per-stage maps") from None


def feature_cfg_for(feature_cls: Callable[..., nn.Module], feature_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The options ``feature_cls`` takes from ``feature_cfg`` (timm's rules), and the one our network needs:
    timm's module-walking wrappers reach ``stages.i`` only through a flattened ``stages`` container."""
    cfg = dict(feature_cfg)
    is_cls = isinstance(feature_cls, type)
    if is_cls and issubclass(feature_cls, FeatureDictNet):
        cfg.setdefault("flatten_sequential", True)
    elif not (is_cls and issubclass(feature_cls, FeatureHookNet)):
        cfg.pop("flatten_sequential", None)
    if not (is_cls and issubclass(feature_cls, FeatureHookNet)):
        cfg.pop("no_rewrite", None)
    return cfg


def feature_model(model: MetaFormer, out_indices: Optional[Sequence[int]] = None,
                  feature_cls: Union[None, str, Callable[..., nn.Module]] = None, **feature_cfg: Any) -> nn.Module:
    """``model`` as a ``features_only`` backbone: ``out_indices`` (default: every stage) through
    ``feature_cls`` (see :func:`resolve_feature_cls`) with the options in ``feature_cfg``."""
    cls = resolve_feature_cls(feature_cls)
    out_indices = tuple(range(model.num_stages)) if out_indices is None else out_indices
    wrapped = cls(model, out_indices=out_indices, **feature_cfg_for(cls, feature_cfg))
    if not isinstance(wrapped, MetaFormerFeatures):  # timm's wrappers get the description timm's builder gives them
        wrapped.pretrained_cfg = wrapped.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return wrapped

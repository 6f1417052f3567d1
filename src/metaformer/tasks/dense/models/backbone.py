"""MetaFormer backbones for dense prediction, and their FPN necks.

The authors' dense backbones (Yu et al., CVPR 2022; docs/dense.md): the features after each stage
(strides 4/8/16/32, channels = ``dims``), each through its own new GroupNorm(1), no classifier.
That is ``create_model(name, features_only=True)``; this module adds what detection and
segmentation frameworks expect of a backbone: ``frozen_stages`` (mmdet's meaning),
loading an ImageNet checkpoint with the classifier dropped, and an FPN on chosen levels
with ``out_channels`` and named outputs, the interface torchvision's detectors take.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import (ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool,
                                                     LastLevelP6P7)

from ....engine.loop import freeze, frozen_modules
from ....errors import ConfigError
from ....zoo import create_model, load_weights


def describe_report(report) -> str:
    """One line saying what loading an ImageNet checkpoint into a backbone did."""
    parts = [f"loaded {report.loaded} tensors from {report.source} ({report.layout} layout)"]
    if report.dropped:
        parts.append(f"dropped the classifier: {', '.join(report.dropped)}")
    if report.reinitialised:
        parts.append(f"new per-stage output norms start from their init: {len(report.reinitialised)} tensors")
    if report.adapted:
        parts.append(f"adapted: {', '.join(report.adapted)}")
    return "; ".join(parts)


class MetaFormerBackbone(nn.Module):
    """Any registered MetaFormer (plus overrides) as a multi-scale backbone.

    ``forward`` returns one normed map per index in ``out_indices`` (stage ``i`` has stride
    ``4 * 2**i``). ``frozen_stages`` follows mmdet: -1 freezes nothing, 0 the stem, ``k`` the
    stem and stages ``0..k-1``; frozen parts stop receiving gradients and stay in eval mode
    (so a BatchNorm variant keeps its ImageNet statistics). The per-stage output norms are
    new layers and are never frozen. ``pretrained`` is any checkpoint
    :func:`metaformer.weights.load_weights` reads; the load report is kept in ``load_report``.
    """

    def __init__(self, name: str = "poolformer_s12", out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, pretrained: str | None = None, verbose: bool = True, **overrides: Any):
        super().__init__()
        # The authors' dense configs train without stochastic depth; an override can still set it.
        overrides.setdefault("drop_path_rate", 0.0)
        self.body = create_model(name, features_only=True, out_indices=tuple(out_indices), **overrides)
        self.name = name
        self.out_indices = self.body.out_indices
        self.out_channels = self.body.feature_info.channels()
        self.strides = self.body.feature_info.reduction()
        frozen_modules(self.body, frozen_stages)  # checks the range before anything is loaded
        self.frozen_stages = frozen_stages
        self.load_report = None
        if pretrained:
            self.load_report = load_weights(self.body, pretrained)
            if verbose:
                print(f"backbone {name}: {describe_report(self.load_report)}")
        freeze(self.body, frozen_stages)

    def train(self, mode: bool = True) -> "MetaFormerBackbone":
        super().train(mode)
        freeze(self.body, self.frozen_stages)  # frozen parts stay in eval mode
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)


class LastLevelP6P7OnInput(LastLevelP6P7):
    """RetinaNet's P6/P7, with P6 always computed from the last backbone map (mmdet's
    ``add_extra_convs='on_input'``, the paper's setup). torchvision switches to P5 when the
    backbone happens to have as many channels as the FPN; this keeps the input fixed."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.use_P5 = False


class BackboneWithFPN(nn.Module):
    """A :class:`MetaFormerBackbone` followed by torchvision's FPN.

    Returns an ``OrderedDict`` of 256-channel (by default) maps named ``'0', '1', ...`` in
    order of increasing stride, then the extra levels (``'pool'`` or ``'p6', 'p7'``): the
    names torchvision's detectors and RoI poolers expect.
    """

    def __init__(self, backbone: MetaFormerBackbone, out_channels: int = 256,
                 extra_blocks: ExtraFPNBlock | None = None):
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def backbone_with_fpn(name: str, out_indices: Sequence[int], extra: str | None, fpn_channels: int = 256,
                      frozen_stages: int = -1, pretrained: str | None = None, **overrides: Any) -> BackboneWithFPN:
    """``extra``: ``'p6p7'`` (RetinaNet, from the last backbone map), ``'maxpool'`` (Mask R-CNN's
    P6, a stride-2 max-pool of the top FPN level) or None."""
    backbone = MetaFormerBackbone(name, out_indices, frozen_stages, pretrained, **overrides)
    if extra == "p6p7":
        extra_block = LastLevelP6P7OnInput(backbone.out_channels[-1], fpn_channels)
    elif extra == "maxpool":
        extra_block = LastLevelMaxPool()
    elif extra is None:
        extra_block = None
    else:
        raise ConfigError(f"unknown extra FPN levels {extra!r}: use 'p6p7', 'maxpool' or None")
    return BackboneWithFPN(backbone, fpn_channels, extra_block)

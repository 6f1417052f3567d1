"""Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", 2019) on a MetaFormer.

The paper's ADE20K model (its mmseg config): the backbone's four normed stage maps, a
256-channel FPN on all four (no extra levels), then the Semantic FPN head: each level goes
through ``log2(stride / 4)`` rounds of 3x3 conv (128 ch) - GroupNorm - ReLU - 2x bilinear
upsampling (one conv and no upsampling for stride 4), the levels are summed at stride 4,
then dropout 0.1, a 1x1 classifier, and x4 bilinear upsampling to the input size.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from ....errors import ConfigError
from .backbone import MetaFormerBackbone


def _conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(32, cout), cout),
                         nn.ReLU(inplace=True))


class SemanticFPNHead(nn.Module):
    def __init__(self, in_channels: int, strides: Sequence[int], num_classes: int, channels: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        base = strides[0]
        self.scale_heads = nn.ModuleList()
        for i, s in enumerate(strides):
            n = int(math.log2(s // base))
            layers: list[nn.Module] = []
            for k in range(max(1, n)):
                layers.append(_conv_gn_relu(in_channels if k == 0 else channels, channels))
                if n > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # mmseg's decode-head init
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            # Inputs not a multiple of 32 leave odd map sizes: align to the stride-4 map.
            out = out + F.interpolate(head(f), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Backbone -> FPN -> Semantic FPN head. ``forward`` returns logits at the input size."""

    def __init__(self, backbone: MetaFormerBackbone, num_classes: int, fpn_channels: int = 256,
                 head_channels: int = 128):
        super().__init__()
        self.backbone = backbone
        self.neck = FeaturePyramidNetwork(backbone.out_channels, fpn_channels)
        self.head = SemanticFPNHead(fpn_channels, backbone.strides, num_classes, head_channels)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.neck(OrderedDict((str(i), f) for i, f in enumerate(self.backbone(x))))
        logits = self.head(list(feats.values()))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def semantic_fpn(backbone_name: str = "poolformer_s12", num_classes: int = 150, *, pretrained_backbone: str | None = None,
                 frozen_stages: int = -1, fpn_channels: int = 256, head_channels: int = 128,
                 backbone_overrides: dict | None = None) -> SemanticFPN:
    """The paper's ADE20K model: ``semantic_fpn('poolformer_s12', 150, pretrained_backbone=...)``."""
    backbone = MetaFormerBackbone(backbone_name, (0, 1, 2, 3), frozen_stages, pretrained_backbone,
                                  **(backbone_overrides or {}))
    return SemanticFPN(backbone, num_classes, fpn_channels, head_channels)


def build_segmenter(**config: Any) -> SemanticFPN:
    return semantic_fpn(**config)


def build_segmenter_from_checkpoint(ckpt: dict) -> SemanticFPN:
    model = build_segmenter(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model


@torch.no_grad()
def segment_logits(model: torch.nn.Module, x: torch.Tensor, mode: str = "whole", crop: int = 512,
                   stride: int | None = None) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` for normalised images: one pass (``whole``) or mmseg's sliding
    window (``slide``: ``crop`` windows every ``stride`` = 2/3 crop px, overlaps averaged)."""
    if mode == "whole":
        return model(x)
    if mode != "slide":
        raise ConfigError(f"unknown test mode {mode!r}: use whole or slide")
    stride = stride or crop * 2 // 3
    b, _, h, w = x.shape
    logits = x.new_zeros((b, model.num_classes, h, w))
    count = x.new_zeros((1, 1, h, w))
    for gy in range(max(h - crop + stride - 1, 0) // stride + 1):
        for gx in range(max(w - crop + stride - 1, 0) // stride + 1):
            y1, x1 = min(gy * stride + crop, h), min(gx * stride + crop, w)
            y0, x0 = max(y1 - crop, 0), max(x1 - crop, 0)
            logits[:, :, y0:y1, x0:x1] += model(x[:, :, y0:y1, x0:x1]).float()
            count[:, :, y0:y1, x0:x1] += 1
    return logits / count

"""RetinaNet and Mask R-CNN with a MetaFormer + FPN backbone, through torchvision.

Set up as PoolFormer's COCO experiments (Yu et al., CVPR 2022, with mmdet; docs/dense.md, "What is the
paper's, and what is torchvision's"): a 256-channel FPN; RetinaNet's FPN
on stages 2-4 (strides 8/16/32) plus P6/P7 computed from the last backbone map (mmdet's
``start_level=1, add_extra_convs='on_input'``), anchors of 3 scales per octave from 32 to
512 px at 3 aspect ratios; Mask R-CNN's FPN on all four stages plus a max-pooled P6 (mmdet's
``num_outs=5``), anchors 32-512 px. Heads, losses, sampling and post-processing are
torchvision's. ``num_classes`` counts the background, as torchvision does (COCO: 81).
Images go in as ``[0, 1]`` RGB tensors; the model normalises with the ImageNet mean/std the
backbone was pretrained with and resizes to ``min_size``/``max_size`` (paper: 800/1333).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import unwrap_model
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from ....engine.runtime import Runtime
from ....errors import ConfigError
from .backbone import backbone_with_fpn

ARCHS = ("retinanet", "mask_rcnn")


def _retinanet_anchors() -> AnchorGenerator:
    # mmdet's RetinaNet anchors: octave_base_scale 4 x strides 8..128, 3 scales per octave.
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def retinanet(backbone_name: str = "poolformer_s12", num_classes: int = 81, *, pretrained_backbone: str | None = None,
              frozen_stages: int = -1, fpn_channels: int = 256, min_size: int = 800, max_size: int = 1333,
              backbone_overrides: dict | None = None, **kwargs: Any) -> RetinaNet:
    """torchvision ``RetinaNet`` on a MetaFormer: FPN on stages 2-4 + P6/P7 (strides 8-128)."""
    backbone = backbone_with_fpn(backbone_name, (1, 2, 3), "p6p7", fpn_channels, frozen_stages, pretrained_backbone,
                                 **(backbone_overrides or {}))
    return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size, image_mean=list(IMAGENET_DEFAULT_MEAN),
                     image_std=list(IMAGENET_DEFAULT_STD), anchor_generator=_retinanet_anchors(), **kwargs)


def mask_rcnn(backbone_name: str = "poolformer_s12", num_classes: int = 81, *, pretrained_backbone: str | None = None,
              frozen_stages: int = -1, fpn_channels: int = 256, min_size: int = 800, max_size: int = 1333,
              backbone_overrides: dict | None = None, box_head_dim: int = 1024, mask_head_channels: int = 256,
              **kwargs: Any) -> MaskRCNN:
    """torchvision ``MaskRCNN`` on a MetaFormer: FPN on all four stages + max-pool P6 (strides 4-64).

    ``box_head_dim`` (two shared FCs) and ``mask_head_channels`` (four 3x3 convs and the
    deconvolution) are the standard 1024 and 256; smaller values make CPU smoke runs cheap.
    """
    backbone = backbone_with_fpn(backbone_name, (0, 1, 2, 3), "maxpool", fpn_channels, frozen_stages,
                                 pretrained_backbone, **(backbone_overrides or {}))
    box_head = TwoMLPHead(fpn_channels * 7 * 7, box_head_dim)
    mask_head = MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1)
    return MaskRCNN(backbone, None, min_size=min_size, max_size=max_size, image_mean=list(IMAGENET_DEFAULT_MEAN),
                    image_std=list(IMAGENET_DEFAULT_STD), box_head=box_head,
                    box_predictor=FastRCNNPredictor(box_head_dim, num_classes), mask_head=mask_head,
                    mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes), **kwargs)


def build_detector(arch: str, **config: Any) -> nn.Module:
    """Build ``arch`` (``'retinanet'`` or ``'mask_rcnn'``) from a builder's keyword arguments."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown detector {arch!r}: use one of {', '.join(ARCHS)}")
    return (retinanet if arch == "retinanet" else mask_rcnn)(**config)


def build_detector_from_checkpoint(ckpt: dict) -> nn.Module:
    model = build_detector(ckpt["arch"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model


@torch.no_grad()
def detect(model: torch.nn.Module, images: list[torch.Tensor], rt: Runtime) -> list[dict]:
    """Detections (boxes, labels, scores, masks) for ``[0, 1]`` RGB images, on the CPU in float32."""
    model = unwrap_model(model).eval()  # the model inside DDP / torch.compile
    with rt.autocast():
        out = model([im.to(rt.device) for im in images])
    return [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in out]

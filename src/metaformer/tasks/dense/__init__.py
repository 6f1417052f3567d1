"""Dense prediction with MetaFormer backbones: detection (torchvision RetinaNet / Mask R-CNN) and semantic
segmentation (Semantic FPN). Here: the networks (:mod:`.models`), COCO/ADE20K data (:mod:`.data`), what a
detection and a segmentation run share (:mod:`.run`) and drawing predictions (:mod:`.predict`). The training
and evaluation loops are the tasks' own modules, :mod:`metaformer.tasks.detection` and
:mod:`metaformer.tasks.segmentation`; they import this package, never the other way."""
from .models import (BackboneWithFPN, MetaFormerBackbone, SemanticFPN, SemanticFPNHead, backbone_with_fpn,
                     build_detector, build_segmenter, mask_rcnn, retinanet, semantic_fpn)

__all__ = ["BackboneWithFPN", "MetaFormerBackbone", "SemanticFPN", "SemanticFPNHead", "backbone_with_fpn",
           "build_detector", "build_segmenter", "mask_rcnn", "retinanet", "semantic_fpn"]

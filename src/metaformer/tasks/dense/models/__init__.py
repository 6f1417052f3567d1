"""The dense-prediction networks: a MetaFormer backbone with its FPN necks (:mod:`.backbone`), RetinaNet and
Mask R-CNN (:mod:`.detector`), Semantic FPN (:mod:`.segmenter`), each rebuilt from a checkpoint and run on
images here. No data, training or evaluation: the loops that train and score them import these
(:mod:`metaformer.tasks.detection`, :mod:`metaformer.tasks.segmentation`), never the other way."""
from .backbone import BackboneWithFPN, MetaFormerBackbone, backbone_with_fpn
from .detector import build_detector, build_detector_from_checkpoint, detect, mask_rcnn, retinanet
from .segmenter import (SemanticFPN, SemanticFPNHead, build_segmenter, build_segmenter_from_checkpoint, segment_logits,
                        semantic_fpn)

__all__ = ["BackboneWithFPN", "MetaFormerBackbone", "SemanticFPN", "SemanticFPNHead", "backbone_with_fpn",
           "build_detector", "build_detector_from_checkpoint", "build_segmenter", "build_segmenter_from_checkpoint",
           "detect", "mask_rcnn", "retinanet", "segment_logits", "semantic_fpn"]

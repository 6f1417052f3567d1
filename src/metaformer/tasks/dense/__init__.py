"""Dense prediction with MetaFormer backbones: detection (torchvision RetinaNet / Mask R-CNN)
and semantic segmentation (Semantic FPN), with COCO/ADE20K data and train/eval loops."""
from .backbone import BackboneWithFPN, MetaFormerBackbone, backbone_with_fpn
from .detection import build_detector, mask_rcnn, retinanet
from .segmentation import SemanticFPN, SemanticFPNHead, build_segmenter, semantic_fpn

__all__ = ["BackboneWithFPN", "MetaFormerBackbone", "SemanticFPN", "SemanticFPNHead", "backbone_with_fpn",
           "build_detector", "build_segmenter", "mask_rcnn", "retinanet", "semantic_fpn"]

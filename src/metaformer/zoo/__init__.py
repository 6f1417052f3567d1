"""The model zoo: architectures, their tagged weights, ``create_model`` and ``load_model``, and their
registration in timm (``import metaformer`` makes ``timm.create_model('metaformer_poolformer_s12')``
build ours)."""
from . import poolformer  # noqa: F401  (registers PoolFormer, its hybrids and ablations)
from . import baselines  # noqa: F401  (registers IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer)
from .poolformer import ABLATIONS, ablation_spec
from .registry import (ModelInfo, Weights, build_from_config, create_model, eval_transform, get_model_info,
                       get_weights, list_models, list_pretrained, load_model, load_weights, rebuild, split_name,
                       timm_name, variants_matching)
from .timm_registry import register_all

register_all()

__all__ = ["ABLATIONS", "ModelInfo", "Weights", "ablation_spec", "build_from_config", "create_model",
           "eval_transform", "get_model_info", "get_weights", "list_models", "list_pretrained", "load_model",
           "load_weights", "rebuild", "split_name", "timm_name", "variants_matching"]

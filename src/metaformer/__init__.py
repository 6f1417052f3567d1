"""metaformer: the MetaFormer family of vision models (Yu et al., CVPR 2022 and TPAMI 2024), faithful to
the papers and the authors' weights, and a drop-in for timm.

``import metaformer`` registers the models in timm's registry (``timm.create_model('metaformer_*')``);
it does not import the training, detection or plotting stack.
"""
from .fast import fuse
from .models import MetaFormer, MetaFormerBlock, MetaFormerFeatures, Pooling, count_params, register_token_mixer
from .tools.hub import from_pretrained, save_pretrained
from .weights import LoadReport, WeightsError, read_metadata, save_weights
from .zoo import (ABLATIONS, ModelInfo, Weights, ablation_spec, build_from_config, create_model, get_model_info,
                  get_weights, list_models, list_pretrained, load_model, load_weights)

__version__ = "0.1.0"

__all__ = ["ABLATIONS", "LoadReport", "MetaFormer", "MetaFormerBlock", "MetaFormerFeatures", "ModelInfo", "Pooling",
           "Weights", "WeightsError", "ablation_spec", "build_from_config", "count_params", "create_model",
           "from_pretrained", "fuse", "get_model_info", "get_weights", "list_models", "list_pretrained",
           "load_model", "load_weights", "read_metadata", "register_token_mixer", "save_pretrained",
           "save_weights"]

"""metaformer: the MetaFormer family of vision models, starting with PoolFormer (Yu et al., CVPR 2022)."""
from .fast import fuse
from .models import (ABLATIONS, MetaFormer, MetaFormerBlock, ModelInfo, Pooling, ablation_spec, build_from_config,
                     count_params, create_model, get_model_info, list_models, register_token_mixer)
from .weights import LoadReport, WeightsError, load_model, load_weights, read_metadata, save_weights

__version__ = "0.1.0"

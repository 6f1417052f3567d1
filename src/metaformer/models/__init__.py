"""The networks: building blocks, token mixers, the MetaFormer network and the variant registry."""
from .layers import GroupNorm1, LayerNorm2d, LayerScale, Mlp
from .metaformer import ClassifierHead, MetaFormer, MetaFormerBlock, MetaFormerStage, count_params
from .mixers import (Attention, DWConv, IdentityMixer, Pooling, PositionEmbedding, RandomMixing, SpatialMlp,
                     TOKEN_MIXERS, register_token_mixer)
from .registry import (ABLATIONS, ModelInfo, ablation_spec, build_from_config, create_model, get_model_info,
                       list_models)

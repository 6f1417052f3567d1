"""The networks: building blocks, token mixers, the MetaFormer network and its backbone wrapper.

No I/O, and nothing of this package's upper layers (weights, zoo, data, training, tools, CLI)."""
from .features import MetaFormerFeatures
from .layers import ACTIVATIONS, NORMS, Mlp, Scale, SquaredReLU, StarReLU
from .metaformer import MetaFormer, MetaFormerBlock, MetaFormerStage, NormPoolHead, PoolNormHead, count_params
from .mixers import (Attention, DWConv, IdentityMixer, Pooling, PositionEmbedding, RandomMixing, SepConv, SpatialMlp,
                     TOKEN_MIXERS, register_token_mixer)

__all__ = ["ACTIVATIONS", "Attention", "DWConv", "IdentityMixer", "MetaFormer", "MetaFormerBlock", "MetaFormerFeatures",
           "MetaFormerStage", "Mlp", "NORMS", "NormPoolHead", "PoolNormHead", "Pooling", "PositionEmbedding",
           "RandomMixing", "Scale", "SepConv", "SpatialMlp", "SquaredReLU", "StarReLU", "TOKEN_MIXERS", "count_params",
           "register_token_mixer"]

"""Token mixers: the one part of a MetaFormer block the papers leave abstract.

A token mixer maps ``[B, C, H, W] -> [B, C, H, W]``. Built-in mixers are registered by
name; a user's own class plugs in either by passing the class itself as ``token_mixers=``
or by registering it with :func:`register_token_mixer` (then it can be saved in a config).

The network calls a mixer as ``cls(dim, **options)`` and passes only the options the
constructor accepts, among: ``size`` (the token grid ``(H, W)`` this stage sees at the
model's ``img_size``), ``pool_size``, ``subtract``, ``head_dim``, and whatever the model's
``mixer_kwargs`` hold (e.g. ``proj_bias=False`` for the Baselines' attention).
"""
import inspect
from typing import Callable, Dict, Tuple, Type, Union

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.models.metaformer import Attention as _TimmAttention
from timm.models.metaformer import SepConv
from torch import nn

from ..errors import ConfigError
from .layers import eager

__all__ = ["TOKEN_MIXERS", "register_token_mixer", "resolve_token_mixer", "build_token_mixer", "Pooling",
           "IdentityMixer", "DWConv", "RandomMixing", "SpatialMlp", "Attention", "SepConv", "PositionEmbedding",
           "check_token_grid"]

TOKEN_MIXERS: Dict[str, Type[nn.Module]] = {}


def register_token_mixer(name: str):
    """Class decorator: make a mixer available by name (``token_mixers='name'``). The class itself is left
    as it is (timm's ``SepConv`` is registered too, and must stay timm's)."""

    def wrap(cls):
        TOKEN_MIXERS[name] = cls
        return cls

    return wrap


def resolve_token_mixer(mixer: Union[str, Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    if callable(mixer):
        return mixer
    try:
        return TOKEN_MIXERS[mixer.lower()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown token mixer {mixer!r}; choose one of {sorted(TOKEN_MIXERS)}, "
                          "pass an nn.Module class, or register yours with "
                          "metaformer.register_token_mixer") from None


def build_token_mixer(factory: Callable[..., nn.Module], dim: int, **options) -> nn.Module:
    """Call ``factory(dim, **options)`` keeping only the options its signature accepts."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return factory(dim)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(dim, **options)
    return factory(dim, **{k: v for k, v in options.items() if k in params})


def check_token_grid(x: torch.Tensor, size: Tuple[int, int], owner: str) -> None:
    """A clear error when a part sized for one token grid gets another (eager calls only)."""
    if x.shape[-2] != size[0] or x.shape[-1] != size[1]:
        raise ValueError(
            f"{owner} has parameters for a {size[0]}x{size[1]} token grid but got {x.shape[-2]}x{x.shape[-1]}; "
            f"build the model for this input size: create_model(..., img_size=<height or (height, width)>)")


@register_token_mixer("pooling")
class Pooling(nn.Module):
    """PoolFormer's mixer: ``AvgPool(x) - x`` (no parameters).

    ``count_include_pad=False`` makes border tokens average over their real neighbours only,
    so a constant map stays constant (the fused path relies on this). The ``- x`` cancels the
    block's own residual: the block then computes ``x + alpha * (pool(x) - x)``, a
    Laplacian-like smoothing step. ``subtract=False`` is the paper authors' "pool only"
    variant (slightly worse).
    """

    def __init__(self, dim: int, pool_size: int = 3, subtract: bool = True):
        super().__init__()
        if pool_size % 2 != 1:
            raise ConfigError(f"pool_size must be odd so the output keeps the input size, got {pool_size}")
        self.pool_size = pool_size
        self.subtract = subtract
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x)
        return y - x if self.subtract else y

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, subtract={self.subtract}"


@register_token_mixer("identity")
class IdentityMixer(nn.Identity):
    """No token mixing at all (PoolFormer ablation: 74.3%; IdentityFormer, the Baselines' lower bound)."""

    def __init__(self, dim: int):
        super().__init__()


@register_token_mixer("dwconv")
class DWConv(nn.Module):
    """Depthwise convolution (paper ablation: 78.1%, a learned version of the pooling stencil)."""

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, pool_size, padding=pool_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@register_token_mixer("random")
class RandomMixing(nn.Module):
    """A frozen random token-mixing matrix with softmax rows (PoolFormer ablation 75.8%; RandFormer).

    The matrix is a persistent buffer: not trained, not decayed, but saved with the weights
    so a checkpoint reproduces its model (the authors' releases carry it under the same key).
    It is built for the token grid of the model's ``img_size``, at any size (the authors'
    code only at 224); another grid is an error naming the size to build for.
    """

    def __init__(self, dim: int, size: Tuple[int, int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        n = self.size[0] * self.size[1]
        self.register_buffer("random_matrix", torch.softmax(torch.rand(n, n), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # never compiled: eager calls only
            if eager():
                check_token_grid(x, self.size, "RandomMixing")
        b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        y = torch.matmul(x.reshape(b, c, h * w), self.random_matrix.t())
        return y.reshape(b, c, h, w)


@register_token_mixer("spatial_mlp")
class SpatialMlp(nn.Module):
    """A fully connected layer across tokens, shared by channels (the paper's "SpatialFC" hybrids).

    Weights ``[N, N]`` for ``N = H*W`` tokens, no bias, as in the authors' ``SpatialFc``.
    """

    def __init__(self, dim: int, size: Tuple[int, int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        n = self.size[0] * self.size[1]
        self.proj = nn.Linear(n, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # never compiled: eager calls only
            if eager():
                check_token_grid(x, self.size, "SpatialMlp")
        b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        return self.proj(x.reshape(b, c, h * w)).reshape(b, c, h, w)


@register_token_mixer("attention")
class Attention(_TimmAttention):
    """Multi-head self-attention over all tokens of the stage (head_dim 32, no qkv bias).

    timm's port of the authors' attention, on ``[B, C, H, W]``. ``proj_bias``: the PoolFormer
    hybrids' projection has a bias (True, the default here); the Baselines' CAFormer has none
    (``mixer_kwargs={'proj_bias': False}``). No position embedding inside: the hybrids add one
    before their first attention stage (:class:`PositionEmbedding`), CAFormer none.
    """

    def __init__(self, dim: int, head_dim: int = 32, qkv_bias: bool = False, proj_bias: bool = True):
        if dim % head_dim:
            raise ConfigError(f"attention needs dim divisible by head_dim, got dim={dim}, head_dim={head_dim}")
        super().__init__(dim, head_dim=head_dim, qkv_bias=qkv_bias, proj_bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm's forward on tokens, restated on [B, C, H, W] (TorchScript has no super() calls)
        b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        n = h * w
        tokens = x.flatten(2).transpose(1, 2)  # row-major, as the authors' reshape(B, H*W, C)
        qkv = self.qkv(tokens).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        y = self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, self.attention_dim)))
        return y.transpose(1, 2).reshape(b, c, h, w)


# The Baselines' ConvFormer/CAFormer mixer: timm's port has the authors' math (pointwise 2x expansion,
# StarReLU, depthwise 7x7, pointwise back, no biases) with 1x1 convs instead of Linear layers.
register_token_mixer("sepconv")(SepConv)


@register_notrace_module  # a leaf for FX: its resize is a Python branch on the input's size
class PositionEmbedding(nn.Module):
    """Learnable absolute position embedding added before the first attention stage of the hybrids.

    Stored for the token grid of ``img_size``; other input sizes get a bicubic resize, so
    attention hybrids are not tied to 224.
    """

    def __init__(self, dim: int, size: Tuple[int, int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.pos = nn.Parameter(torch.zeros(1, dim, self.size[0], self.size[1]))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos
        if x.shape[-2] != self.size[0] or x.shape[-1] != self.size[1]:
            pos = F.interpolate(pos, size=(x.shape[-2], x.shape[-1]), mode="bicubic", align_corners=False)
        return x + pos.to(x.dtype)

"""Token mixers: the one part of a MetaFormer block the paper leaves abstract.

A token mixer maps ``[B, C, H, W] -> [B, C, H, W]``. Built-in mixers are registered by
name; a user's own class plugs in either by passing the class itself as ``token_mixers=``
or by registering it with :func:`register_token_mixer` (then it can be saved in a config).

The network calls a mixer as ``cls(dim, **options)`` and passes only the options the
constructor accepts, among: ``size`` (the token grid ``(H, W)`` this stage sees at the
model's ``img_size``), ``pool_size``, ``subtract``, ``head_dim``.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

TOKEN_MIXERS: dict[str, type[nn.Module]] = {}


def register_token_mixer(name: str):
    """Class decorator: make a mixer available by name (``token_mixers='name'``)."""

    def wrap(cls):
        TOKEN_MIXERS[name] = cls
        cls.mixer_name = name
        return cls

    return wrap


def resolve_token_mixer(mixer: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if callable(mixer):
        return mixer
    try:
        return TOKEN_MIXERS[mixer.lower()]
    except KeyError:
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


def _check_size(module: nn.Module, x: torch.Tensor) -> None:
    if tuple(x.shape[-2:]) != tuple(module.size):
        raise ValueError(
            f"{type(module).__name__} has parameters for a {module.size[0]}x{module.size[1]} token "
            f"grid but got {x.shape[-2]}x{x.shape[-1]}; rebuild the model for this input with "
            f"create_model(..., img_size=<height or (height, width)>)")


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
    """No token mixing at all (paper ablation: 74.3%)."""

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
    """A frozen random token-mixing matrix with softmax rows (paper ablation: 75.8%).

    The matrix is a persistent buffer: not trained, not decayed, but saved with the weights
    so a checkpoint reproduces its model. Its size ties the model to one token grid.
    """

    def __init__(self, dim: int, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)
        n = self.size[0] * self.size[1]
        self.register_buffer("random_matrix", torch.softmax(torch.rand(n, n), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(self, x)
        b, c, h, w = x.shape
        y = torch.matmul(x.reshape(b, c, h * w), self.random_matrix.t())
        return y.reshape(b, c, h, w)


@register_token_mixer("spatial_mlp")
class SpatialMlp(nn.Module):
    """A fully connected layer across tokens, shared by channels (the paper's "SpatialFC" hybrids).

    Weights ``[N, N]`` for ``N = H*W`` tokens, no bias, as in the authors' ``SpatialFc``.
    """

    def __init__(self, dim: int, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)
        n = self.size[0] * self.size[1]
        self.proj = nn.Linear(n, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_size(self, x)
        b, c, h, w = x.shape
        return self.proj(x.reshape(b, c, h * w)).reshape(b, c, h, w)


@register_token_mixer("attention")
class Attention(nn.Module):
    """Multi-head self-attention over all tokens of the stage (head_dim 32, no qkv bias)."""

    def __init__(self, dim: int, head_dim: int = 32, qkv_bias: bool = False):
        super().__init__()
        if dim % head_dim:
            raise ConfigError(f"attention needs dim divisible by head_dim, got dim={dim}, head_dim={head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        tokens = x.flatten(2).transpose(1, 2)  # B N C
        qkv = self.qkv(tokens).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # B heads N d
        y = self.proj(y.transpose(1, 2).reshape(b, n, c))
        return y.transpose(1, 2).reshape(b, c, h, w)


class PositionEmbedding(nn.Module):
    """Learnable absolute position embedding added before the first attention stage.

    Stored for the token grid of ``img_size``; other input sizes get a bicubic resize, so
    attention hybrids are not tied to 224.
    """

    def __init__(self, dim: int, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)
        self.pos = nn.Parameter(torch.zeros(1, dim, *self.size))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos
        if tuple(x.shape[-2:]) != self.size:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return x + pos.to(x.dtype)

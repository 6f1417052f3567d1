"""Small building blocks of a MetaFormer: norms, activations, LayerScale, DropPath, channel MLP.

Every tensor here is ``[B, C, H, W]`` (the layout of the authors' code and checkpoints).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class GroupNorm1(nn.GroupNorm):
    """The paper's Modified Layer Norm (MLN): statistics over (C, H, W) per sample, affine per channel.

    This is ``GroupNorm`` with one group, NOT a channel-only LayerNorm: the mean and variance
    also run over the tokens, which the paper's ablation shows is better (77.2 vs 76.5).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)


class LayerNorm2d(nn.LayerNorm):
    """Channel-only LayerNorm on ``[B, C, H, W]`` (each token normalised over its C values).

    The authors' ``LayerNormChannel``; used by their attention hybrids and the "LN" ablation.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(num_channels, eps=eps)


class NoNorm(nn.Identity):
    """The "no normalisation" ablation (46.1% in the paper)."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()


NORMS: dict[str, type[nn.Module]] = {
    "mln": GroupNorm1,
    "gn1": GroupNorm1,
    "ln": LayerNorm2d,
    "bn": BatchNorm2d,
    "none": NoNorm,
}

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def resolve_norm(norm: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if callable(norm):
        return norm
    try:
        return NORMS[norm.lower()]
    except KeyError:
        raise ConfigError(f"unknown norm {norm!r}; choose one of {sorted(NORMS)} or pass a class "
                         "taking (num_channels)") from None


def resolve_act(act: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if callable(act):
        return act
    try:
        return ACTIVATIONS[act.lower()]
    except KeyError:
        raise ConfigError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)} "
                         "or pass an nn.Module class") from None


class LayerScale(nn.Module):
    """Per-channel learnable scale (CaiT), initialised small so each block starts near identity."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class Mlp(nn.Module):
    """Channel MLP: fc1 -> act -> fc2, as 1x1 convolutions (the authors' layout: weights [4C, C, 1, 1])."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Callable[..., nn.Module] = nn.GELU,
                 drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))

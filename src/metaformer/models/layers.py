"""Small building blocks of a MetaFormer: norms, activations, scales, the channel MLP.

Every tensor here is ``[B, C, H, W]``. Where timm's layer has the same math and the same
state-dict keys as the papers' code, it is used as it is (``GroupNorm1``, ``LayerNorm2d``,
``DropPath``, ``Mlp``, and from the MetaFormer Baselines port ``Scale``, ``StarReLU``,
``SquaredReLU`` and the bias-free norms); what is ours differs from every timm layer in a way
the papers ask for (the default eps of each norm, the "no norm" ablation, an eager-only check).
"""
from functools import partial
from typing import Callable, Dict, Optional, Type, Union

import torch
from timm.layers import DropPath, GroupNorm1, LayerNorm2d, Mlp
from timm.models.metaformer import GroupNorm1NoBias, LayerNorm2dNoBias, Scale, SquaredReLU, StarReLU
from torch import nn

from ..errors import ConfigError

__all__ = ["NORMS", "NORM_EPS", "ACTIVATIONS", "BatchNorm2d", "NoNorm", "DropPath", "GroupNorm1", "GroupNorm1NoBias",
           "LayerNorm2d", "LayerNorm2dNoBias", "Mlp", "Scale", "SquaredReLU", "StarReLU", "resolve_norm",
           "resolve_act", "norm_factory", "eager"]


def BatchNorm2d(num_channels: int, eps: float = 1e-5, **kwargs) -> nn.BatchNorm2d:  # noqa: N802 (a norm class's name)
    """The paper's "BN" ablation (76.4%). A plain ``nn.BatchNorm2d`` (not a subclass), so torch.fx keeps
    it a leaf instead of tracing into its Python shape checks."""
    return nn.BatchNorm2d(num_channels, eps=eps, **kwargs)


class NoNorm(nn.Identity):
    """The "no normalisation" ablation (46.1% in the paper)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, **kwargs):
        super().__init__()


# The papers' norms by name. "mln" is the paper's Modified LayerNorm: GroupNorm with one group,
# statistics over (C, H, W) per sample, NOT a channel-only LayerNorm (its "LN" ablation, 77.2 vs
# 76.5). The "_nobias" forms are MetaFormer Baselines' (weight, no bias).
NORMS: Dict[str, Type[nn.Module]] = {
    "mln": GroupNorm1,
    "gn1": GroupNorm1,
    "mln_nobias": GroupNorm1NoBias,
    "ln": LayerNorm2d,
    "ln_nobias": LayerNorm2dNoBias,
    "bn": BatchNorm2d,
    "none": NoNorm,
}
# Each paper's own eps: PoolFormer's GroupNorm and LayerNormChannel use PyTorch's 1e-5, the
# Baselines' bias-free norms 1e-6 (timm's LayerNorm2d would otherwise default to 1e-6 for "ln").
NORM_EPS: Dict[str, float] = {"mln": 1e-5, "gn1": 1e-5, "mln_nobias": 1e-6, "ln": 1e-5, "ln_nobias": 1e-6,
                              "bn": 1e-5, "none": 1e-5}

ACTIVATIONS: Dict[str, Type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "starrelu": StarReLU,  # s * relu(x)^2 + b, the Baselines' MLP activation
    "squaredrelu": SquaredReLU,  # relu(x)^2, in their MLP head
}


def resolve_norm(norm: Union[str, Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    if callable(norm):
        return norm
    try:
        return NORMS[norm.lower()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown norm {norm!r}; choose one of {sorted(NORMS)} or pass a class "
                          "taking (num_channels)") from None


def norm_factory(spec: Union[str, Callable[..., nn.Module]], eps: Optional[float] = None) -> Callable[..., nn.Module]:
    """``(dim, **kwargs) -> norm module`` for a norm name (built with its paper's eps unless ``eps`` is given) or class."""
    cls = resolve_norm(spec)
    if eps is None and isinstance(spec, str):
        eps = NORM_EPS[spec.lower()]
    return cls if eps is None else partial(cls, eps=eps)


def resolve_act(act: Union[str, Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    if callable(act):
        return act
    try:
        return ACTIVATIONS[act.lower()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)} "
                          "or pass an nn.Module class") from None


def eager() -> bool:
    """True in plain eager PyTorch; False while scripting, tracing (jit or FX) or compiling.

    Input checks run only eagerly, inside ``if not torch.jit.is_scripting(): if eager():``: they give
    a clear message to a person calling the model, and never appear in an exported graph (where a
    data-dependent Python ``if`` breaks FX tracing and TorchScript compiles no f-strings)."""
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing

    return not (torch.jit.is_tracing() or is_fx_symbolic_tracing() or torch.compiler.is_compiling())

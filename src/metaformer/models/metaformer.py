"""The MetaFormer network (Yu et al., CVPR 2022), with every part pluggable per stage.

Block (paper Eq. 1-3), on ``X`` of shape ``[B, C, H, W]``::

    Y = X + DropPath(LayerScale1 * TokenMixer(Norm1(X)))
    Z = Y + DropPath(LayerScale2 * Mlp(Norm2(Y)))

Network: stem conv (k7 s4 p2) -> 4 stages (strides 4/8/16/32), each but the first opening
with a k3 s2 p1 downsampling conv -> head (the authors' v1 head: norm on the last map,
then global average pooling, then Linear).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .layers import DropPath, LayerScale, Mlp, resolve_act, resolve_norm
from .mixers import PositionEmbedding, build_token_mixer, resolve_token_mixer

# Options that may be given per stage, as a scalar or a list of one value per stage.
PER_STAGE = ("token_mixers", "norm", "act", "mlp_ratios", "layer_scale", "layer_scale_init_value",
             "pool_size", "pos_embed")

MIN_INPUT = 32  # the network downsamples by 32: smaller inputs leave no token in the last stage


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ConfigError(f"expected an int or (height, width), got {x}")
    return x


def per_stage(value: Any, num_stages: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ConfigError(f"{name} has {len(value)} entries but the model has {num_stages} stages")
        return list(value)
    return [value] * num_stages


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_args(depths, dims, opts: dict, num_classes, in_chans, img_size, drop_path_rate, drop_rate) -> None:
    """Reject arguments that would build a broken network, at construction and with the option's name."""
    def positive_ints(name, values):
        if not all(_is_int(v) and v > 0 for v in values):
            raise ConfigError(f"{name} must be positive integers, got {list(values)}")

    if not depths:
        raise ConfigError("depths must list at least one stage")
    positive_ints("depths", depths)
    positive_ints("dims", dims)
    if not (_is_int(in_chans) and in_chans > 0):
        raise ConfigError(f"in_chans must be a positive integer, got {in_chans!r}")
    if not (_is_int(num_classes) and num_classes >= 0):
        raise ConfigError(f"num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}")
    size = [img_size] * 2 if _is_int(img_size) else list(img_size) if isinstance(img_size, (list, tuple)) else None
    if not size or len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        raise ConfigError(f"img_size must be a positive integer or (height, width), got {img_size!r}")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in opts["mlp_ratios"]):
        raise ConfigError(f"mlp_ratios must be positive numbers, got {opts['mlp_ratios']}")
    if not all(_is_int(k) and k > 0 for k in opts["pool_size"]):
        raise ConfigError(f"pool_size must be a positive odd integer, got {opts['pool_size']}")
    for name, rate in (("drop_path_rate", drop_path_rate), ("drop_rate", drop_rate)):
        if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
            raise ConfigError(f"{name} must be in [0, 1), got {rate!r}")


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class MetaFormerBlock(nn.Module):
    def __init__(self, dim: int, token_mixer: nn.Module, norm_layer: Callable[..., nn.Module],
                 act_layer: Callable[..., nn.Module], mlp_ratio: float = 4.0,
                 layer_scale_init_value: float | None = 1e-5, drop_path: float = 0.0,
                 residual: bool = True, use_mlp: bool = True, drop: float = 0.0):
        super().__init__()
        self.residual = residual
        self.use_mlp = use_mlp
        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        ls = layer_scale_init_value is not None
        self.layer_scale1 = LayerScale(dim, layer_scale_init_value) if ls else nn.Identity()
        if use_mlp:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop)
            self.layer_scale2 = LayerScale(dim, layer_scale_init_value) if ls else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.layer_scale1(self.token_mixer(self.norm1(x))))
        x = x + y if self.residual else y
        if self.use_mlp:
            y = self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))
            x = x + y if self.residual else y
        return x


class MetaFormerStage(nn.Module):
    def __init__(self, downsample: nn.Module, pos_embed: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.pos_embed = pos_embed
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(self.downsample(x))
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class Downsample(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ClassifierHead(nn.Module):
    """The authors' v1 head: norm over the last 7x7 map, THEN average pooling, then Linear.

    (timm's port normalises after pooling with a channel LayerNorm; its logits differ.)
    """

    def __init__(self, dim: int, num_classes: int, norm_layer: Callable[..., nn.Module], drop: float = 0.0):
        super().__init__()
        self.norm = norm_layer(dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x).mean((-2, -1))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class MetaFormer(nn.Module):
    """A hierarchical MetaFormer.

    Per-stage options (scalar or a list with one entry per stage): ``token_mixers`` (name or
    class), ``norm`` (``mln``/``ln``/``bn``/``none`` or class), ``act`` (``gelu``/``relu``/``silu``
    or class), ``mlp_ratios``, ``layer_scale`` (on/off), ``layer_scale_init_value``,
    ``pool_size``, ``pos_embed`` (``None``: automatic, before the first attention stage).
    Whole-network options: ``drop_path_rate`` (linear over all blocks), ``residual`` and
    ``use_mlp`` (ablation switches), ``pool_subtract``, ``head_dim``, ``head_norm``,
    ``img_size`` (the size that sizes token-count-bound parts), ``features_only`` /
    ``out_indices`` (a backbone returning one normed map per stage).
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (64, 128, 320, 512),
        token_mixers: Any = "pooling",
        norm: Any = "mln",
        act: Any = "gelu",
        mlp_ratios: Any = 4,
        layer_scale: Any = True,
        layer_scale_init_value: Any = 1e-5,
        pool_size: Any = 3,
        pos_embed: Any = None,
        pool_subtract: bool = True,
        head_dim: int = 32,
        norm_eps: float | None = None,
        head_norm: Any = None,
        residual: bool = True,
        use_mlp: bool = True,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | Sequence[int] = 224,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
    ):
        # The model owns its config (as nanoGPT's GPT(config)): every argument, as given, so any
        # MetaFormer can be saved and rebuilt exactly; reset_classifier keeps it up to date.
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in locals().items()
                  if k not in ("self", "__class__")}
        super().__init__()
        self.config = config
        self.num_stages = n = len(depths)
        if len(dims) != n:
            raise ConfigError(f"depths has {n} stages but dims has {len(dims)}")
        opts = {k: per_stage(v, n, k) for k, v in dict(
            token_mixers=token_mixers, norm=norm, act=act, mlp_ratios=mlp_ratios, layer_scale=layer_scale,
            layer_scale_init_value=layer_scale_init_value, pool_size=pool_size, pos_embed=pos_embed).items()}
        _check_args(depths, dims, opts, num_classes, in_chans, img_size, drop_path_rate, drop_rate)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.dims = list(dims)
        self.depths = list(depths)
        self.num_features = self.dims[-1]
        self.features_only = features_only
        self.grad_checkpointing = False

        def norm_factory(spec):
            cls = resolve_norm(spec)
            return (lambda d: cls(d, eps=norm_eps)) if norm_eps is not None else cls

        mixers = [resolve_token_mixer(m) for m in opts["token_mixers"]]
        pos = opts["pos_embed"]
        if all(p is None for p in pos):  # automatic: before the first attention stage, as in the paper
            first_attn = next((i for i, m in enumerate(mixers) if getattr(m, "mixer_name", "") == "attention"), None)
            pos = [i == first_attn for i in range(n)]

        size = [conv_out(s, 7, 4, 2) for s in self.img_size]
        self.stem = Downsample(in_chans, dims[0], 7, 4, 2)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear over ALL blocks
        stages, feature_info, cursor, reduction = [], [], 0, 4
        for i in range(n):
            if i > 0:
                downsample = Downsample(dims[i - 1], dims[i], 3, 2, 1)
                size = [conv_out(s, 3, 2, 1) for s in size]
                reduction *= 2
            else:
                downsample = nn.Identity()
            norm_layer = norm_factory(opts["norm"][i])
            ls_init = opts["layer_scale_init_value"][i] if opts["layer_scale"][i] else None
            blocks = []
            for j in range(depths[i]):
                mixer = build_token_mixer(mixers[i], dims[i], size=tuple(size), pool_size=opts["pool_size"][i],
                                          subtract=pool_subtract, head_dim=head_dim)
                blocks.append(MetaFormerBlock(
                    dims[i], mixer, norm_layer, resolve_act(opts["act"][i]), opts["mlp_ratios"][i], ls_init,
                    dpr[cursor + j], residual=residual, use_mlp=use_mlp, drop=drop_rate))
            cursor += depths[i]
            pe = PositionEmbedding(dims[i], tuple(size)) if pos[i] else nn.Identity()
            stages.append(MetaFormerStage(downsample, pe, blocks))
            feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.token_grid = tuple(size)  # the last stage's grid at img_size

        last_norm = norm_factory(head_norm if head_norm is not None else opts["norm"][-1])
        if features_only:
            self.out_indices = tuple(i % n for i in out_indices)
            self.feature_info = [feature_info[i] for i in self.out_indices]
            # One new norm per output, as in the authors' detection/segmentation backbones.
            self.feature_norms = nn.ModuleList(norm_factory(opts["norm"][i])(dims[i]) for i in self.out_indices)
        else:
            self.out_indices = tuple(range(n))
            self.feature_info = feature_info
            self.head = ClassifierHead(dims[-1], num_classes, last_norm, drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the authors: Linear layers and the MLP's 1x1 convs trunc_normal(.02), zero bias;
        # the stem, downsampling and depthwise convs keep PyTorch's default init.
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----- the timm-style surface -----
    def no_weight_decay(self) -> set[str]:
        """Names of parameters AdamW should not decay: biases, norms, layer scales, position embeddings."""
        skip = set()
        for name, p in self.named_parameters():
            if p.ndim <= 1 or name.endswith(".pos") or ".layer_scale" in name:
                skip.add(name)
        return skip

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        if self.features_only:
            raise RuntimeError("a features_only model has no classifier")
        if not (_is_int(num_classes) and num_classes >= 0):
            raise ConfigError(f"num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}")
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head.fc)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape [B, {self.in_chans}, H, W], got {list(x.shape)}")
        if x.shape[-2] < MIN_INPUT or x.shape[-1] < MIN_INPUT:
            raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is too small: MetaFormer downsamples by 32, "
                             f"so height and width must be at least {MIN_INPUT}")

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's raw output (no extra norm), for every stage."""
        self._check_input(x)
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            feats = self.forward_intermediates(x)
            return [norm(feats[i]) for norm, i in zip(self.feature_norms, self.out_indices)]
        return self.forward_head(self.forward_features(x))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

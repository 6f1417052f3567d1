"""The MetaFormer network, with every part pluggable per stage: PoolFormer (Yu et al., CVPR 2022)
and the MetaFormer Baselines (IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer;
Yu et al., TPAMI 2024) are configurations of this one class.

Block (the papers' Eq. 1-3), on ``X`` of shape ``[B, C, H, W]``::

    Y = ResScale1 * X + DropPath(LayerScale1 * TokenMixer(Norm1(X)))
    Z = ResScale2 * Y + DropPath(LayerScale2 * Mlp(Norm2(Y)))

PoolFormer uses LayerScale and no ResScale; the Baselines use ResScale (init 1) in stages 3-4
and no LayerScale. Network: stem conv k7 s4 p2 (the Baselines add a norm after it) -> 4
stages (strides 4/8/16/32), each but the first opening with a k3 s2 p1 conv (the Baselines
with a norm before it) -> head. Two heads: PoolFormer's (``head_style='norm_pool'``: norm on
the last map, then global average pooling, then Linear) and the Baselines' (``'pool_norm'``:
pooling, then LayerNorm, then Linear or an MLP head).

The timm surface is kept (``forward_features``, ``forward_head``, ``forward_intermediates``,
``prune_intermediate_layers``, ``reset_classifier``, ``feature_info``, ``pretrained_cfg``...),
and the model scripts, FX-traces and exports. The model owns its config: ``model.config``
holds every constructor argument, so any MetaFormer can be saved and rebuilt exactly.
"""
# No `from __future__ import annotations` here: torch.fx writes annotations into generated code
# that TorchScript must then resolve (timm's FX + TorchScript check).
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models.metaformer import Downsampling, MlpHead, Stem
from torch import nn
from torch.jit import Final

from ..errors import ConfigError
from .layers import DropPath, Mlp, Scale, eager, norm_factory, resolve_act
from .mixers import Attention, PositionEmbedding, RandomMixing, SpatialMlp, build_token_mixer, resolve_token_mixer

# Options that may be given per stage, as a scalar or a list of one value per stage.
PER_STAGE = ("token_mixers", "norm", "act", "mlp_ratios", "layer_scale", "layer_scale_init_value",
             "res_scale_init_value", "pool_size", "pos_embed")

MIN_INPUT = 32  # the network downsamples by 32: smaller inputs leave no token in the last stage
SIZE_BOUND = (RandomMixing, SpatialMlp)  # token mixers sized for one token grid: they fix the input size
HEAD_STYLES = ("norm_pool", "pool_norm")


def per_stage(value: Any, num_stages: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ConfigError(f"{name} has {len(value)} entries but the model has {num_stages} stages")
        return list(value)
    return [value] * num_stages


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def token_grids(img_size: Union[int, Sequence[int]], num_stages: int) -> List[Tuple[int, int]]:
    """Each stage's token grid (height, width) for an input of ``img_size``: the stem's 7x7 stride-4 conv (padding
    2), then a 3x3 stride-2 downsampling (padding 1) before every later stage."""
    size = tuple(conv_out(s, 7, 4, 2) for s in to_2tuple(img_size))
    grids = [size]
    for _ in range(num_stages - 1):
        size = tuple(conv_out(s, 3, 2, 1) for s in size)
        grids.append(size)
    return grids


def make_pretrained_cfg(in_chans: int, img_size: Union[int, Sequence[int]], num_classes: int,
                        token_grid: Sequence[int], fixed_input_size: bool, classifier: str, v1_head: bool,
                        weights: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` of a MetaFormer, the one place it is written (for a model as built, see
    :meth:`MetaFormer.describe`, and for timm's registry, see :func:`describe_config`): the network's input size,
    smallest input, last token grid, classes, first conv and classifier; the ImageNet eval preprocessing of the
    authors' heads (crop 0.9 for PoolFormer v1's, 1.0 for the Baselines'); then ``weights``, the entries of the
    weights it is described with (their tag and sources, preprocessing, license, paper), replacing those."""
    cfg = {
        "input_size": (in_chans, *to_2tuple(img_size)), "fixed_input_size": fixed_input_size,
        "min_input_size": (in_chans, MIN_INPUT, MIN_INPUT), "pool_size": tuple(token_grid),
        "crop_pct": 0.9 if v1_head else 1.0, "crop_mode": "center",
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "num_classes": num_classes, "first_conv": "stem.conv", "classifier": classifier,
    }
    cfg.update(weights or {})
    return cfg


def describe_config(config: Dict[str, Any], weights: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What :meth:`MetaFormer.describe` says of the network ``config`` builds, read off the config without
    building it (timm's registry holds one per architecture and tag; building each would cost seconds)."""
    n = len(config["depths"])
    mixers = [resolve_token_mixer(m) for m in per_stage(config.get("token_mixers", "pooling"), n, "token_mixers")]
    img_size = config.get("img_size", 224)
    num_classes = config.get("num_classes", 1000)
    v1_head = config.get("head_style", "norm_pool") == "norm_pool"
    mlp_head = not v1_head and config.get("mlp_head") and num_classes > 0  # as PoolNormHead.classifier builds it
    return make_pretrained_cfg(config.get("in_chans", 3), img_size, num_classes, token_grids(img_size, n)[-1],
                               any(isinstance(m, type) and issubclass(m, SIZE_BOUND) for m in mixers),
                               "head.fc.fc2" if mlp_head else "head.fc", v1_head, weights)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_args(depths, dims, opts: dict, num_classes, in_chans, img_size, drop_path_rate, drop_rate,
                head_dropout, head_style, global_pool) -> None:
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
    for name, rate in (("drop_path_rate", drop_path_rate), ("drop_rate", drop_rate), ("head_dropout", head_dropout)):
        if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
            raise ConfigError(f"{name} must be in [0, 1), got {rate!r}")
    if head_style not in HEAD_STYLES:
        raise ConfigError(f"head_style must be one of {HEAD_STYLES}, got {head_style!r}")
    if global_pool not in ("avg", ""):
        raise ConfigError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")


def check_image_input(x: torch.Tensor, in_chans: int) -> None:
    """A clear error for an input the network cannot take (eager calls only, see ``layers.eager``)."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected images of shape [B, {in_chans}, H, W], got {list(x.shape)}")
    if x.shape[-2] < MIN_INPUT or x.shape[-1] < MIN_INPUT:
        raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is too small: MetaFormer downsamples by 32, "
                         f"so height and width must be at least {MIN_INPUT}")


class MetaFormerBlock(nn.Module):
    residual: Final[bool]
    mixer_residual: Final[bool]
    use_mlp: Final[bool]

    def __init__(self, dim: int, token_mixer: nn.Module, norm_layer, act_layer, mlp_ratio: float = 4.0,
                 mlp_bias: bool = True, layer_scale_init_value: Optional[float] = 1e-5,
                 res_scale_init_value: Optional[float] = None, drop_path: float = 0.0, residual: bool = True,
                 use_mlp: bool = True, drop: float = 0.0, mixer_residual: bool = True):
        super().__init__()
        self.residual = residual
        # mixer_residual=False (an ablation): the token mixer's output replaces its input, so
        # x + pool(norm(x)) - norm(x) becomes pool(norm(x)). There is no skip for LayerScale or
        # ResScale to scale towards (LayerScale at 1e-5 would shrink the whole stream) and none
        # for drop path to fall back on, so that sub-layer has neither.
        self.mixer_residual = mixer_residual
        self.use_mlp = use_mlp
        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        ls = layer_scale_init_value is not None
        rs = res_scale_init_value is not None
        scaled1 = mixer_residual or not residual  # residual=False (the paper's row) keeps its scales
        self.layer_scale1 = Scale(dim, layer_scale_init_value) if ls and scaled1 else nn.Identity()
        self.res_scale1 = Scale(dim, res_scale_init_value) if rs and scaled1 else nn.Identity()
        # Without the MLP (an ablation) its parts are parameter-free placeholders, so TorchScript can
        # compile the skipped branch; the state dict is that of a block without them.
        self.norm2 = norm_layer(dim) if use_mlp else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, bias=mlp_bias, drop=drop, use_conv=True) \
            if use_mlp else nn.Identity()
        self.layer_scale2 = Scale(dim, layer_scale_init_value) if ls and use_mlp else nn.Identity()
        self.res_scale2 = Scale(dim, res_scale_init_value) if rs and use_mlp else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual and not self.mixer_residual:
            x = self.token_mixer(self.norm1(x))
        else:
            y = self.drop_path(self.layer_scale1(self.token_mixer(self.norm1(x))))
            x = self.res_scale1(x) + y if self.residual else y
        if self.use_mlp:
            y = self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))
            x = self.res_scale2(x) + y if self.residual else y
        return x


class MetaFormerStage(nn.Module):
    def __init__(self, downsample: nn.Module, pos_embed: nn.Module, blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.pos_embed = pos_embed
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(self.downsample(x))
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class NormPoolHead(nn.Module):
    """PoolFormer's head (the authors' v1): norm over the last map, THEN average pooling, then Linear.

    (timm's PoolFormer v1 normalises after pooling with a channel LayerNorm; its logits differ.)
    With ``pool=False`` (``global_pool=''``) it returns the normed map.
    """

    def __init__(self, dim: int, num_classes: int, norm_layer, drop: float = 0.0, pool: bool = True):
        super().__init__()
        self.pool = pool
        self.norm = norm_layer(dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x)
        if self.pool:
            x = x.mean((-2, -1))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class PoolNormHead(nn.Module):
    """The MetaFormer Baselines' head: average pooling, THEN LayerNorm (eps 1e-6, with bias), then a
    Linear (IdentityFormer, RandFormer, PoolFormerV2) or an MLP head (ConvFormer, CAFormer).

    The MLP head is Linear(C, 4C) -> SquaredReLU -> LayerNorm(4C) -> dropout -> Linear(4C, classes).
    Its LayerNorm eps is the authors' 1e-5 (``nn.LayerNorm``'s default); timm's port uses 1e-6, so
    timm's logits differ from the authors' by ~1e-4 on the same weights. ``head_dropout`` sits
    where the authors put it (inside the MLP head, before its last Linear), or before the Linear.
    """

    def __init__(self, dim: int, num_classes: int, norm_layer, mlp_head: bool = False, head_dropout: float = 0.0,
                 mlp_head_eps: float = 1e-5, pool: bool = True):
        super().__init__()
        self.pool = pool
        self.norm = norm_layer(dim)
        self.mlp_head = mlp_head
        self.head_dropout = head_dropout
        self.mlp_head_eps = mlp_head_eps
        self.drop = nn.Dropout(head_dropout) if head_dropout > 0 and not mlp_head else nn.Identity()
        self.fc = self.classifier(dim, num_classes)

    def classifier(self, dim: int, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if self.mlp_head:
            return MlpHead(dim, num_classes, norm_layer=partial(nn.LayerNorm, eps=self.mlp_head_eps),
                           drop_rate=self.head_dropout)
        return nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool:
            x = self.norm(x.mean((-2, -1), keepdim=True)).flatten(1)
        else:
            x = self.norm(x)
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class MetaFormer(nn.Module):
    """A hierarchical MetaFormer.

    Per-stage options (scalar or a list with one entry per stage): ``token_mixers`` (name or
    class), ``norm`` (``mln``/``mln_nobias``/``ln``/``ln_nobias``/``bn``/``none`` or class),
    ``act`` (MLP activation: ``gelu``/``relu``/``silu``/``starrelu``/``squaredrelu`` or class),
    ``mlp_ratios``, ``layer_scale`` (on/off), ``layer_scale_init_value``,
    ``res_scale_init_value`` (None: no ResScale), ``pool_size``, ``pos_embed`` (``None``:
    automatic, before the first attention stage).

    Whole-network options: ``mixer_kwargs`` (passed to every mixer that takes them),
    ``norm_eps``, ``mlp_bias``, ``stem_norm`` / ``downsample_norm`` (the Baselines' norm after
    the stem and before each downsampling conv), ``head_style`` (``norm_pool`` or
    ``pool_norm``), ``head_norm`` / ``head_norm_eps``, ``mlp_head`` / ``mlp_head_eps`` /
    ``head_dropout``, ``drop_path_rate`` (linear over all blocks), ``drop_rate``, ``residual``,
    ``mixer_residual`` (the token mixer's sub-layer alone without its skip: ``mixer(norm(x))``) and
    ``use_mlp`` (ablation switches), ``pool_subtract``, ``head_dim``, ``img_size`` (the size
    that sizes token-count-bound parts), ``global_pool`` (``''``: the head returns the map),
    ``init_all_convs`` (the Baselines initialise every conv; PoolFormer only the pointwise ones),
    ``feature_norm`` (the new per-stage norm of a ``features_only`` backbone).
    """

    __jit_unused_properties__ = ["fixed_input_size", "classifier_name"]  # descriptions, not forward's

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (64, 128, 320, 512),
        token_mixers: Any = "pooling",
        mixer_kwargs: Optional[Dict[str, Any]] = None,
        norm: Any = "mln",
        norm_eps: Optional[float] = None,
        act: Any = "gelu",
        mlp_ratios: Any = 4,
        mlp_bias: bool = True,
        layer_scale: Any = True,
        layer_scale_init_value: Any = 1e-5,
        res_scale_init_value: Any = None,
        pool_size: Any = 3,
        pos_embed: Any = None,
        pool_subtract: bool = True,
        head_dim: int = 32,
        stem_norm: Any = None,
        downsample_norm: Any = None,
        head_style: str = "norm_pool",
        head_norm: Any = None,
        head_norm_eps: Optional[float] = None,
        mlp_head: bool = False,
        mlp_head_eps: float = 1e-5,
        head_dropout: float = 0.0,
        residual: bool = True,
        mixer_residual: bool = True,
        use_mlp: bool = True,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: Union[int, Sequence[int]] = 224,
        global_pool: str = "avg",
        init_all_convs: bool = False,
        feature_norm: Optional[str] = None,
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
        opts = {k: per_stage(config[k], n, k) for k in PER_STAGE}
        _check_args(depths, dims, opts, num_classes, in_chans, img_size, drop_path_rate, drop_rate, head_dropout,
                    head_style, global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)  # validated above: an int or two ints
        self.dims = list(dims)
        self.depths = list(depths)
        self.num_features = self.head_hidden_size = self.dims[-1]
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.pruned = False
        # What the zoo knows of a model it builds (None for one built directly): its architecture's name, and
        # the names of its classes when a checkpoint stored them.
        self.variant = None
        self.class_names = None

        mixers = [resolve_token_mixer(m) for m in opts["token_mixers"]]
        pos = opts["pos_embed"]
        if all(p is None for p in pos):  # automatic: before the first attention stage, as in the paper
            first_attn = next((i for i, m in enumerate(mixers) if isinstance(m, type) and issubclass(m, Attention)),
                              None)
            pos = [i == first_attn for i in range(n)]

        grids = token_grids(self.img_size, n)
        self.stem = Stem(in_chans, dims[0], norm_layer=norm_factory(stem_norm) if stem_norm else None)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear over ALL blocks
        stages, feature_info, cursor, reduction = [], [], 0, 4
        for i in range(n):
            if i > 0:
                downsample = Downsampling(dims[i - 1], dims[i], 3, 2, 1,
                                          norm_layer=norm_factory(downsample_norm) if downsample_norm else None)
                reduction *= 2
            else:
                downsample = nn.Identity()
            size = grids[i]
            norm_layer = norm_factory(opts["norm"][i], norm_eps)
            ls_init = opts["layer_scale_init_value"][i] if opts["layer_scale"][i] else None
            blocks = []
            for j in range(depths[i]):
                mixer = build_token_mixer(mixers[i], dims[i], size=size, pool_size=opts["pool_size"][i],
                                          subtract=pool_subtract, head_dim=head_dim, **(mixer_kwargs or {}))
                blocks.append(MetaFormerBlock(
                    dims[i], mixer, norm_layer, resolve_act(opts["act"][i]), opts["mlp_ratios"][i], mlp_bias,
                    ls_init, opts["res_scale_init_value"][i], dpr[cursor + j], residual=residual, use_mlp=use_mlp,
                    drop=drop_rate, mixer_residual=mixer_residual))
            cursor += depths[i]
            pe = PositionEmbedding(dims[i], size) if pos[i] else nn.Identity()
            stages.append(MetaFormerStage(downsample, pe, blocks))
            feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.feature_info = feature_info
        self.token_grid = grids[-1]  # the last stage's grid at img_size

        if head_style == "norm_pool":
            last_norm = norm_factory(head_norm if head_norm is not None else opts["norm"][-1],
                                     head_norm_eps if head_norm_eps is not None else norm_eps)
            self.head = NormPoolHead(dims[-1], num_classes, last_norm, drop_rate, pool=global_pool == "avg")
        else:
            self.head = PoolNormHead(dims[-1], num_classes, norm_factory(head_norm or "ln", head_norm_eps), mlp_head,
                                     head_dropout, mlp_head_eps, pool=global_pool == "avg")
        self.init_all_convs = init_all_convs
        self.apply(self._init_weights)
        self.pretrained_cfg = self.default_cfg = self.describe()

    def _init_weights(self, m: nn.Module) -> None:
        # As the authors: Linear layers trunc_normal(.02) with zero bias, and convs: the pointwise ones in
        # PoolFormer (stem, downsampling and depthwise convs keep PyTorch's init), all of them in the Baselines.
        conv = isinstance(m, nn.Conv2d) and (self.init_all_convs or m.kernel_size == (1, 1))
        if isinstance(m, nn.Linear) or conv:
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----- what the model is, as timm describes it -----
    @property
    def fixed_input_size(self) -> bool:
        """Parts sized for one token grid (random mixing, spatial MLP) tie the model to ``img_size``."""
        return any(isinstance(m, SIZE_BOUND) for m in self.modules())

    @property
    def classifier_name(self) -> str:
        return "head.fc.fc2" if isinstance(self.head.fc, MlpHead) else "head.fc"

    def describe(self, weights: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """timm's ``pretrained_cfg`` for this model as built (:func:`make_pretrained_cfg`); ``weights``: the entries
        of the weights it is described with (the zoo's tag, sources and preprocessing)."""
        return make_pretrained_cfg(self.in_chans, self.img_size, self.num_classes, self.token_grid,
                                   self.fixed_input_size, self.classifier_name, isinstance(self.head, NormPoolHead),
                                   weights)

    # ----- the timm-style surface -----
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names of parameters AdamW should not decay: biases, norms, scales, position embeddings."""
        skip = set()
        for name, p in self.named_parameters():
            if p.ndim <= 1 or name.endswith(".pos") or ".layer_scale" in name:
                skip.add(name)
        return skip

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups by depth, for timm's layer-wise lr decay: the stem, then every block (a stage's
        downsampling conv and position embedding go with its first block), then the head."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(?:downsample|pos_embed)", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool=''`` makes the head return the map."""
        if not (_is_int(num_classes) and num_classes >= 0):
            raise ConfigError(f"num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ConfigError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
            self.head.pool = global_pool == "avg"
            self.config["global_pool"] = global_pool
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        if isinstance(self.head, PoolNormHead):
            self.head.fc = self.head.classifier(self.num_features, num_classes)
        else:
            self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.fc.apply(self._init_weights)
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes, classifier=self.classifier_name)
        self.default_cfg = self.pretrained_cfg

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's contract: each requested stage's raw output (``indices``: the last n stages, or a list),
        and the final map unless ``intermediates_only``. ``norm`` is accepted for timm's API: these
        models have no per-stage output norm (a ``features_only`` backbone adds new ones)."""
        assert output_fmt == "NCHW", "MetaFormer outputs NCHW maps"
        if not torch.jit.is_scripting():  # never compiled: eager calls only
            if eager():
                check_image_input(x, self.in_chans)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one ``indices`` asks for (and the head): a lighter backbone."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.pruned = True
        if max_index < self.num_stages - 1:
            self.num_features = self.head_hidden_size = self.dims[max_index]
        if prune_head or max_index < self.num_stages - 1:
            # timm's reset_classifier(0, '', reset_other=True): no pooling, no head norm (it is sized
            # for the last stage), no classifier; forward_head then passes the map through.
            self.num_classes = 0
            self.head.pool = False
            self.head.norm = nn.Identity()
            self.head.drop = nn.Identity()
            self.head.fc = nn.Identity()
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # never compiled: eager calls only
            if eager():
                check_image_input(x, self.in_chans)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

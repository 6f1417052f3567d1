"""The MetaFormer Baselines (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2024): IdentityFormer,
RandFormer, PoolFormerV2, ConvFormer and CAFormer at every size the authors released, with their
weights as tags (timm's tag names) and the figures of the authors' README.

All five families share one design (docs/families.md tabulates what differs from PoolFormer v1):
a stem conv followed by a bias-free channel LayerNorm, downsampling with that norm BEFORE the conv,
bias-free norms (eps 1e-6) and bias-free MLPs with StarReLU, no LayerScale but ResScale (init 1)
in stages 3-4, every conv initialised trunc_normal(.02), and a head that pools, then applies a
LayerNorm, then a Linear (IdentityFormer, RandFormer, PoolFormerV2) or an MLP head (ConvFormer,
CAFormer). The families differ only in their token mixers and block norms.

The MLP head's LayerNorm keeps the authors' eps 1e-5 (``mlp_head_eps``); timm's port uses 1e-6,
so its ConvFormer/CAFormer logits differ from the authors' by ~1e-4 relative on the same
weights (docs/families.md). Each variant's ``drop_path_rate`` (and CAFormer's ``head_dropout``)
is the authors' ImageNet-1K training value, as PoolFormer's variants carry theirs.
"""
from __future__ import annotations

from .registry import ModelInfo, Weights, register

PAPER = "arXiv:2210.13452"
URL = "https://huggingface.co/sail/dl/resolve/main/{family}/{file}.pth"
RECIPE = "https://github.com/sail-sg/metaformer/tree/main/scripts (configs/{config} here)"

# What every family shares: the stem and downsampling norms, bias-free StarReLU MLPs, ResScale in
# stages 3-4 instead of LayerScale, the pool-then-norm head and the authors' init of every conv.
COMMON = dict(act="starrelu", mlp_ratios=4, mlp_bias=False, layer_scale=False, res_scale_init_value=[None, None, 1.0, 1.0],
              stem_norm="ln_nobias", downsample_norm="ln_nobias", head_style="pool_norm", head_norm="ln",
              head_norm_eps=1e-6, init_all_convs=True)

# Block norms: "Modified LayerNorm without bias" (statistics over C, H, W) for the three families
# that ablate the mixer, a channel-only LayerNorm without bias for ConvFormer and CAFormer.
FAMILIES = {
    # family: (token mixers, block norm, MLP head, display name)
    "identityformer": ("identity", "mln_nobias", False, "IdentityFormer"),
    "randformer": (["identity", "identity", "random", "random"], "mln_nobias", False, "RandFormer"),
    "poolformerv2": ("pooling", "mln_nobias", False, "PoolFormerV2"),
    "convformer": ("sepconv", "ln_nobias", True, "ConvFormer"),
    "caformer": (["sepconv", "sepconv", "attention", "attention"], "ln_nobias", True, "CAFormer"),
}

S_DIMS = (64, 128, 320, 512)
M_DIMS = (96, 192, 384, 768)
SMALL_SIZES = {  # IdentityFormer, RandFormer, PoolFormerV2: PoolFormer's five sizes
    "s12": ((2, 2, 6, 2), S_DIMS),
    "s24": ((4, 4, 12, 4), S_DIMS),
    "s36": ((6, 6, 18, 6), S_DIMS),
    "m36": ((6, 6, 18, 6), M_DIMS),
    "m48": ((8, 8, 24, 8), M_DIMS),
}
CONV_SIZES = {  # ConvFormer, CAFormer
    "s18": ((3, 3, 9, 3), S_DIMS),
    "s36": ((3, 12, 18, 3), S_DIMS),
    "m36": ((3, 12, 18, 3), (96, 192, 384, 576)),
    "b36": ((3, 12, 18, 3), (128, 256, 512, 768)),
}


def family_config(family: str, depths, dims, drop_path_rate: float = 0.0, head_dropout: float = 0.0) -> dict:
    """The :class:`~metaformer.MetaFormer` config of one Baselines family at one size."""
    mixers, norm, mlp_head, _ = FAMILIES[family]
    cfg = dict(depths=list(depths), dims=list(dims), token_mixers=mixers, norm=norm, **COMMON, mlp_head=mlp_head,
               drop_path_rate=drop_path_rate)
    if mlp_head:
        cfg.update(mlp_head_eps=1e-5)  # nn.LayerNorm's default in the authors' MlpHead (timm: 1e-6)
    if head_dropout:
        cfg.update(head_dropout=head_dropout)
    if family == "caformer":
        # The Baselines' attention: no qkv or projection bias, and no position embedding anywhere.
        cfg.update(mixer_kwargs={"proj_bias": False}, pos_embed=False)
    return cfg


def _register(family: str, size: str, depths, dims, exact: int, pparams: str, pmacs: float, top1: float,
              dpr: float, weights: tuple, head_dropout: float = 0.0) -> ModelInfo:
    name = f"{family}_{size}"
    display = FAMILIES[family][3]
    return register(ModelInfo(name, family_config(family, depths, dims, dpr, head_dropout),
                              f"{display}-{size.upper()}", exact, pparams, pmacs, top1, family=family, paper=PAPER,
                              weights=weights, defaults=Weights("", crop_pct=1.0)))


# ----- IdentityFormer, RandFormer, PoolFormerV2: one ImageNet-1K checkpoint per size, at 224 -----
# size: (exact params, README params, README GMACs, top-1) per family, and the training drop path.
_SMALL = {
    "identityformer": {
        "s12": (11_891_712, "11.9M", 1.8, 74.6, 0.1), "s24": (21_341_464, "21.3M", 3.4, 78.2, 0.1),
        "s36": (30_791_216, "30.8M", 5.0, 79.3, 0.2), "m36": (56_077_168, "56.1M", 8.8, 80.0, 0.3),
        "m48": (73_346_056, "73.3M", 11.5, 80.4, 0.4)},
    # Exact counts are the trainable parameters; the frozen random matrices come on top ("+0.2M").
    "randformer": {
        "s12": (11_891_712, "11.9+0.2M", 1.9, 76.6, 0.1), "s24": (21_341_464, "21.3+0.5M", 3.5, 78.2, 0.1),
        "s36": (30_791_216, "30.8+0.7M", 5.2, 79.5, 0.2), "m36": (56_077_168, "56.1+0.7M", 9.0, 81.2, 0.3),
        "m48": (73_346_056, "73.3+0.9M", 11.9, 81.4, 0.3)},
    "poolformerv2": {
        "s12": (11_891_712, "11.9M", 1.8, 78.0, 0.1), "s24": (21_341_464, "21.3M", 3.4, 80.7, 0.1),
        "s36": (30_791_216, "30.8M", 5.0, 81.6, 0.2), "m36": (56_077_168, "56.1M", 8.8, 82.2, 0.3),
        "m48": (73_346_056, "73.3M", 11.5, 82.6, 0.4)},
}
for _family, _rows in _SMALL.items():
    for _size, (_exact, _pp, _pm, _top1, _dpr) in _rows.items():
        _name = f"{_family}_{_size}"
        _w = Weights("sail_in1k", url=URL.format(family=_family, file=_name),
                     hf_hub_id=f"timm/{_name}.sail_in1k" if _family == "poolformerv2" else None,  # timm has no other
                     crop_pct=1.0, top1=_top1, gmacs=_pm, recipe=RECIPE.format(config=f"{_family}_s12_imagenet.yaml"))
        _register(_family, _size, *SMALL_SIZES[_size], _exact, _pp, _pm, _top1, _dpr, (_w,))


# ----- ConvFormer, CAFormer: ImageNet-1K and ImageNet-21K checkpoints, at 224 and 384 -----
# size: (exact params, README params, GMACs at 224 and 384, top-1: 1K at 224, 1K at 384, 21K->1K at 224,
#        21K->1K at 384), the training drop path and head dropout.
_CONV = {
    "convformer": {
        "s18": (26_774_448, "27M", 3.9, 11.6, (83.0, 84.4, 83.7, 85.0), 0.2, 0.0),
        "s36": (40_012_152, "40M", 7.6, 22.4, (84.1, 85.4, 85.4, 86.4), 0.3, 0.0),
        "m36": (57_051_640, "57M", 12.8, 37.7, (84.5, 85.6, 86.1, 86.9), 0.4, 0.0),
        "b36": (99_882_616, "100M", 22.6, 66.5, (84.8, 85.7, 87.0, 87.6), 0.6, 0.0)},
    "caformer": {
        "s18": (26_341_656, "26M", 4.1, 13.4, (83.6, 85.0, 84.1, 85.4), 0.15, 0.0),
        "s36": (39_297_102, "39M", 8.0, 26.0, (84.5, 85.7, 85.8, 86.9), 0.3, 0.4),
        "m36": (56_204_878, "56M", 13.2, 42.0, (85.2, 86.2, 86.6, 87.5), 0.4, 0.4),
        "b36": (98_753_614, "99M", 23.2, 72.2, (85.5, 86.4, 87.4, 88.1), 0.6, 0.5)},
}
# timm's tag -> (the authors' file suffix, dataset, resolution, index of its top-1 above)
_TAGS = {
    "sail_in1k": ("", "imagenet-1k", 224, 0),
    "sail_in1k_384": ("_384", "imagenet-1k", 384, 1),
    "sail_in22k_ft_in1k": ("_in21ft1k", "imagenet-1k", 224, 2),
    "sail_in22k_ft_in1k_384": ("_384_in21ft1k", "imagenet-1k", 384, 3),
    "sail_in22k": ("_in21k", "imagenet-22k", 224, None),  # 21,841 classes; the authors publish no accuracy
}
for _family, _rows in _CONV.items():
    for _size, (_exact, _pp, _pm, _pm384, _top1s, _dpr, _hd) in _rows.items():
        _name = f"{_family}_{_size}"
        _weights = []
        for _tag, (_suffix, _dataset, _res, _i) in _TAGS.items():
            _config = f"{_family}_s18_imagenet{'_384_finetune' if _res == 384 else ''}.yaml"
            _weights.append(Weights(
                _tag, url=URL.format(family=_family, file=_name + _suffix), hf_hub_id=f"timm/{_name}.{_tag}",
                dataset=_dataset, img_size=_res, crop_pct=1.0, top1=None if _i is None else _top1s[_i],
                gmacs=_pm384 if _res == 384 else _pm, recipe=RECIPE.format(config=_config),
                notes="ImageNet-21K pre-training, fine-tuned on ImageNet-1K" if "22k_ft" in _tag else
                      "ImageNet-21K classifier (21,841 classes)" if _dataset == "imagenet-22k" else ""))
        _register(_family, _size, *CONV_SIZES[_size], _exact, _pp, _pm, _top1s[0], _dpr, tuple(_weights), _hd)

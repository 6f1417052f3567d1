"""PoolFormer (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022): the five
sizes with the authors' released weights, the S12 hybrids of Table 5, and its ablation rows."""
from __future__ import annotations

from .registry import ModelInfo, Weights, register

PAPER = "arXiv:2111.11418"
RELEASE_URL = "https://github.com/sail-sg/poolformer/releases/download/v1.0/{}.pth.tar"
RECIPE = "https://github.com/sail-sg/poolformer#train (configs/poolformer_s12_imagenet.yaml here)"

S12 = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512))
M_DIMS = (96, 192, 384, 768)


def _poolformer(name, depths, dims, ls, dpr, crop, params, pmacs, top1, pparams):
    cfg = dict(depths=list(depths), dims=list(dims), token_mixers="pooling", norm="mln", act="gelu",
               mlp_ratios=4, layer_scale_init_value=ls, drop_path_rate=dpr)
    weights = Weights("sail_in1k", url=RELEASE_URL.format(name), hf_hub_id=f"timm/{name}.sail_in1k", crop_pct=crop,
                      top1=top1, gmacs=pmacs, recipe=RECIPE)
    return register(ModelInfo(name, cfg, f"PoolFormer-{name.split('_')[1].upper()}", params, pparams, pmacs, top1,
                              family="poolformer", paper=PAPER, weights=(weights,)))


_poolformer("poolformer_s12", (2, 2, 6, 2), S12["dims"], 1e-5, 0.1, 0.9, 11_915_176, 1.8, 77.2, "11.9M")
_poolformer("poolformer_s24", (4, 4, 12, 4), S12["dims"], 1e-5, 0.1, 0.9, 21_388_968, 3.4, 80.3, "21.4M")
_poolformer("poolformer_s36", (6, 6, 18, 6), S12["dims"], 1e-6, 0.2, 0.9, 30_862_760, 5.0, 81.4, "30.9M")
_poolformer("poolformer_m36", (6, 6, 18, 6), M_DIMS, 1e-6, 0.3, 0.95, 56_172_520, 8.8, 82.1, "56.2M")
_poolformer("poolformer_m48", (8, 8, 24, 8), M_DIMS, 1e-6, 0.4, 0.95, 73_473_448, 11.6, 82.5, "73.5M")

# The paper's S12 hybrids (Table 5, bottom). Attention hybrids used channel LayerNorm (eps 1e-6)
# throughout and a learnable position embedding before the first attention stage. No weights
# were released for them.
_HYBRIDS = {
    # name: (mixers, norm, eps, params, paper params, paper MACs, top1)
    "pppa": (["pooling", "pooling", "pooling", "attention"], "ln", 1e-6, 14_038_440, "14.0M", 1.9, 78.3),
    "ppaa": (["pooling", "pooling", "attention", "attention"], "ln", 1e-6, 16_535_592, "16.5M", 2.5, 81.0),
    "pppf": (["pooling", "pooling", "pooling", "spatial_mlp"], "mln", None, 11_919_978, "11.9M", 1.8, 77.5),
    "ppff": (["pooling", "pooling", "spatial_mlp", "spatial_mlp"], "mln", None, 12_150_474, "12.2M", 1.9, 77.9),
}
for _code, (_mixers, _norm, _eps, _params, _pp, _pm, _top1) in _HYBRIDS.items():
    _cfg = dict(depths=list(S12["depths"]), dims=list(S12["dims"]), token_mixers=_mixers, norm=_norm, act="gelu",
                mlp_ratios=4, layer_scale_init_value=1e-5, drop_path_rate=0.1)
    if _eps is not None:
        _cfg["norm_eps"] = _eps
    _stages = "".join("A" if m == "attention" else "F" if m == "spatial_mlp" else "P" for m in _mixers)
    register(ModelInfo(f"metaformer_{_code}_s12", _cfg, f"S12 hybrid, stages [{', '.join(_stages)}]", _params, _pp,
                       _pm, _top1, family="poolformer hybrid", paper=PAPER, base="poolformer_s12",
                       overrides={"token_mixers": _mixers}))

# The paper's ablations of PoolFormer-S12 (Table 5): each is S12 plus config overrides.
# name: (overrides, what changed, paper params, paper MACs, paper top-1)
ABLATIONS: dict[str, tuple[dict, str, str, float, float]] = {
    "baseline": ({}, "PoolFormer-S12 (pool 3, MLN, GELU)", "11.9M", 1.8, 77.2),
    "identity": ({"token_mixers": "identity"}, "pooling -> identity", "11.9M", 1.8, 74.3),
    "random": ({"token_mixers": "random"}, "pooling -> frozen random matrix", "11.9M (+21M frozen)", 3.3, 75.8),
    "dwconv": ({"token_mixers": "dwconv"}, "pooling -> depthwise conv", "11.9M", 1.8, 78.1),
    "pool_no_subtract": ({"pool_subtract": False}, "pool(x) instead of pool(x) - x", "11.9M", 1.8, None),
    # The authors' issue tracker asked whether the subtraction AND the skip it cancels can go: the token
    # mixer's sub-layer x + pool(norm(x)) - norm(x) becomes pool(norm(x)) (the MLP keeps its residual).
    "pool_no_residual": ({"pool_subtract": False, "mixer_residual": False},
                         "pool(norm(x)) instead of x + pool(norm(x)) - norm(x)", "11.9M", 1.8, None),
    "pool5": ({"pool_size": 5}, "pool size 3 -> 5", "11.9M", 1.8, 77.2),
    "pool7": ({"pool_size": 7}, "pool size 3 -> 7", "11.9M", 1.8, 77.1),
    "pool9": ({"pool_size": 9}, "pool size 3 -> 9", "11.9M", 1.8, 76.8),
    "ln": ({"norm": "ln"}, "MLN -> LayerNorm (channels)", "11.9M", 1.8, 76.5),
    "bn": ({"norm": "bn"}, "MLN -> BatchNorm", "11.9M", 1.8, 76.4),
    "no_norm": ({"norm": "none"}, "MLN -> no norm", "11.9M", 1.8, 46.1),
    "relu": ({"act": "relu"}, "GELU -> ReLU", "11.9M", 1.8, 76.4),
    "silu": ({"act": "silu"}, "GELU -> SiLU", "11.9M", 1.8, 77.2),
    "no_residual": ({"residual": False}, "no residual connections", "11.9M", 1.8, 0.1),
    "no_mlp": ({"use_mlp": False}, "no channel MLP", "2.5M", 0.2, 5.7),
    "hybrid_pppa": ({"variant": "metaformer_pppa_s12"}, "stages [P, P, P, Attention]", "14.0M", 1.9, 78.3),
    "hybrid_ppaa": ({"variant": "metaformer_ppaa_s12"}, "stages [P, P, Attention, Attention]", "16.5M", 2.5, 81.0),
    "hybrid_pppf": ({"variant": "metaformer_pppf_s12"}, "stages [P, P, P, SpatialFC]", "11.9M", 1.8, 77.5),
    "hybrid_ppff": ({"variant": "metaformer_ppff_s12"}, "stages [P, P, SpatialFC, SpatialFC]", "12.2M", 1.9, 77.9),
    # The MetaFormer Baselines (arXiv:2210.13452; figures from the authors' README, their own recipe): the
    # same question, which mixer, asked with their stem/downsampling norms, StarReLU and ResScale.
    "identityformer": ({"variant": "identityformer_s12"}, "Baselines: IdentityFormer-S12 (identity mixer)",
                       "11.9M", 1.8, 74.6),
    "randformer": ({"variant": "randformer_s12"}, "Baselines: RandFormer-S12 (random mixing in stages 3-4)",
                   "11.9M (+0.2M frozen)", 1.9, 76.6),
    "poolformerv2": ({"variant": "poolformerv2_s12"}, "Baselines: PoolFormerV2-S12 (pooling)", "11.9M", 1.8, 78.0),
    "convformer": ({"variant": "convformer_s18"}, "Baselines: ConvFormer-S18 (separable convs)",
                   "26.8M (README: 27M)", 3.9, 83.0),
    "caformer": ({"variant": "caformer_s18"}, "Baselines: CAFormer-S18 (sepconv x2, attention x2)",
                 "26.3M (README: 26M)", 4.1, 83.6),
}


# Each row is also a model of its own (``metaformer_s12_<row>``, in timm's registry too), so
# ``create_model('metaformer_s12_dwconv')`` builds the paper's depthwise-conv S12.
_S12 = "poolformer_s12"
for _row, (_over, _what, _pp, _pm, _top1) in ABLATIONS.items():
    if _row != "baseline" and "variant" not in _over:
        from .registry import _REGISTRY

        _base = _REGISTRY[_S12]
        register(ModelInfo(f"metaformer_s12_{_row}", {**_base.config, **_over}, f"S12 ablation: {_what}", None, _pp,
                           _pm, _top1, family="poolformer ablation", paper=PAPER, base=_S12, overrides=dict(_over)))


def ablation_spec(row: str, base: str = "poolformer_s12") -> tuple[str, dict]:
    """(variant name, overrides) that build ablation ``row`` (PoolFormer's Table 5, or a family row)."""
    if row not in ABLATIONS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown ablation row {row!r}; rows: {', '.join(ABLATIONS)}")
    overrides = dict(ABLATIONS[row][0])
    variant = overrides.pop("variant", base)
    return variant, overrides

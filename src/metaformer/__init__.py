"""metaformer: the MetaFormer family of vision models (Yu et al., CVPR 2022 and TPAMI 2024), faithful to
the papers and the authors' weights, and a drop-in for timm.

``import metaformer`` itself is light: the names below are imported on first use, so that the command
line's ``--help`` and ``--version`` need neither torch nor timm. It does not import the training,
detection or plotting stack either.

timm's registry (``timm.create_model('metaformer_*')``) gets our models when :mod:`metaformer.zoo` is
imported: by the first use of a model name below, or right away when timm is already imported
(``import timm, metaformer``: timm's import is paid for then).
"""
import importlib
import sys

__version__ = "0.1.0"

# name -> the submodule that defines it
_EXPORTS = {
    "fuse": "fast",
    **dict.fromkeys(["MetaFormer", "MetaFormerBlock", "MetaFormerFeatures", "Pooling", "count_params",
                     "register_token_mixer"], "models"),
    **dict.fromkeys(["from_pretrained", "save_pretrained"], "tools.hub"),
    **dict.fromkeys(["LoadReport", "WeightsError", "read_metadata", "save_weights"], "weights"),
    **dict.fromkeys(["ABLATIONS", "ModelInfo", "Weights", "ablation_spec", "build_from_config", "create_model",
                     "get_model_info", "get_weights", "list_models", "list_pretrained", "load_model",
                     "load_weights"], "zoo"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metaformer' has no attribute {name!r}")
    if module != "zoo":
        importlib.import_module(".zoo", __name__)  # every model-related name implies the registry, in timm's too
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if "timm" in sys.modules:
    from . import zoo  # noqa: E402,F401  (registers our models in timm's registry)

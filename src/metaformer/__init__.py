"""metaformer: the MetaFormer family of vision models (Yu et al., CVPR 2022 and TPAMI 2024), faithful to
the papers and the authors' weights, and a drop-in for timm.

``import metaformer`` itself is light: the names below are imported on first use, so that the command
line's ``--help`` and ``--version`` need neither torch nor timm. It does not import the training,
detection or plotting stack either.

timm's registry (``timm.create_model('metaformer_*')``) gets our models as soon as both timm and metaformer
are imported, in either order: right away when timm already is (``import timm, metaformer``); else when timm
is (``import metaformer, timm``), or by the first use of a model name below. Until then a finder in
``sys.meta_path`` (:class:`_RegisterInTimm`) waits for timm's import; it leaves once our models are registered.
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


def _initializing(module) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


class _RegisterInTimm:  # a meta path finder (importlib.abc's bases cost the import 15 ms)
    """Registers our models in timm's registry (by importing :mod:`metaformer.zoo`) once timm is imported after
    metaformer. It only watches: the modules it sees imported (timm, and ours) are found and executed by the
    finders and loaders that would do it anyway, then it checks whether the time has come. That is when timm
    is imported and none of our modules is still executing: the zoo needs them whole, so when one of ours
    imports timm first (``import metaformer.models``), the registration waits for it to finish."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm" and not name.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:  # what the import would have used without this finder
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader, self)
                return spec
        return None

    def after(self, name: str) -> None:
        """``name`` has just been executed."""
        timm = sys.modules.get("timm")
        if timm is None or (name != "timm" and _initializing(timm)):
            return
        if any(_initializing(m) for n, m in list(sys.modules.items()) if n.startswith(__name__ + ".") and n != name):
            return  # one of ours is half-imported: after it
        try:
            sys.meta_path.remove(self)
        except ValueError:  # already left (another thread)
            pass
        importlib.import_module(".zoo", __name__)  # registers our models in timm's registry


class _ThenRegister:  # a loader
    """The loader of a module, then :meth:`_RegisterInTimm.after`. The module keeps its own loader."""

    def __init__(self, loader, finder: _RegisterInTimm):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.finder.after(module.__name__)

    def __getattr__(self, name: str):  # the rest of the loader's surface (runpy's get_code, get_source, ...)
        return getattr(self.loader, name)


if "timm" in sys.modules:
    from . import zoo  # noqa: E402,F401  (registers our models in timm's registry)
elif not any(type(f).__qualname__ == _RegisterInTimm.__qualname__ and type(f).__module__ == __name__
             for f in sys.meta_path):  # one, also when metaformer is imported again (importlib.reload)
    sys.meta_path.insert(0, _RegisterInTimm())

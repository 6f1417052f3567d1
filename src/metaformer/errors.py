"""The errors a user can fix, under one base class, and the optional dependencies.

Everything the library raises because of its input (a file, a folder, an option, a config)
is a :class:`MetaFormerError`: the command line prints it as one line and exits 2, while a
bug keeps its traceback. It subclasses ``ValueError`` so library callers that catch
``ValueError`` keep working.

Optional dependencies come in extras (``pip install 'metaformer[train]'``, see :data:`EXTRAS`). A feature
imports one with :func:`require`; a command checks what it will need before it starts with :func:`need`
(nothing imported, so an hour-long run does not fail at its end). Either way a missing one is a
:class:`MissingDependency` naming the package that is missing and the extra that installs it.
"""
from __future__ import annotations

import importlib
import importlib.util


class MetaFormerError(ValueError):
    """A problem with the input, described in one line that names it and says what to do."""

    def cli_message(self, args) -> str:
        """The line the command line prints (``args``: the parsed command line); an error whose advice differs
        on the command line (a flag instead of a Python argument) says it the command line's way."""
        return str(self)


class ConfigError(MetaFormerError):
    """A model or training option that cannot work (wrong type, out of range, contradicts another)."""


class MissingDependency(MetaFormerError):
    """An optional dependency a feature needs is not installed (the message names it and the extra to install)."""


# What each extra of pyproject.toml installs: {import name: the name pip knows it by}. scipy comes with
# scikit-learn. A test keeps this table and pyproject.toml in step.
EXTRAS: dict[str, dict[str, str]] = {
    "train": {"tensorboard": "tensorboard", "matplotlib": "matplotlib", "sklearn": "scikit-learn", "scipy": "scipy"},
    "dense": {"pycocotools": "pycocotools", "tensorboard": "tensorboard"},
    "export": {"onnx": "onnx", "onnxruntime": "onnxruntime"},
    "quant": {"onnx": "onnx", "onnxruntime": "onnxruntime", "torchao": "torchao", "openvino": "openvino",
              "nncf": "nncf"},
    "openvino": {"openvino": "openvino", "nncf": "nncf"},
    "serve": {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart"},
    "cam": {"pytorch_grad_cam": "grad-cam"},
    "data": {"webdataset": "webdataset", "datasets": "datasets"},
    "hf": {"transformers": "transformers"},
    "wandb": {"wandb": "wandb"},
    "cluster": {"submitit": "submitit"},
}


def _package(module: str) -> str:
    """The name pip installs ``module``'s top-level package by (``sklearn`` -> ``scikit-learn``)."""
    top = module.split(".")[0]
    return next((pip for names in EXTRAS.values() for name, pip in names.items() if name == top), top)


def _missing(package: str, extra: str, purpose: str, broken: str | None = None) -> MissingDependency:
    if broken:  # installed, but its import fails (a broken or mismatched build): reinstalling is the fix
        return MissingDependency(f"{purpose} needs {package}, which is installed but fails to import ({broken}): "
                                 f"reinstall it with pip install --force-reinstall '{package}'")
    return MissingDependency(f"{purpose} needs {package}, which is not installed: pip install 'metaformer[{extra}]'")


def installed(module: str) -> bool:
    """Whether ``module``'s top-level package can be found, without importing it."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):  # a module hidden as None in sys.modules, or one without a spec
        return False


def need(module: str, extra: str, purpose: str) -> None:
    """Before the work starts: raise :class:`MissingDependency` when ``module`` is not installed (nothing is
    imported; :func:`require` imports it where it is used)."""
    if not installed(module):
        raise _missing(_package(module), extra, purpose)


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise :class:`MissingDependency` naming the package that is missing
    (for ``torch.utils.tensorboard``: tensorboard) and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise _missing(_package(e.name or module), extra, purpose) from None
    except ImportError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise _missing(_package(module), extra, purpose, broken=first) from None

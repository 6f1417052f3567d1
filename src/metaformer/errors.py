"""The errors a user can fix, under one base class.

Everything the library raises because of its input (a file, a folder, an option, a config)
is a :class:`MetaFormerError`: the command line prints it as one line and exits 2, while a
bug keeps its traceback. It subclasses ``ValueError`` so library callers that catch
``ValueError`` keep working.
"""
from __future__ import annotations


class MetaFormerError(ValueError):
    """A problem with the input, described in one line that names it and says what to do."""


class ConfigError(MetaFormerError):
    """A model or training option that cannot work (wrong type, out of range, contradicts another)."""


class MissingDependency(MetaFormerError):
    """An optional dependency a feature needs is not installed (the message names the extra to install)."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise :class:`MissingDependency` saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'metaformer[{extra}]'") from None

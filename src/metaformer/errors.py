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

"""YAML as people write it: ``lr: 1e-3`` is a number.

PyYAML implements YAML 1.1, where a float needs a dot, so ``1e-3`` and ``5e-2`` load as
strings and a learning rate silently becomes text. This loader adds YAML 1.2's float syntax
to PyYAML's safe loader (nothing else changes), and turns syntax errors into one-line
:class:`~metaformer.errors.ConfigError` messages naming the line and column.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import ConfigError


class Loader(yaml.SafeLoader):
    pass


# A private copy: adding to SafeLoader's own table would change yaml.safe_load for everyone.
Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load(text: str, source: str = "") -> Any:
    """Parse YAML text (``source`` names it in errors)."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise ConfigError(f"{source or 'YAML'}: invalid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source or 'YAML'}: invalid YAML: {str(e).splitlines()[0]}") from None


def load_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    return load(text, path)

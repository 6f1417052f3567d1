"""The allowed range of a numeric option, in one place: checked when it is parsed (a flag) or read (a YAML value),
and shown in ``--help``. NaN and infinity are never allowed: no option means anything with them."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .errors import ConfigError


def _show(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Range:
    """``lo`` <= x <= ``hi`` (either bound may be open or absent); ``integer``: whole numbers only.

    As an argparse ``type`` it parses the text and answers a value out of range with argparse's one-line error.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None and not (self.lo_open or self.hi_open):
            return f"{_show(self.lo)} to {_show(self.hi)}"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_show(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_show(self.hi)}")
        return " and ".join(parts) or "any finite number"

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        if self.integer and not float(value).is_integer():
            return f"{value} is not a whole number"
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"must be {self.describe()}, not {_show(value)}"
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return f"must be {self.describe()}, not {_show(value)}"
        return None

    def check(self, value, name: str):
        """``value``, or a ConfigError naming the option ``name``."""
        why = self.problem(value)
        if why is not None:
            raise ConfigError(f"{name} {why}" if why.startswith("must") else f"{name}: {why}; it must be "
                              f"{self.describe()}")
        return value

    def __call__(self, text: str):
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if self.integer else 'a number'}"
                                             ) from None
        why = self.problem(value)
        if why is not None:
            raise argparse.ArgumentTypeError(why if why.startswith("must") else f"{why}; it must be {self.describe()}")
        return value


def whole(lo: int | None = None, hi: int | None = None) -> Range:
    return Range(lo, hi, integer=True)


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(lo, hi, lo_open, hi_open)


# Bounds shared by several verbs.
MIN_IMG_SIZE = 32  # = models.metaformer.MIN_INPUT (not imported: the command line starts without torch)
MAX_IMG_SIZE = 4096  # beyond it a single image no longer fits a machine's memory through a MetaFormer
MAX_BATCH = 65_536
MAX_WORKERS = 1024
MAX_EPOCHS = 100_000
MAX_ITERS = 10_000_000
SEED = whole(0, 2**63 - 1)
IMG_SIZE = whole(MIN_IMG_SIZE, MAX_IMG_SIZE)
BATCH = whole(1, MAX_BATCH)
WORKERS = whole(0, MAX_WORKERS)
PROBABILITY = real(0, 1)
NUM_CLASSES = whole(1, 1_000_000)

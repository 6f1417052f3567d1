"""What an ablation grid can say: intervals over seeds, paired differences, rank agreement with the paper.

Every row of a grid is trained once per seed index, and seed index ``k`` gives every row the same initial
seed (``seed + k``), data order and augmentation draws; so ``row - baseline`` on seed ``k`` is a paired
difference, and its spread over seeds is the noise of the comparison itself (usually far smaller than
either row's own spread). The methods, in the report's words:

* **a row's top-1**: the mean over its seeds, with the 95% confidence interval of Student's t
  (``mean +- t(0.975, n - 1) * sd / sqrt(n)``; none with one seed);
* **the difference from a reference row** (``baseline``): the mean of the per-seed differences over the
  seeds both rows finished, with the same t interval; **resolved** when that interval excludes 0 (a
  paired t-test at the 5% level), otherwise **not resolved**: this budget cannot tell the two apart;
* **the smallest difference the grid resolves** is the half-width of those intervals; from their pooled
  seed-to-seed standard deviation follows how many seeds a 2-point difference would need;
* **agreement with the paper**: Spearman's rank correlation between the rows' mean top-1 and the paper's
  ImageNet top-1, with a 95% percentile bootstrap interval that resamples both the rows and, within each,
  its seeds (so it says how much the agreement depends on which rows and which seeds the grid holds).

Runs that diverged have no top-1: they are left out of means and pairs and counted apart; a row none of
whose runs finished ranks last in the correlation.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ..errors import require

CONFIDENCE = 0.95
RESOLVE_TARGET = 2.0  # points of top-1: the size of difference the users' questions are about
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # the report is reproducible from the grid's results


def _t():
    return require("scipy.stats", "train", "the confidence intervals of the ablation report").t


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """Student's t quantile for a two-sided ``confidence`` interval of a mean of ``n`` values."""
    return float(_t().ppf((1 + confidence) / 2, n - 1))


@dataclass
class Interval:
    mean: float | None
    lo: float | None  # None: fewer than two values, no interval
    hi: float | None
    n: int
    sd: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and t confidence interval of ``values`` (no interval for fewer than two)."""
    n = len(values)
    if n == 0:
        return Interval(None, None, None, 0, None)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, None, None, 1, None)
    sd = statistics.stdev(values)
    h = t_quantile(n, confidence) * sd / math.sqrt(n)
    return Interval(mean, mean - h, mean + h, n, sd)


def paired_difference(row: dict[int, float], reference: dict[int, float],
                      confidence: float = CONFIDENCE) -> Interval:
    """``row - reference`` over the seed indices both finished (``{seed index: top-1}``)."""
    seeds = sorted(set(row) & set(reference))
    return mean_interval([row[k] - reference[k] for k in seeds], confidence)


def verdict(diff: Interval) -> str:
    """``resolved below`` / ``resolved above`` when the interval excludes 0, else ``not resolved``."""
    if diff.lo is None:
        return f"n/a ({diff.n} paired seed{'s' if diff.n != 1 else ''})"
    if diff.hi < 0:
        return "resolved below"
    if diff.lo > 0:
        return "resolved above"
    return "not resolved"


def seeds_needed(sd: float, difference: float = RESOLVE_TARGET, confidence: float = CONFIDENCE,
                 most: int = 100) -> int | None:
    """The fewest seeds whose paired interval half-width ``t * sd / sqrt(n)`` is at most ``difference``
    (None if more than ``most``)."""
    for n in range(2, most + 1):
        if t_quantile(n, confidence) * sd / math.sqrt(n) <= difference:
            return n
    return None


def pooled_sd(intervals: list[Interval]) -> float | None:
    """The pooled standard deviation of several samples (each with its own mean): sqrt of the
    degrees-of-freedom-weighted mean of their variances."""
    parts = [(i.n - 1, i.sd) for i in intervals if i.sd is not None]
    dof = sum(d for d, _ in parts)
    return math.sqrt(sum(d * sd ** 2 for d, sd in parts) / dof) if dof else None


def _rank_rows(a):
    """Average ranks along the last axis (ties share their mean rank), as Spearman's rho uses."""
    return require("scipy.stats", "train", "the rank correlation of the ablation report").rankdata(a, axis=-1)


def spearman(measured: list[float], paper: list[float]) -> float | None:
    """Spearman's rho of two equally long lists; None for fewer than 3 pairs or a constant list."""
    if len(measured) < 3:
        return None
    import numpy as np

    rho = _pearson(_rank_rows(np.asarray(measured, float)), _rank_rows(np.asarray(paper, float)))
    return None if math.isnan(rho) else float(rho)


def _pearson(x, y):
    import numpy as np

    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(-1) / den


def spearman_bootstrap(runs: list[list[float]], paper: list[float], resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of Spearman's rho between the rows' mean top-1 and ``paper``.

    ``runs[i]`` holds row i's finished top-1 values (empty: none finished, ranked last). Each resample
    draws the rows with replacement and, for each drawn row, its seeds with replacement; resamples whose
    ranks are constant (rho undefined) are dropped. None when fewer than 3 rows or no resample defines rho.
    """
    import numpy as np

    r = len(runs)
    if r < 3:
        return None
    rng = np.random.default_rng(seed)
    width = max(1, max(len(v) for v in runs))
    values = np.full((r, width), np.nan)
    for i, v in enumerate(runs):
        values[i, :len(v)] = v
    counts = np.array([len(v) for v in runs])
    rows = rng.integers(0, r, size=(resamples, r))
    picks = (rng.random((resamples, r, width)) * np.maximum(counts[rows], 1)[..., None]).astype(int)
    drawn = np.take_along_axis(values[rows], picks, axis=2)  # [resamples, rows, seeds]
    # a row draws as many seeds as it has; one with none ranks below every measured row
    used = np.arange(width)[None, None, :] < counts[rows][..., None]
    means = np.where(counts[rows] > 0, np.where(used, drawn, 0).sum(2) / np.maximum(counts[rows], 1), -1.0)
    rho = _pearson(_rank_rows(means), _rank_rows(np.asarray(paper, float)[rows]))
    rho = rho[~np.isnan(rho)]
    if not len(rho):
        return None
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(rho, [tail, 100 - tail])
    return float(lo), float(hi)

"""Intervals for the evaluators' percentages: every number they report comes with one."""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials, as fractions (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def percent_with_ci(verdicts: Sequence[bool]) -> tuple[float, float, float, float]:
    """(percent true, half-width, low, high) of the 95 % Wilson interval, all in points."""
    k, n = sum(verdicts), len(verdicts)
    lo, hi = wilson_interval(k, n)
    return 100.0 * k / max(n, 1), 50.0 * (hi - lo), 100.0 * lo, 100.0 * hi


def mean_with_ci(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """(mean, half-width of its normal 95 % interval) of independent values; half-width 0 below n = 2.

    Sampled TPA averages each prompt's share of compliant samples and takes the interval over prompts:
    samples of one prompt are not independent, so a Wilson interval over all samples would be too narrow.
    """
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, z * math.sqrt(var / n)


def cluster_bootstrap(numerators: Sequence[float], denominators: Sequence[float], resamples: int = 2000,
                      seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of sum(numerators) / sum(denominators), resampling whole clusters (one
    entry per cluster) with replacement, as fractions; (nan, nan) when no resample has a denominator.

    The preference study's judgments of one item share its responses and are not independent: the item,
    not the judgment, is the unit to resample. Resamples are drawn from `seed` alone, so every ratio over
    the same clusters sees the same resamples. With few clusters the interval is coarse (all ratios 1 give
    [1, 1]).
    """
    import numpy as np

    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if len(num) == 0:
        return math.nan, math.nan
    picks = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    totals = den[picks].sum(axis=1)
    kept = totals > 0
    if not kept.any():
        return math.nan, math.nan
    ratios = num[picks].sum(axis=1)[kept] / totals[kept]
    tail = 100.0 * (1 - level) / 2
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return float(low), float(high)

"""Statistics over seeds: summaries per arm and paired differences against the baseline.

Percentile bootstrap with a fixed seed (so a report is reproducible), Wilcoxon
signed-rank for paired differences (exact for small samples, via SciPy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Summary:
    """Median, quartiles and mean with a 95 % bootstrap interval of a set of values."""

    n: int
    median: float
    q25: float
    q75: float
    mean: float
    ci_low: float
    ci_high: float


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    data = np.asarray(values, dtype=float)
    if len(data) == 1:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarize(values: Sequence[float], *, seed: int = 0) -> Summary:
    """:class:`Summary` of ``values`` (at least one)."""
    data = np.asarray(values, dtype=float)
    if len(data) == 0:
        raise ValueError("summarize needs at least one value")
    low, high = bootstrap_ci(data, seed=seed)
    q25, median, q75 = np.percentile(data, [25, 50, 75])
    return Summary(len(data), float(median), float(q25), float(q75), float(data.mean()), low, high)


@dataclass(frozen=True)
class PairedDifference:
    """Arm minus baseline on the same seeds."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    wins: int
    """Seeds on which the arm is better (by the metric's direction)."""

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def paired_difference(
    arm: Sequence[float], baseline: Sequence[float], *, higher_is_better: bool = True, seed: int = 0
) -> PairedDifference:
    """Bootstrap interval and two-sided Wilcoxon signed-rank p-value of ``arm - baseline``.

    When every difference is zero the p-value is 1 (no evidence of a difference).
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(arm, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError("paired_difference needs two equally long, non-empty sequences")
    diff = a - b
    low, high = bootstrap_ci(diff, seed=seed)
    if np.all(diff == 0):
        p = 1.0
    else:
        p = float(wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)
    wins = int(np.sum(diff > 0) if higher_is_better else np.sum(diff < 0))
    return PairedDifference(len(diff), float(diff.mean()), low, high, p, wins)

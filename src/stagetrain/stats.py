"""Statistics over seeds: what each number in a comparison table is, exactly.

Seeds are paired: seed ``s`` of an arm and seed ``s`` of the baseline share the
initial weights, the batch order and the data draw, so the question is asked of the
per-seed differences ``d_i = arm_i - baseline_i``.

**The test and its interval are one object.** The p-value is an exact paired
permutation test (a *sign-flip* test): under the null hypothesis that the arm makes
no difference, each ``d_i`` is as likely to have come out as ``-d_i``, so the observed
sum ``T = sum(d_i)`` is compared with the sums of all ``2^n`` sign patterns. With
``S_A`` the sum of the differences in a subset ``A`` (the ones flipped),
``T_flipped = T - 2 S_A``, so

    p_upper = #{A : S_A <= 0} / 2^n,   p_lower = #{A : S_A >= 0} / 2^n,
    p       = min(1, 2 min(p_upper, p_lower))          (two-sided)

Ties and zero differences need no special case: a zero difference flips to itself,
tied differences are enumerated like any other. The 95 % interval is the same test
inverted (Hartigan 1969): the shifts ``delta`` for which the test of ``d_i - delta``
does *not* reject. Since ``S_A(delta) <= 0`` exactly when the mean of the subset
``A`` is ``<= delta``, its ends are order statistics of the ``2^n - 1`` subset means:
the ``c``-th smallest and the ``c``-th largest, ``c = ceil(0.025 * 2^n) - 1``. By
construction **0 lies inside the interval exactly when p >= 0.05**, so a verdict
("better", "worse", "no significant difference") read from p never contradicts the
interval printed next to it. The interval is for the centre of the differences'
distribution (the test assumes it symmetric, where centre = mean = median); with too
few seeds it is unbounded (5 seeds: the smallest possible p is 2/32 = 0.0625, so no
shift can be rejected at 0.05).

Up to ``EXACT_UP_TO`` (20) seeds every sign pattern is enumerated (2^20 sums, well
under a second). Above, ``resamples`` random sign patterns (seeded, so a report is
reproducible) estimate the same quantities, ``p = (1 + hits) / (1 + resamples)``,
and the p-value's Monte Carlo standard error ``2 sqrt(p1 (1 - p1) / resamples)``
(``p1`` the smaller one-sided p) is reported with it; the interval is the inverted
Monte Carlo test, so it agrees with that p exactly.

Float noise must not create or remove ties (in floats ``0.3 - 0.1 != 0.5 - 0.3``):
two sums closer than ``1e-9`` of the largest value compared count as equal, in the
test and in its inversion alike.

**Per-arm means** get a BCa bootstrap interval (``scipy.stats.bootstrap``,
``method='BCa'``, 10,000 resamples, seeded): better coverage than the percentile
bootstrap at 5-10 seeds. :class:`PairedDifference` keeps a paired BCa interval of
the mean difference too, for reference; the table prints the test-inversion one.

**Time to target is censored data**: a run that never reaches the target is not
"infinitely slow" in a mean, it is a run whose time is known only to exceed its
budget. Per arm: the fraction of runs that reached it with a Clopper-Pearson interval,
and the median time only when more than half reached it — the smallest evaluated
time by which half the runs had arrived (the Kaplan-Meier median when every miss
outlasts every hit), never an average of two evaluations. Paired against the
baseline: the sign-flip test above on the per-seed difference of pooled mid-ranks,
a miss ranking after every hit (swapping the two runs of a seed swaps their ranks, so
the test stays exact).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
EXACT_UP_TO = 20
"""Up to this many seeds the sign-flip test enumerates every sign pattern."""
SIGN_FLIP_RESAMPLES = 100_000
"""Random sign patterns of the Monte Carlo test above :data:`EXACT_UP_TO` seeds."""
ALPHA = 0.05
TOLERANCE = 1e-9
"""Relative to the compared values: sums closer than this count as equal."""


@dataclass(frozen=True)
class SignFlipResult:
    """A paired sign-flip test and its inverted interval (see the module docstring)."""

    n: int
    p_value: float
    p_se: float
    """Monte Carlo standard error of ``p_value`` (0 when exact)."""
    exact: bool
    ci_low: float
    ci_high: float
    """Bounds of the shifts the test does not reject at ``level`` (may be infinite)."""
    level: float

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p_value < alpha


def _subset_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and size of every subset (all 2^n), by doubling."""
    sums = np.zeros(1)
    sizes = np.zeros(1, dtype=np.int64)
    for value in values:
        sums = np.concatenate([sums, sums + value])
        sizes = np.concatenate([sizes, sizes + 1])
    return sums, sizes


def _sampled_subset_sums(
    values: np.ndarray, resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The identity pattern (the observed sum, counted once) plus random subsets."""
    rng = np.random.default_rng([seed, 0x5F11])
    sums, sizes = [np.zeros(1)], [np.zeros(1, dtype=np.int64)]
    chunk = max(1, 2_000_000 // max(len(values), 1))
    left = resamples
    while left > 0:
        m = min(chunk, left)
        flipped = rng.random((m, len(values))) < 0.5
        sums.append(flipped.astype(float) @ values)
        sizes.append(flipped.sum(axis=1).astype(np.int64))
        left -= m
    return np.concatenate(sums), np.concatenate(sizes)


def sign_flip_test(
    differences: Sequence[float] | np.ndarray,
    *,
    level: float = 1 - ALPHA,
    scale: float | None = None,
    exact_up_to: int = EXACT_UP_TO,
    resamples: int = SIGN_FLIP_RESAMPLES,
    seed: int = 0,
) -> SignFlipResult:
    """Two-sided paired sign-flip test of ``differences`` and its inverted interval.

    Args:
        differences: per-seed differences (at least one).
        level: confidence level of the interval; the test rejects at ``1 - level``.
        scale: magnitude of the compared values, for the grid that merges float noise
            (default: the largest absolute difference).
        exact_up_to: enumerate every sign pattern up to this many differences.
        resamples: random sign patterns above ``exact_up_to``.
        seed: seed of the random sign patterns.

    Example:
        >>> sign_flip_test([0.3, 0.1, 0.4, 0.15, 0.9, 0.2, 0.6, 0.5]).p_value  # 2 / 2^8
        0.0078125
    """
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or len(d) == 0 or not np.all(np.isfinite(d)):
        raise ValueError("sign_flip_test needs a non-empty sequence of finite differences")
    n = len(d)
    # Sums within this tolerance of each other are equal: float noise is not a difference.
    tol = TOLERANCE * (float(np.max(np.abs(d))) if scale is None else scale)
    exact = n <= exact_up_to
    sums, sizes = _subset_sums(d) if exact else _sampled_subset_sums(d, resamples, seed)
    total = len(sums)
    upper = int(np.count_nonzero(sums - tol <= 0))  # S_A <= 0: a flip at least as large
    lower = int(np.count_nonzero(sums + tol >= 0))
    smaller = min(upper, lower)
    # p = 2 * smaller / total, capped at 1; exact when total is a power of two
    p_value = min(1.0, 2.0 * smaller / total)
    if exact:
        p_se = 0.0
    else:
        p1 = smaller / total
        p_se = min(1.0, 2.0 * math.sqrt(p1 * (1.0 - p1) / resamples))
    # Inversion: delta is kept when #{A: (S_A - tol) / |A| <= delta} + #{A empty} >= t
    # (and the mirror image), t = (1 - level) / 2 * total: the ends are the c-th smallest
    # and c-th largest of those subset means. At delta = 0 these are the very counts
    # behind p, so 0 is inside exactly when p >= 1 - level.
    threshold = (1.0 - level) / 2.0 * total
    empty = int(np.count_nonzero(sizes == 0))
    c = math.ceil(threshold) - empty
    nonempty = sizes > 0
    if c <= 0:
        low, high = -math.inf, math.inf
    else:
        counts = sizes[nonempty]
        low = float(np.sort((sums[nonempty] - tol) / counts)[c - 1])
        high = float(np.sort((sums[nonempty] + tol) / counts)[-c])
    return SignFlipResult(n, p_value, p_se, exact, low, high, level)


@dataclass(frozen=True)
class Summary:
    """Median, quartiles and mean with a 95 % BCa bootstrap interval of a set of values."""

    n: int
    median: float
    q25: float
    q75: float
    mean: float
    ci_low: float
    ci_high: float
    """NaN when the interval is undefined (a single value)."""


def bca_interval(
    *samples: Sequence[float] | np.ndarray,
    level: float = 1 - ALPHA,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """BCa interval of the mean (one sample) or of the mean paired difference (two).

    Equal values give the degenerate interval (v, v); fewer than two values give NaNs.
    """
    from scipy.stats import bootstrap

    data = [np.asarray(s, dtype=float) for s in samples]
    diff = data[0] if len(data) == 1 else data[0] - data[1]
    if len(diff) < 2:
        return math.nan, math.nan
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0])

    def statistic(*xs: np.ndarray, axis: int = -1) -> np.ndarray:
        values = xs[0] if len(xs) == 1 else xs[0] - xs[1]
        return np.mean(values, axis=axis)

    with warnings.catch_warnings():
        # tiny samples can leave BCa's acceleration undefined: NaN bounds, reported as '—'
        warnings.simplefilter("ignore")
        result = bootstrap(
            tuple(data),
            statistic,
            paired=len(data) > 1,
            vectorized=True,
            confidence_level=level,
            n_resamples=resamples,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    ci = result.confidence_interval
    return float(ci.low), float(ci.high)


def summarize(values: Sequence[float], *, seed: int = 0) -> Summary:
    """:class:`Summary` of ``values`` (at least one)."""
    data = np.asarray(values, dtype=float)
    if len(data) == 0:
        raise ValueError("summarize needs at least one value")
    low, high = bca_interval(data, seed=seed)
    q25, median, q75 = np.percentile(data, [25, 50, 75])
    return Summary(len(data), float(median), float(q25), float(q75), float(data.mean()), low, high)


@dataclass(frozen=True)
class PairedDifference:
    """Arm minus baseline on the same seeds: mean, the sign-flip test and its interval."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    """The inverted sign-flip test's interval (agrees with ``p_value``)."""
    p_value: float
    p_se: float
    exact: bool
    wins: int
    """Seeds on which the arm is better (by the metric's direction)."""
    losses: int
    ties: int
    bca_low: float
    bca_high: float
    """Paired BCa bootstrap interval of the mean difference (for reference)."""

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p_value < alpha


def paired_difference(
    arm: Sequence[float], baseline: Sequence[float], *, higher_is_better: bool = True, seed: int = 0
) -> PairedDifference:
    """The sign-flip test of ``arm - baseline`` with its interval (see the module docstring)."""
    a, b = np.asarray(arm, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired_difference needs two equally long, non-empty sequences")
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(b))))
    test = sign_flip_test(a - b, scale=scale, seed=seed)
    diff = a - b
    tol = TOLERANCE * scale
    better = diff > tol if higher_is_better else diff < -tol
    worse = diff < -tol if higher_is_better else diff > tol
    bca_low, bca_high = bca_interval(a, b, seed=seed)
    return PairedDifference(
        n=len(a),
        mean=float(np.mean(a - b)),
        ci_low=test.ci_low,
        ci_high=test.ci_high,
        p_value=test.p_value,
        p_se=test.p_se,
        exact=test.exact,
        wins=int(np.sum(better)),
        losses=int(np.sum(worse)),
        ties=int(np.sum(np.abs(diff) <= tol)),
        bca_low=bca_low,
        bca_high=bca_high,
    )


@dataclass(frozen=True)
class TimeToTarget:
    """Censored time to target of one arm: who reached it, and the median when defined."""

    n: int
    reached: int
    reached_low: float
    reached_high: float
    """Clopper-Pearson 95 % interval of the fraction of runs that reached the target."""
    median: float | None
    """Smallest evaluated time by which half the runs had reached the target; ``None``
    unless more than half reached it."""


def time_to_target(times: Sequence[float | None], *, level: float = 1 - ALPHA) -> TimeToTarget:
    """:class:`TimeToTarget` of per-run times (``None``: never reached within the budget)."""
    from scipy.stats import binomtest

    n = len(times)
    if n == 0:
        raise ValueError("time_to_target needs at least one run")
    hits = sorted(float(t) for t in times if t is not None)
    ci = binomtest(len(hits), n).proportion_ci(confidence_level=level, method="exact")
    median = hits[math.ceil(n / 2) - 1] if len(hits) > n / 2 else None
    return TimeToTarget(n, len(hits), float(ci.low), float(ci.high), median)


@dataclass(frozen=True)
class PairedTimes:
    """Arm against baseline on time to target, seed by seed (a miss is slower than any hit)."""

    n: int
    faster: int
    slower: int
    ties: int
    p_value: float
    p_se: float
    exact: bool

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p_value < alpha


def paired_times(
    arm: Sequence[float | None], baseline: Sequence[float | None], *, seed: int = 0
) -> PairedTimes:
    """Sign-flip test on pooled mid-ranks of paired times to target (``None`` = missed)."""
    from scipy.stats import rankdata

    if len(arm) != len(baseline) or len(arm) == 0:
        raise ValueError("paired_times needs two equally long, non-empty sequences")
    a = np.array([math.inf if t is None else float(t) for t in arm])
    b = np.array([math.inf if t is None else float(t) for t in baseline])
    ranks = rankdata(np.concatenate([a, b]))  # misses tie with each other, after every hit
    diff = ranks[: len(a)] - ranks[len(a) :]
    test = sign_flip_test(diff, seed=seed)
    return PairedTimes(
        n=len(a),
        faster=int(np.sum(diff < 0)),
        slower=int(np.sum(diff > 0)),
        ties=int(np.sum(diff == 0)),
        p_value=test.p_value,
        p_se=test.p_se,
        exact=test.exact,
    )

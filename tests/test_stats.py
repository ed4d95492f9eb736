"""Statistics with known answers: the sign-flip test, its interval, BCa, time-to-target."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as sps

from stagetrain.stats import (
    paired_difference,
    paired_times,
    sign_flip_test,
    summarize,
    time_to_target,
)


def brute_force_p(differences: list[Fraction]) -> float:
    """Two-sided p of the sign-flip test of the sum, by listing every sign vector."""
    observed = sum(differences)
    flips = [sum(s * d for s, d in zip(signs, differences, strict=True))
             for signs in itertools.product((1, -1), repeat=len(differences))]  # fmt: skip
    upper = sum(t >= observed for t in flips) / len(flips)
    lower = sum(t <= observed for t in flips) / len(flips)
    return min(1.0, 2 * min(upper, lower))


def test_exact_p_of_eight_positive_differences() -> None:
    result = sign_flip_test([0.3, 0.1, 0.4, 0.15, 0.9, 0.2, 0.6, 0.5])
    assert result.exact and result.p_se == 0.0
    assert result.p_value == 2 / 256


def test_twenty_tied_positive_differences_are_exact() -> None:
    # the case scipy's Wilcoxon answered with a normal approximation (8.8e-5)
    d = paired_difference([1.5] * 10 + [2.0] * 10, [1.0] * 20)
    assert d.p_value == pytest.approx(2 / 2**20, rel=1e-12)
    assert d.exact


@pytest.mark.parametrize(
    "values",
    [
        [2, 2, -2, 0, 0, 1],  # ties and zeros
        [1, 1, 1, 1, -1],
        [0, 0, 0, 3],
        [5, -5, 5, -5, 5],
        [1, 2, 3, 4, 5, 6, 7, -28],
    ],
)
def test_ties_and_zeros_match_brute_force(values: list[int]) -> None:
    assert sign_flip_test(values).p_value == pytest.approx(
        brute_force_p([Fraction(v) for v in values]), abs=1e-12
    )


def test_random_cases_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 11))
        values = rng.integers(-4, 5, n).tolist()
        assert sign_flip_test(values).p_value == pytest.approx(
            brute_force_p([Fraction(v) for v in values]), abs=1e-12
        ), values


def test_float_noise_from_subtraction_is_not_a_difference() -> None:
    # decimal differences 0.2, 0.2, 0.3, -0.2: in floats 0.3 - 0.1 != 0.5 - 0.3
    arm, base = ["0.3", "0.5", "0.7", "0.2"], ["0.1", "0.3", "0.4", "0.4"]
    exact = [Fraction(a) - Fraction(b) for a, b in zip(arm, base, strict=True)]
    d = paired_difference([float(a) for a in arm], [float(b) for b in base])
    assert d.p_value == pytest.approx(brute_force_p(exact), abs=1e-12)
    assert d.ties == 0 and d.wins == 3


def test_all_zero_differences() -> None:
    d = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert d.p_value == 1.0 and not d.significant()
    assert d.ties == 3
    # three seeds cannot reject any shift (the smallest p is 2/8); eight can
    assert (d.ci_low, d.ci_high) == (-math.inf, math.inf)
    eight = paired_difference([1.0] * 8, [1.0] * 8)
    assert (eight.ci_low, eight.ci_high) == pytest.approx((0.0, 0.0), abs=1e-8)
    assert eight.p_value == 1.0


def test_the_interval_is_the_test_inverted() -> None:
    """0 is inside the interval exactly when p >= 0.05, and so is any other shift."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(2, 12))
        values = rng.integers(-3, 8, n).astype(float)
        result = sign_flip_test(values)
        inside = result.ci_low <= 0 <= result.ci_high
        assert inside == (result.p_value >= 0.05), (values, result)
        scale = float(np.max(np.abs(values)))  # the same tolerance at every shift
        for bound, outward in ((result.ci_low, -1e-6), (result.ci_high, 1e-6)):
            if math.isfinite(bound) and result.ci_low < result.ci_high:
                assert sign_flip_test(values - (bound - outward), scale=scale).p_value >= 0.05
                assert sign_flip_test(values - (bound + outward), scale=scale).p_value < 0.05


def test_verdict_never_contradicts_the_interval() -> None:
    # five seeds, all better: the smallest two-sided p is 2/32, so no interval can exclude 0
    d = paired_difference(
        [2.3051, 2.3003, 2.3183, 2.3074, 2.3109], [2.4069, 2.3988, 2.4095, 2.4081, 2.4115],
        higher_is_better=False,
    )  # fmt: skip
    assert d.p_value == 2 / 32 and not d.significant()
    assert d.ci_low <= 0 <= d.ci_high
    assert d.wins == 5


def test_monte_carlo_above_the_exact_limit_states_its_error() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(0.3, 1.0, 21)
    exact = sign_flip_test(values, exact_up_to=21)
    sampled = sign_flip_test(values, exact_up_to=20, resamples=20_000)
    assert exact.exact and not sampled.exact
    half = sampled.p_value / 2  # the smaller one-sided p
    assert sampled.p_se == pytest.approx(2 * math.sqrt(half * (1 - half) / 20_000), rel=1e-9)
    assert abs(sampled.p_value - exact.p_value) < 4 * sampled.p_se
    # the Monte Carlo interval is still the inverted Monte Carlo test
    assert (sampled.ci_low <= 0 <= sampled.ci_high) == (sampled.p_value >= 0.05)
    assert sign_flip_test(values, exact_up_to=20, resamples=20_000) == sampled  # seeded


def test_summary_uses_bca_intervals() -> None:
    values = [0.91, 0.88, 0.95, 0.97, 0.90, 0.93, 0.89, 0.99]
    s = summarize(values, seed=0)
    expected = sps.bootstrap(
        (np.array(values),), np.mean, method="BCa", n_resamples=10_000,
        rng=np.random.default_rng(0),
    ).confidence_interval  # fmt: skip
    assert (s.ci_low, s.ci_high) == pytest.approx((expected.low, expected.high))
    assert (s.n, s.median, s.mean) == (8, pytest.approx(0.92), pytest.approx(np.mean(values)))
    same = summarize([1.0, 1.0, 1.0])
    assert (same.ci_low, same.ci_high) == (1.0, 1.0)
    one = summarize([0.5])
    assert math.isnan(one.ci_low) and math.isnan(one.ci_high)


def test_paired_difference_keeps_a_bca_interval_too() -> None:
    arm, base = [3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [1.0, 1.5, 1.0, 2.0, 1.0, 1.0]
    d = paired_difference(arm, base)
    expected = sps.bootstrap(
        (np.array(arm), np.array(base)), lambda a, b, axis: np.mean(a - b, axis=axis),
        paired=True, method="BCa", n_resamples=10_000, rng=np.random.default_rng(0),
    ).confidence_interval  # fmt: skip
    assert (d.bca_low, d.bca_high) == pytest.approx((expected.low, expected.high))
    assert d.p_value == 2 / 64 and d.significant() and not d.ci_low <= 0 <= d.ci_high


def test_time_to_target_is_censored() -> None:
    t = time_to_target([100, 200, None, 300, None])
    assert (t.n, t.reached) == (5, 3)
    ci = sps.binomtest(3, 5).proportion_ci(0.95, method="exact")
    assert (t.reached_low, t.reached_high) == pytest.approx((ci.low, ci.high))
    assert t.median == 300  # the third of five: an evaluated step, never an average
    assert time_to_target([100, 250, 300, None]).median == 250
    assert time_to_target([100, None]).median is None  # not reached by more than half
    assert time_to_target([None, None, None]).median is None


def test_paired_time_to_target_counts_misses_as_slowest() -> None:
    faster = paired_times([100] * 6, [None] * 6)
    assert (faster.faster, faster.slower, faster.ties) == (6, 0, 0)
    assert faster.p_value == 2 / 64 and faster.significant()
    slower = paired_times([None, 500, 900, 400, 800, 700, 600, None],
                          [100, 200, 300, 100, 200, 300, 100, 200])  # fmt: skip
    assert (slower.faster, slower.slower) == (0, 8) and slower.p_value == 2 / 256
    mixed = paired_times([None, 100, 300], [None, 200, 200])
    assert (mixed.faster, mixed.slower, mixed.ties) == (1, 1, 1)
    assert not mixed.significant()

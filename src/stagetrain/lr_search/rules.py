"""The range test's pick rule and the successive-halving candidates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stagetrain.config import AutoLRConfig

DIP = 0.05
"""A range test's loss must fall (rise) this fraction below (above) its starting level for
a minimum (a divergence) to count: loss noise on a plateau is smaller."""


def _ema(x: np.ndarray, beta: float) -> np.ndarray:
    """The bias-corrected exponential moving average of ``x`` (causal)."""
    out = np.empty_like(x)
    avg = 0.0
    for i, v in enumerate(x):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def _start_level(x: np.ndarray) -> float:
    """The curve's starting level: the median of its first tenth (at least three points)."""
    return float(np.median(x[: max(3, len(x) // 10)]))


def smooth(values: Sequence[float] | np.ndarray, beta: float) -> np.ndarray:
    """A zero-phase exponential moving average: forwards, then backwards over the result
    (bias-corrected both ways), so a drop or a rise is not shifted along the axis.

    Values above the curve's starting level are capped there first: a diverging tail,
    often 10-100x the loss, would otherwise leak backwards into the LRs just before it
    and hide the minimum."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return x
    x = np.minimum(x, _start_level(x))
    return _ema(_ema(x, beta)[::-1], beta)[::-1]


NOISE_MARGIN = 1.5
"""A move of the smoothed loss counts when it exceeds this many standard deviations of the
per-step loss noise (or :data:`DIP`): on a flat, noisy plateau the smoothed curve's
minimum lies about 0.8 of them below the plateau in 95 % of cases (the zero-phase
smoothing of :func:`smooth` with factor 0.8; simulated), and the starting level, a
median of a tenth of the curve, is itself off by up to about 0.7 of them."""


def _margin(x: np.ndarray, start: float) -> float:
    """How far the smoothed loss must move from its starting level to count: :data:`DIP`
    of it or :data:`NOISE_MARGIN` standard deviations of the loss's noise, whichever is
    more. The noise is estimated from the first half's successive differences (a robust
    median), which a trend in the loss does not inflate."""
    half = x[: max(4, len(x) // 2)]
    steps = np.diff(half)
    noise = 1.4826 * float(np.median(np.abs(steps - np.median(steps)))) / math.sqrt(2)
    return max(DIP * abs(start), NOISE_MARGIN * noise)


def range_edge(losses: Sequence[float], beta: float) -> tuple[int, np.ndarray]:
    """Index of the range test's edge and the smoothed curve.

    When the smoothed loss dips below its starting level by more than the margin (of
    :func:`_margin`: :data:`DIP`, or :data:`NOISE_MARGIN` standard deviations of the
    loss's noise), the edge is its minimum. On a plateau (no such dip: the minimum is
    noise) it is the *divergence point*, where the loss leaves the plateau for good: the
    last step at which the loss's causal moving average is still within the margin of
    the starting level. The last such step, not the first step beyond: a noisy
    per-batch loss (small batches, noisy labels) crosses any threshold by chance
    somewhere on a long plateau, and comes back; by the same noise a plateau's smoothed
    minimum lies below its start, which is why a dip must exceed the noise too.
    """
    x = np.asarray(losses, dtype=np.float64)
    curve = smooth(x, beta)
    start = _start_level(x)
    margin = _margin(x, start)
    low = int(np.argmin(curve))
    if curve[low] < start - margin:
        return low, curve
    within = np.nonzero(_ema(x, beta) <= start + margin)[0]
    return (int(within[-1]) if len(within) else 0), curve


def pick_lr(
    lrs: Sequence[float], losses: Sequence[float], cfg: AutoLRConfig
) -> tuple[float, float | None, np.ndarray]:
    """The range test's pick, its edge and the smoothed curve (see the module docstring).

    ``losses`` are the finite losses of the first ``len(losses)`` LRs of ``lrs``.
    """
    if len(losses) < 2:
        # Diverged at once: the smallest LR tried is the only evidence.
        return float(lrs[0]), None, np.asarray(losses, dtype=np.float64)
    low, curve = range_edge(losses, cfg.smoothing)
    edge = float(lrs[low])
    if cfg.rule == "divergence":
        return cfg.fraction * edge, edge, curve
    if low == 0:
        return float(lrs[0]), edge, curve
    slope = np.gradient(curve[: low + 1], np.log(np.asarray(lrs[: low + 1], dtype=np.float64)))
    return float(lrs[int(np.argmin(slope))]), edge, curve


def candidate_lrs(pick: float, cfg: AutoLRConfig) -> list[float]:
    """``pick x spread^k``, ascending, for ``candidates`` values of k: centred on 0
    (``ladder: centred``) or 0, -1, -2, ... (``ladder: below``: the pick is the top)."""
    if cfg.ladder == "below":
        return [pick * cfg.spread ** (i - cfg.candidates + 1) for i in range(cfg.candidates)]
    first = -((cfg.candidates - 1) // 2)
    return [pick * cfg.spread ** (first + i) for i in range(cfg.candidates)]

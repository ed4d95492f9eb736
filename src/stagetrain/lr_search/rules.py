"""The range test's pick rule and the successive-halving candidates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from stagetrain.config import AutoLRConfig

if TYPE_CHECKING:
    pass


# --- checks before training -----------------------------------------------------------------


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


def range_edge(losses: Sequence[float], beta: float) -> tuple[int, np.ndarray]:
    """Index of the range test's edge and the smoothed curve.

    When the smoothed loss dips :data:`DIP` below its starting level, the edge is its
    minimum. On a plateau (no such dip: the minimum is noise) it is the *divergence
    point*, the last step before the loss's causal moving average first rises above the
    starting level by :data:`DIP` or by three standard deviations of that average on
    the plateau, whichever is more (the noise estimated from the first half's spread).
    """
    x = np.asarray(losses, dtype=np.float64)
    curve = smooth(x, beta)
    start = _start_level(x)
    low = int(np.argmin(curve))
    if curve[low] < start * (1 - DIP):
        return low, curve
    half = x[: max(3, len(x) // 2)]
    noise = 1.4826 * float(np.median(np.abs(half - np.median(half))))
    margin = max(DIP * abs(start), 3 * noise * math.sqrt((1 - beta) / (1 + beta)))
    above = np.nonzero(_ema(x, beta) > start + margin)[0]
    return (max(int(above[0]) - 1, 0) if len(above) else len(x) - 1), curve


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
    """``pick x spread^k`` for ``candidates`` values of k centred on 0, ascending."""
    first = -((cfg.candidates - 1) // 2)
    return [pick * cfg.spread ** (first + i) for i in range(cfg.candidates)]

"""Pacing functions and the sampler that draws from the visible part of ordered data.

A pacing function is a schedule (a pure function of stage-local step) whose value is
the fraction of the stage's data visible at that step; see
:class:`~stagetrain.config.PacingConfig` for the formulas. The visible part is a
prefix of an ordering of the samples: easiest first, hardest first, or random.
"""

from __future__ import annotations

import math

import numpy as np

from stagetrain.config import PacingConfig
from stagetrain.sampler import rank_share
from stagetrain.schedules import Schedule


def pacing_function(cfg: PacingConfig, stage_steps: int) -> Schedule:
    """``g(t)``: the visible fraction of the data at stage-local step ``t``, in (0, 1]."""
    a, b, p = cfg.a, cfg.b, cfg.p
    span = a * stage_steps  # steps until all data is visible

    def progress(step: float) -> float:
        return min(max(step, 0.0) / span, 1.0) if span > 0 else 1.0

    kind = cfg.kind
    if kind == "step":

        def g(step: float) -> float:
            return b if step < span else 1.0
    elif kind == "linear":

        def g(step: float) -> float:
            return b + (1 - b) * progress(step)
    elif kind == "root":

        def g(step: float) -> float:
            return b + (1 - b) * progress(step) ** (1 / p)
    elif kind == "exp":

        def g(step: float) -> float:
            return b + (1 - b) * (math.exp(10 * progress(step)) - 1) / (math.exp(10) - 1)
    elif kind == "log":

        def g(step: float) -> float:
            return b + (1 - b) * max(0.0, 1 + 0.1 * math.log(progress(step) + math.exp(-10)))
    elif kind == "competence_linear":

        def g(step: float) -> float:
            return min(1.0, progress(step) * (1 - b) + b)
    else:  # competence_sqrt

        def g(step: float) -> float:
            return min(1.0, math.sqrt(progress(step) * (1 - b * b) + b * b))

    def bounded(step: float) -> float:
        return min(1.0, max(g(step), 0.0))

    return bounded


def ordering(scores: np.ndarray, order: str, seed: int, stage_index: int) -> np.ndarray:
    """Sample indices in the order they become visible.

    ``curriculum``: ascending score (ties by index); ``anti``: descending; ``random``: a
    permutation seeded by ``(seed, stage)``, the control with identical pacing.
    """
    if order == "curriculum":
        return np.argsort(scores, kind="stable")
    if order == "anti":
        return np.argsort(-scores, kind="stable")
    return np.random.default_rng([seed, stage_index, 0xA11]).permutation(len(scores))


class PacedSampler:
    """Batches drawn uniformly from the visible prefix of an ordering.

    The indices of step ``t`` are a pure function of ``(seed, stage, t)`` — drawn with a
    generator seeded by those three — so any step can be produced in O(batch) time,
    independent of the dataset size, and resume needs only the step counter.

    Args:
        order: sample indices in visibility order.
        pacing: visible fraction per stage-local step.
        batch_size: global batch size.
        steps: stage length.
        seed: curriculum seed.
        stage_index: position of the stage.
        labels: class of each sample, for class-balanced draws (``None`` = plain uniform).
    """

    def __init__(
        self,
        order: np.ndarray,
        pacing: Schedule,
        batch_size: int,
        steps: int,
        seed: int,
        stage_index: int,
        labels: np.ndarray | None = None,
    ) -> None:
        size = len(order)
        self.order = order.astype(np.int32 if size < 2**31 else np.int64, copy=False)
        self.pacing = pacing
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.stage_index = stage_index
        self.sizes = np.array([size], dtype=np.int64)
        self._by_class: list[np.ndarray] | None = None
        if labels is not None:
            ordered_labels = labels[self.order]
            classes = np.unique(ordered_labels)
            # Positions (in visibility order) of each class, ascending.
            self._by_class = [np.nonzero(ordered_labels == c)[0] for c in classes]

    @property
    def counts(self) -> np.ndarray:
        """Samples per step, shape ``(steps, 1)`` (O(steps) memory; one source, always full)."""
        return np.full((self.steps, 1), self.batch_size, dtype=np.int64)

    def source_shares(self) -> np.ndarray:
        """One source: all of the stage's samples."""
        return np.ones(1)

    def visible(self, step: int) -> int:
        """Number of samples visible at ``step`` (at least one)."""
        return max(1, min(len(self.order), math.ceil(self.pacing(step) * len(self.order) - 1e-9)))

    def global_batch(self, step: int) -> np.ndarray:
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside the stage's {self.steps} steps")
        n = self.visible(step)
        rng = np.random.default_rng([self.seed, self.stage_index, step, 0xFACE])
        if self._by_class is None:
            return self.order[rng.integers(0, n, self.batch_size)].astype(np.int64)
        available = [(cls, int(np.searchsorted(cls, n))) for cls in self._by_class]
        available = [(cls, k) for cls, k in available if k > 0]
        per_class = np.full(len(available), self.batch_size // len(available))
        extra = rng.choice(len(available), self.batch_size - per_class.sum(), replace=False)
        per_class[extra] += 1
        picks = [
            cls[rng.integers(0, k, m)] for (cls, k), m in zip(available, per_class, strict=True)
        ]
        positions = np.concatenate(picks)
        return self.order[positions[rng.permutation(len(positions))]].astype(np.int64)

    def rank_batch(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This rank's contiguous share of the global batch of ``step``."""
        return rank_share(self.global_batch(step), rank, world_size)

    def source_repeats(self) -> np.ndarray:
        """Average draws per sample over the stage (draws are with replacement)."""
        return np.array([self.batch_size * self.steps / len(self.order)])

"""A stage, built: its data, sampler, loss, calling convention, learning rate and length.

:class:`Stage` is what :class:`~stagetrain.curriculum.Curriculum` builds from each
:class:`~stagetrain.config.StageConfig`; the built-in loop, a user's own loop and the
framework adapters all read a stage's batches, loss and learning rate from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stagetrain.batch import Batch, BatchFormat, fit_length
from stagetrain.config import StageConfig
from stagetrain.data import ConcatSources
from stagetrain.errors import StageTrainError
from stagetrain.losses import StageLoss
from stagetrain.modelio import ModelIO
from stagetrain.pacing import PacedSampler
from stagetrain.sampler import StageSampler
from stagetrain.schedules import Schedule
from stagetrain.time import TimeContext


@dataclass
class SourceShare:
    """A source of a stage and its share of the stage's samples (for the plan and logs)."""

    label: str
    size: int
    share: float
    replay: bool = False


@dataclass
class Stage:
    """One stage, built: data, sampler, loss, learning rate and length in steps."""

    index: int
    config: StageConfig
    steps: int
    context: TimeContext
    data: ConcatSources
    weights: list[Schedule]
    sources: list[SourceShare]
    loss: StageLoss
    io: ModelIO
    """How this stage's batches reach the model and its outputs reach the loss."""
    warmup_steps: int
    lr_shape: Schedule
    """The LR over stage-local steps as a factor of the configured ``lr`` (warmup x schedule)."""
    seed: int
    planned_start: int = 0
    """Global step at which the stage starts when every earlier stage runs its full length."""
    global_lr: Schedule | None = None
    """The curriculum-wide LR (absolute, of the global step) when ``global_lr`` is set."""
    paced: tuple[np.ndarray, Schedule, np.ndarray | None] | None = None
    """(visibility order, pacing function, class labels) when the stage uses pacing."""
    tokens_per_source: list[int] = field(default_factory=list)
    """Tokens in one sample of each source at the stage's ``seq_len`` (1 for non-token data)."""
    auto_lr: float | None = None
    """The searched peak LR of an ``lr: auto`` stage, once its search ran (set by
    :mod:`stagetrain.lr_search`'s drivers; :func:`stagetrain.fit` sets it at the stage's
    start or from the checkpoint)."""
    duration_steps: int = 0
    """Steps of the stage's duration before a counted ``lr: auto`` search is taken off
    (0: :attr:`steps`); a search sized by fractions of the stage is sized by this."""
    _sampler: StageSampler | PacedSampler | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def batch_size(self) -> int:
        assert self.config.batch_size is not None
        return self.config.batch_size

    @property
    def fmt(self) -> BatchFormat:
        return self.io.fmt

    @property
    def lr_peak(self) -> float:
        """The stage's configured learning rate (before warmup and schedule); for
        ``lr: auto`` the searched one (an error before the search ran)."""
        assert self.config.optimizer is not None
        lr = self.config.optimizer.lr
        if lr != "auto":
            return lr
        if self.auto_lr is None:
            raise StageTrainError(
                f"stages[{self.index}].optimizer.lr: 'auto' is searched at the stage's start "
                "by stagetrain.fit; in another driver run stagetrain.lr_search.search_lr and "
                "set the stage's auto_lr first"
            )
        return self.auto_lr

    @property
    def sampler(self) -> StageSampler | PacedSampler:
        """Built on first use: apportioning a long mixture takes a moment."""
        if self._sampler is None and self.paced is not None:
            order, pacing, labels = self.paced
            self._sampler = PacedSampler(
                order, pacing, self.batch_size, self.steps, self.seed, self.index, labels
            )
        if self._sampler is None:
            self._sampler = StageSampler(
                self.data.sizes, self.weights, self.batch_size, self.steps, self.seed, self.index
            )
        return self._sampler

    def lr(self, stage_step: int, step: int | None = None) -> float:
        """Learning rate at ``stage_step``: ``lr * warmup * schedule`` of the stage.

        With a curriculum-wide ``global_lr`` it is that schedule at the global ``step``
        (by default the planned global step of ``stage_step``).
        """
        if self.global_lr is not None:
            return self.global_lr(self.planned_start + stage_step if step is None else step)
        assert self.config.optimizer is not None
        return self.lr_peak * self.lr_shape(stage_step)

    def indices(self, stage_step: int, rank: int = 0, world_size: int = 1) -> Any:
        """Sample indices (into :attr:`data`) of this rank's share of ``stage_step``."""
        return self.sampler.rank_batch(stage_step, rank, world_size)

    def fetch(self, indices: np.ndarray) -> Batch:
        """The batch of ``indices`` (into :attr:`data`), cut to the stage's ``seq_len``."""
        return fit_length(
            self.data.get_batch(indices), self.config.seq_len, fmt=self.fmt, pad=False
        )

    def batch(self, stage_step: int, rank: int = 0, world_size: int = 1) -> Batch:
        """This rank's batch for ``stage_step`` (any structure; see :mod:`stagetrain.data`)."""
        return self.fetch(self.indices(stage_step, rank, world_size))

    def source_passes(self) -> np.ndarray:
        """Passes over each source the stage makes: samples drawn over the samples of one
        pass (a token source's pass is its tokens: ``samples_per_pass``; else its length)."""
        drawn = self.sampler.source_shares() * (self.batch_size * self.steps)
        per_pass = np.array(
            [float(getattr(d, "samples_per_pass", len(d))) for d in self.data.datasets]
        )
        return np.asarray(drawn / per_pass, dtype=float)

    def source_tokens(self, stage_step: int) -> dict[str, int] | None:
        """Tokens drawn from each source in the stage's first ``stage_step`` steps (all
        ranks), for mixtures with an exact per-source cursor; None otherwise."""
        cursor = getattr(self.sampler, "step_cursor", None)
        if cursor is None or len(self.sources) < 2:
            return None
        samples = cursor(min(stage_step, self.steps))
        return {
            s.label: int(n) * per
            for s, n, per in zip(self.sources, samples, self.tokens_per_source, strict=True)
        }

    def check_sources_fit(self) -> None:
        """Fetch one sample of every source as one batch: sources whose items cannot share a
        batch fail here, naming the stage, not at the stage boundary hours later."""
        if len(self.data.datasets) < 2:
            return
        try:
            self.fetch(self.data.offsets.copy())
        except StageTrainError as exc:
            raise type(exc)(f"stages[{self.index}].data: {exc}") from None

"""The curriculum as a DataLoader: one batch of indices per global step.

For training loops that want a ``DataLoader`` (the Hugging Face Trainer, Lightning):
:class:`StepBatchSampler` yields, for each global step from ``start``, this rank's
``(stage index, sample index)`` pairs, exactly the indices the built-in loop uses;
:class:`CurriculumDataset` turns such a list into the stage's batch (truncated to the
stage's ``seq_len``). The order is a function of the global step, so starting a new
loader at the resumed step continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from stagetrain.curriculum import Curriculum
from stagetrain.data import Batch, truncate

StepIndices = list[tuple[int, int]]


class StepBatchSampler(torch.utils.data.Sampler[StepIndices]):
    """Per global step from ``start``: this rank's ``[(stage_index, sample_index), ...]``."""

    def __init__(
        self, curriculum: Curriculum, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.curriculum = curriculum
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return max(self.curriculum.total_steps - self.start, 0)

    def __iter__(self) -> Iterator[StepIndices]:
        state = self.curriculum.state_at(self.start)
        for step in self.curriculum.steps(state, rank=self.rank, world_size=self.world_size):
            indices = step.stage.indices(step.stage_step, self.rank, self.world_size)
            yield [(step.stage.index, int(i)) for i in indices]


class CurriculumDataset(torch.utils.data.Dataset[Batch]):
    """Fetches a step's batch from its stage's data (``__getitems__`` receives one step)."""

    def __init__(self, curriculum: Curriculum) -> None:
        self.curriculum = curriculum

    def __len__(self) -> int:
        return sum(len(s.data) for s in self.curriculum.stages)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        return self.__getitems__([key])

    def __getitems__(self, keys: StepIndices) -> Batch:
        stage = self.curriculum.stages[keys[0][0]]
        indices = np.fromiter((i for _, i in keys), dtype=np.int64, count=len(keys))
        return truncate(stage.data.get_batch(indices), stage.config.seq_len)


def pass_through(batch: Batch) -> Batch:
    """Collate function for :class:`CurriculumDataset`: the batch is already built."""
    return batch


def step_loader(
    curriculum: Curriculum,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    **loader_kwargs: object,
) -> torch.utils.data.DataLoader[Batch]:
    """A DataLoader of this rank's batches for global steps ``start, start + 1, ...``."""
    return torch.utils.data.DataLoader(
        CurriculumDataset(curriculum),
        batch_sampler=StepBatchSampler(curriculum, start, rank, world_size),
        collate_fn=loader_kwargs.pop("collate_fn", pass_through),  # type: ignore[arg-type]
        **loader_kwargs,  # type: ignore[arg-type]
    )

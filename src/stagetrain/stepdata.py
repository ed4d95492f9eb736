"""The one data path: each step's (micro-)batches, for our loop and for the frameworks.

The indices of a step come from the stage's deterministic sampler; a step of
``micro_batches`` parts is cut into consecutive slices of this rank's indices, and
each slice is fetched as its own batch (padding, if any, is per micro-batch). The
built-in loop (:func:`stage_batches`) and the DataLoaders handed to the Hugging Face
Trainer or Lightning (:func:`step_loader`) both fetch through
:class:`CurriculumDataset`, so they see exactly the same batches in the same order.

* :class:`StepBatchSampler` yields, per global step of the planned timeline from
  ``start``, this rank's :class:`StepIndices` (stage, sample indices) — one per
  micro-batch.
  The order is a function of the global step, so a loader started at the resumed step
  continues exactly.
* :class:`StageStepSampler` does the same for one stage from a stage step (our loop,
  whose stages may end early by their advance rule).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from stagetrain.batch import Batch, pin
from stagetrain.curriculum import Curriculum, Stage


class StepIndices(NamedTuple):
    """One micro-batch's keys: its stage and the sample indices into the stage's data."""

    stage: int
    indices: np.ndarray


def micro_slices(n: int, parts: int) -> list[slice]:
    """``parts`` consecutive slices of ``range(n)`` of (nearly) equal size."""
    if parts < 1 or n < parts:
        raise ValueError(f"cannot cut {n} samples into {parts} micro-batches")
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def step_keys(
    stage: Stage, stage_step: int, rank: int, world_size: int, micro_batches: int = 1
) -> list[StepIndices]:
    """This rank's keys of one step, one :class:`StepIndices` per micro-batch."""
    indices = stage.indices(stage_step, rank, world_size)
    if micro_batches == 1:
        return [StepIndices(stage.index, indices)]
    return [
        StepIndices(stage.index, indices[part])
        for part in micro_slices(len(indices), micro_batches)
    ]


class StageStepSampler(torch.utils.data.Sampler[StepIndices]):
    """Per stage step from ``start`` to the stage's end: this rank's micro-batch index lists."""

    def __init__(
        self, stage: Stage, start: int, rank: int, world_size: int, micro_batches: int = 1
    ) -> None:
        self.stage, self.start = stage, start
        self.rank, self.world_size, self.micro_batches = rank, world_size, micro_batches

    def __len__(self) -> int:
        return max(self.stage.steps - self.start, 0) * self.micro_batches

    def __iter__(self) -> Iterator[StepIndices]:
        for step in range(self.start, self.stage.steps):
            yield from step_keys(self.stage, step, self.rank, self.world_size, self.micro_batches)


class StepBatchSampler(torch.utils.data.Sampler[StepIndices]):
    """Per global step of the planned timeline from ``start``: this rank's index lists."""

    def __init__(
        self,
        curriculum: Curriculum,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        micro_batches: int = 1,
    ) -> None:
        self.curriculum = curriculum
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.micro_batches = micro_batches

    def __len__(self) -> int:
        return max(self.curriculum.total_steps - self.start, 0) * self.micro_batches

    def __iter__(self) -> Iterator[StepIndices]:
        state = self.curriculum.state_at(self.start)
        for stage in self.curriculum.stages[state.stage_index :]:
            first = state.stage_step if stage.index == state.stage_index else 0
            for stage_step in range(first, stage.steps):
                yield from step_keys(
                    stage, stage_step, self.rank, self.world_size, self.micro_batches
                )


class CurriculumDataset(torch.utils.data.Dataset[Batch]):
    """Fetches a micro-batch from its stage's data (``__getitems__`` receives its keys)."""

    def __init__(self, curriculum: Curriculum) -> None:
        self.curriculum = curriculum

    def __len__(self) -> int:
        return sum(len(s.data) for s in self.curriculum.stages)

    def __getitem__(self, key: StepIndices) -> Batch:
        return self.__getitems__(key)

    def __getitems__(self, keys: StepIndices) -> Batch:
        return self.curriculum.stages[keys.stage].fetch(keys.indices)


def pass_through(batch: Batch) -> Batch:
    """Collate function for :class:`CurriculumDataset`: the batch is already built."""
    return batch


def stage_batches(
    curriculum: Curriculum,
    stage: Stage,
    start: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    micro_batches: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[list[Batch]]:
    """This rank's micro-batches of every step of ``stage`` from stage step ``start``.

    Yields one list of ``micro_batches`` batches per step. With ``workers > 0`` a
    DataLoader prepares them in worker processes; it hands batches out in sampler
    order, so the order is exactly the single-process one.
    """
    dataset = CurriculumDataset(curriculum)
    sampler = StageStepSampler(stage, start, rank, world_size, micro_batches)
    if workers == 0:
        source: Iterator[Batch] = (dataset.__getitems__(keys) for keys in sampler)
        if pin_memory:
            source = (pin(b) for b in source)
    else:
        source = iter(
            torch.utils.data.DataLoader(
                dataset,
                batch_sampler=sampler,  # type: ignore[arg-type]
                collate_fn=pass_through,
                num_workers=workers,
                pin_memory=pin_memory,
                prefetch_factor=4,
                multiprocessing_context="fork",  # stages hold closures (schedules): no pickling
            )
        )
    while True:
        step = [b for _, b in zip(range(micro_batches), source, strict=False)]
        if not step:
            return
        yield step


def step_loader(
    curriculum: Curriculum,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    micro_batches: int = 1,
    **loader_kwargs: object,
) -> torch.utils.data.DataLoader[Batch]:
    """A DataLoader of this rank's (micro-)batches for global steps ``start, start + 1, ...``."""
    return torch.utils.data.DataLoader(
        CurriculumDataset(curriculum),
        batch_sampler=StepBatchSampler(  # type: ignore[arg-type]
            curriculum, start, rank, world_size, micro_batches
        ),
        collate_fn=loader_kwargs.pop("collate_fn", pass_through),  # type: ignore[arg-type]
        **loader_kwargs,  # type: ignore[arg-type]
    )

"""A stage's training batches as a ``keras.utils.PyDataset``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import torch

from stagetrain.curriculum import Stage
from stagetrain.errors import DataError
from stagetrain.modelio import count_tokens


def to_numpy(value: Any) -> Any:
    """``value`` with every tensor turned into a NumPy array (tuples, lists, dicts kept)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Mapping):
        return {k: to_numpy(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_numpy(v) for v in value)
    raise DataError(f"batch: cannot hand {type(value).__name__} to Keras (expected tensors)")


def batch_to_numpy(batch: Any, *, field: str = "batch") -> tuple[Any, Any]:
    """A stagetrain ``(inputs, targets)`` batch as Keras' ``(x, y)`` NumPy pair."""
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        kind = type(batch).__name__
        if isinstance(batch, tuple | list):
            kind = f"a {kind} of {len(batch)}"
        raise DataError(f"{field}: the Keras adapter trains on (inputs, targets) pairs, got {kind}")
    return to_numpy(batch[0]), to_numpy(batch[1])


class StageDataset(keras.utils.PyDataset):
    """Stage steps ``start, start + 1, ...`` of ``stage``: item ``i`` is step ``start + i``.

    Each item is exactly the batch stagetrain's own loop trains on at that stage step
    (``Stage.batch``, the sampler's indices truncated to the stage's ``seq_len``), as
    NumPy arrays. They must not be shuffled (``fit(..., shuffle=False)``, which
    :func:`~stagetrain.integrations.keras.fit_keras` passes). Batches are prepared in
    the training process: with worker threads, Keras 3.15's enqueuer replays the batches
    it prefetched while ``fit`` peeks at the first one.

    Args:
        stage: a built stage of a :class:`~stagetrain.Curriculum`.
        start: the first stage step (a resumed stage starts past 0).
        rank: this process's rank (for a data-parallel split of the batch).
        world_size: number of processes sharing each global batch.
    """

    def __init__(self, stage: Stage, start: int = 0, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        if not 0 <= start <= stage.steps:
            raise ValueError(f"start {start} outside stage {stage.name!r}'s {stage.steps} steps")
        self.stage = stage
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.real_tokens: dict[int, int] = {}
        """Non-padding tokens of each fetched stage step (token batches only)."""

    def __len__(self) -> int:
        return self.stage.steps - self.start

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside {len(self)} steps")
        step = self.start + index
        batch = self.stage.batch(step, self.rank, self.world_size)
        tokens = count_tokens(batch, self.stage.io)
        if tokens is not None:
            self.real_tokens[step] = int(tokens)
        return batch_to_numpy(batch, field=f"stage {self.stage.name!r} step {step}")

"""Data sources and batches.

A *source* is any map-style dataset (``__len__`` and ``__getitem__``) whose items are
``(input, target)`` pairs. A dataset may offer ``get_batch(indices)`` returning a
ready ``(inputs, targets)`` pair; stagetrain then fetches a whole batch in one call
instead of collating item by item, which matters for small, fast models.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import default_collate

from stagetrain.config import SourceConfig
from stagetrain.errors import DataError
from stagetrain.registry import BUILTIN_SOURCES, call_factory, resolve_factory

Batch = tuple[torch.Tensor, torch.Tensor]
"""``(inputs, targets)``, each with the batch as its first dimension."""


@runtime_checkable
class MapDataset(Protocol):
    """What stagetrain needs of a dataset: a length and integer indexing."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class TensorPairDataset:
    """An in-memory ``(inputs, targets)`` dataset with a vectorised ``get_batch``."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise DataError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Batch:
        return self.inputs[index], self.targets[index]

    def get_batch(self, indices: np.ndarray) -> Batch:
        idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        return self.inputs[idx], self.targets[idx]


def fetch(dataset: Any, indices: np.ndarray) -> Batch:
    """The batch of ``dataset`` at ``indices`` (a fast path when ``get_batch`` exists)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    items = [dataset[int(i)] for i in indices]
    batch = default_collate(items)
    if not isinstance(batch, list | tuple) or len(batch) != 2:
        raise DataError(
            f"dataset {type(dataset).__name__}: items must be (input, target) pairs, "
            f"got {type(items[0]).__name__}"
        )
    return batch[0], batch[1]


def truncate(batch: Batch, seq_len: int | None) -> Batch:
    """Cut token sequences to ``seq_len`` along the last dimension.

    The target is cut as well when it has the same shape as the input (next-token
    targets); class labels are left alone.
    """
    inputs, targets = batch
    if seq_len is None or inputs.dim() < 2 or inputs.shape[-1] <= seq_len:
        return batch
    if targets.shape == inputs.shape:
        targets = targets[..., :seq_len]
    return inputs[..., :seq_len], targets


class ConcatSources:
    """Several sources seen as one index space: source ``k`` starts at ``offsets[k]``."""

    def __init__(self, datasets: Sequence[Any]) -> None:
        self.datasets = list(datasets)
        self.sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Fetch from each source in turn, keeping the order of ``indices``."""
        if len(self.datasets) == 1:
            return fetch(self.datasets[0], indices)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        parts: list[Batch] = []
        positions: list[np.ndarray] = []
        for k in np.unique(which):
            pos = np.nonzero(which == k)[0]
            parts.append(fetch(self.datasets[k], indices[pos] - self.offsets[k]))
            positions.append(pos)
        order = torch.from_numpy(np.argsort(np.concatenate(positions), kind="stable"))
        inputs = torch.cat([p[0] for p in parts])[order]
        targets = torch.cat([p[1] for p in parts])[order]
        return inputs, targets


class SourceBuilder:
    """Builds data sources from their configs, once each, with clear errors.

    The same source used by several stages, replay and evaluations is built once:
    the cache key is the source's canonical config.
    """

    def __init__(self, seed: int, datasets: Mapping[str, Any] | None = None) -> None:
        self.seed = seed
        self.datasets = dict(datasets or {})
        self._cache: dict[str, Any] = {}

    def build(self, source: SourceConfig, *, field: str) -> Any:
        """The dataset behind ``source``; ``field`` names the config field in errors."""
        if source.dataset is not None:
            return _check_dataset(source.dataset, field)
        if source.ref is not None:
            if source.ref not in self.datasets:
                known = ", ".join(sorted(self.datasets)) or "none"
                raise DataError(
                    f"{field}: no in-memory dataset named {source.ref!r} was passed to fit(); "
                    f"passed: {known}"
                )
            return _check_dataset(self.datasets[source.ref], field)
        key = json.dumps(
            {"b": source.builtin, "f": source.factory, "a": source.args},
            sort_keys=True,
            default=str,
        )
        if key not in self._cache:
            factory = resolve_factory(
                builtin=source.builtin,
                factory=source.factory,
                table=BUILTIN_SOURCES,
                field=field,
                kind="dataset",
            )
            args = dict(source.args)
            if "seed" not in args and _accepts(factory, "seed"):
                # Data generated by a recipe follows the curriculum seed unless pinned.
                args["seed"] = self.seed
            dataset = call_factory(
                factory, args, error=DataError, what=f"{field}: building {source.label!r}"
            )
            self._cache[key] = _check_dataset(dataset, field)
        return self._cache[key]


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_dataset(dataset: Any, field: str) -> Any:
    if not isinstance(dataset, MapDataset):
        raise DataError(
            f"{field}: expected a map-style dataset (with __len__ and __getitem__), "
            f"got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise DataError(f"{field}: the dataset is empty")
    return dataset


def tokens_per_sample(dataset: Any, seq_len: int | None) -> int:
    """Tokens in one sample: ``seq_len`` if set, the length of integer sequence inputs, else 1."""
    if seq_len is not None:
        inputs, _ = fetch(dataset, np.array([0]))
        return min(seq_len, int(inputs.shape[-1])) if inputs.dim() >= 2 else 1
    inputs, _ = fetch(dataset, np.array([0]))
    if inputs.dim() >= 2 and not torch.is_floating_point(inputs):
        return int(inputs.shape[-1])
    return 1


class IndexSubset:
    """The samples ``indices`` of ``dataset`` (a view: no data is copied)."""

    def __init__(self, dataset: Any, indices: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(self.indices[index])]

    def get_batch(self, indices: np.ndarray) -> Batch:
        return fetch(self.dataset, self.indices[np.asarray(indices, dtype=np.int64)])

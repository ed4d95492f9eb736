"""Data sources: the item protocol, fetching batches, mixtures of sources.

A *source* is any map-style dataset (``__len__`` and ``__getitem__``). Its items may
be ``(input, target)`` pairs, tuples, mappings (``{"input_ids", "attention_mask",
"labels"}``) or dataclasses of tensors, arrays, numbers or lists; variable-length
sequences are padded when collated (see :mod:`stagetrain.collate`). Optional methods:

``get_batch(indices) -> batch``
    a whole batch in one call (vectorised; matters for small, fast models);
``collate_fn(items) -> batch``
    the source's own collation, used instead of the built-in one;
``with_seq_len(seq_len) -> dataset``
    a view whose samples have the given sequence length (token files read as windows
    of the stage's context length); called with each stage's and evaluation's
    ``seq_len``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from stagetrain.batch import Batch, BatchFormat, concat, fit_length, select, sequence_length
from stagetrain.collate import collate
from stagetrain.config import SourceConfig
from stagetrain.errors import DataError
from stagetrain.registry import BUILTIN_SOURCES, call_factory, resolve_factory
from stagetrain.seeding import derive_seed, seeded


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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        return self.inputs[idx], self.targets[idx]


def fetch(dataset: Any, indices: np.ndarray, fmt: BatchFormat | None = None) -> Batch:
    """The batch of ``dataset`` at ``indices``: its ``get_batch``, else its items collated
    (by its ``collate_fn`` when it has one, else with padding, see :mod:`stagetrain.collate`)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    items = [dataset[int(i)] for i in indices]
    own = getattr(dataset, "collate_fn", None)
    return own(items) if callable(own) else collate(items, fmt)


class ConcatSources:
    """Several sources seen as one index space: source ``k`` starts at ``offsets[k]``.

    A batch drawn from several sources is concatenated in the order of the indices;
    sources of different sequence lengths are padded to the longest first (cut to the
    stage's ``seq_len`` when one is set), so a mixture of short and long documents —
    or the replay of a short-context stage inside a long-context one — is one batch.
    """

    def __init__(
        self, datasets: Sequence[Any], fmt: BatchFormat | None = None, seq_len: int | None = None
    ) -> None:
        self.datasets = list(datasets)
        self.fmt = fmt or BatchFormat()
        self.seq_len = seq_len
        self.sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Fetch from each source in turn, keeping the order of ``indices``."""
        if len(self.datasets) == 1:
            return fetch(self.datasets[0], indices, self.fmt)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        parts: list[Batch] = []
        positions: list[np.ndarray] = []
        for k in np.unique(which):
            pos = np.nonzero(which == k)[0]
            parts.append(fetch(self.datasets[k], indices[pos] - self.offsets[k], self.fmt))
            positions.append(pos)
        if len(parts) == 1:
            return parts[0]
        lengths = {n for n in (sequence_length(p) for p in parts) if n is not None}
        if len(lengths) > 1:
            target = max(lengths) if self.seq_len is None else min(self.seq_len, max(lengths))
            parts = [fit_length(p, target, fmt=self.fmt) for p in parts]
        order = torch.from_numpy(np.argsort(np.concatenate(positions), kind="stable"))
        try:
            return select(concat(parts), order)
        except (RuntimeError, ValueError) as exc:
            raise DataError(
                f"the sources of one batch do not fit together ({str(exc).splitlines()[0]}); "
                "sources mixed in a stage need the same item structure and shapes (only the "
                "sequence length may differ)"
            ) from None


class SourceBuilder:
    """Builds data sources from their configs, once each, with clear errors.

    The same source used by several stages, replay and evaluations is built once:
    the cache key is the source's canonical config.
    """

    def __init__(self, seed: int, datasets: Mapping[str, Any] | None = None) -> None:
        self.seed = seed
        self.datasets = dict(datasets or {})
        self._cache: dict[str, Any] = {}
        self._views: dict[tuple[int, int], Any] = {}

    def build(self, source: SourceConfig, *, field: str, seq_len: int | None = None) -> Any:
        """The dataset behind ``source``; ``field`` names the config field in errors.

        ``seq_len``: a source with ``with_seq_len`` is viewed at that sequence length.
        """
        dataset = self._build(source, field=field)
        if seq_len is not None and hasattr(dataset, "with_seq_len"):
            key = (id(dataset), seq_len)
            if key not in self._views:
                view = call_factory(
                    dataset.with_seq_len,
                    {"seq_len": seq_len},
                    error=DataError,
                    what=f"{field}: viewing {source.label!r} at seq_len {seq_len}",
                )
                self._views[key] = view
            dataset = self._views[key]
        return _check_dataset(dataset, field)

    def _build(self, source: SourceConfig, *, field: str) -> Any:
        """The dataset itself (not yet checked: a sequence-length view may come first)."""
        if source.dataset is not None:
            return source.dataset
        if source.ref is not None:
            if source.ref not in self.datasets:
                known = ", ".join(sorted(self.datasets)) or "none"
                raise DataError(
                    f"{field}: no in-memory dataset named {source.ref!r} was passed to fit(); "
                    f"passed: {known}"
                )
            return self.datasets[source.ref]
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
            # A factory drawing from the global generators gets the same draws on every run
            # of the same command, whatever was built before it.
            with seeded(derive_seed(self.seed, key)):
                dataset = call_factory(
                    factory, args, error=DataError, what=f"{field}: building {source.label!r}"
                )
            self._cache[key] = dataset
        return self._cache[key]


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_dataset(dataset: Any, field: str) -> Any:
    if not isinstance(dataset, MapDataset) and not hasattr(dataset, "get_batch"):
        raise DataError(
            f"{field}: expected a map-style dataset (with __len__ and __getitem__), "
            f"got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise DataError(f"{field}: the dataset is empty")
    return dataset


def tokens_per_sample(dataset: Any, seq_len: int | None, fmt: BatchFormat | None = None) -> int:
    """Tokens in one sample (its sequence length, at most ``seq_len``), or 1 for non-token data.

    Nominal: a source of variable-length documents counts its first sample, padding
    included. The logs count real tokens separately (``tokens_real``).
    """
    length = sequence_length(fetch(dataset, np.array([0]), fmt))
    if length is None:
        return 1
    return min(seq_len, length) if seq_len is not None else length


def mixture_tokens_per_sample(
    datasets: Sequence[Any], shares: Sequence[float], seq_len: int | None, fmt: BatchFormat
) -> int:
    """Tokens per sample of a mixture: the sources' counts weighted by their shares, rounded."""
    counts = [tokens_per_sample(d, seq_len, fmt) for d in datasets]
    total = sum(shares)
    if total <= 0:
        return counts[0]
    return max(1, round(sum(c * s for c, s in zip(counts, shares, strict=True)) / total))


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

    def __getattr__(self, name: str) -> Any:
        if name == "collate_fn":  # the subset collates like the dataset it views
            return getattr(self.dataset, name)
        raise AttributeError(name)

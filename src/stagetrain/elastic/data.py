"""Budget-assigned data: which budget each sample trains at, carried beside its tokens.

A stage assigns budgets through an ordinary weighted mixture of sources, one per budget
(``weight`` may be a schedule), so the sampler's guarantees hold for budgets too: the
assignment of every sample is a function of (seed, stage, step), resumes exactly and
shards across ranks without communication.

:class:`BudgetItems` (built-in source ``elastic_text``) wraps a token source of
``(input, target)`` pairs and yields dict items ``{"input_ids", "labels", "budget"}``:
called as ``model(**batch)`` (labels left to the loss), the budget reaches the elastic
model beside the token ids, and a teacher given the same batch without ``budget`` sees
the real tokens. It offers ``get_batch`` (one call per batch) and ``with_seq_len``.
Every elastic model (:class:`~stagetrain.elastic.model.ElasticGPT` and
:class:`~stagetrain.elastic.hf.ElasticModel`) takes its budget this way; the token ids
are never altered.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stagetrain.data import _accepts, fetch
from stagetrain.errors import DataError
from stagetrain.registry import BUILTIN_SOURCES, call_factory, resolve_factory


def _inner(source: str, args: dict[str, Any] | None, seed: int, what: str) -> Any:
    factory = resolve_factory(
        builtin=source, factory=None, table=BUILTIN_SOURCES, field="args.source", kind="data"
    )
    inner_args = dict(args or {})
    if "seed" not in inner_args and _accepts(factory, "seed"):
        inner_args["seed"] = seed
    return call_factory(factory, inner_args, error=DataError, what=f"{what}: building {source!r}")


class BudgetItems:
    """``dataset`` (``(input, target)`` token pairs) as dict items at budget ``budget``."""

    def __init__(self, dataset: Any, *, budget: int, seq_len: int | None = None) -> None:
        if budget < 0:
            raise DataError(f"elastic_text: budget must be >= 0, got {budget}")
        if seq_len is not None and seq_len < 1:
            raise DataError(f"elastic_text: seq_len must be >= 1, got {seq_len}")
        self.dataset = dataset
        self.budget = budget
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.dataset)

    def with_seq_len(self, seq_len: int) -> BudgetItems:
        """The same items cut to ``seq_len`` tokens (the stage's context)."""
        return BudgetItems(self.dataset, budget=self.budget, seq_len=seq_len)

    def _items(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.seq_len is not None:
            inputs, targets = inputs[..., : self.seq_len], targets[..., : self.seq_len]
        shape = inputs.shape[:-1]
        budget = torch.full(shape, self.budget, dtype=torch.long)
        return {"input_ids": inputs, "labels": targets, "budget": budget}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        inputs, targets = self.dataset[index]
        return self._items(torch.as_tensor(inputs), torch.as_tensor(targets))

    def get_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        inputs, targets = fetch(self.dataset, indices)
        return self._items(inputs, targets)


def budget_items(
    *,
    budget: int,
    source: str = "stdlib_text",
    args: dict[str, Any] | None = None,
    seq_len: int | None = None,
    seed: int = 0,
) -> BudgetItems:
    """A built-in token source (default: the stdlib text) as dict items at ``budget``."""
    return BudgetItems(_inner(source, args, seed, "elastic_text"), budget=budget, seq_len=seq_len)

"""Budget-tagged data: the budget a sample trains at, carried inside its token ids.

A stage assigns budgets through an ordinary weighted mixture of tagged sources, one
per budget (``weight`` may be a schedule), so the sampler's guarantees hold for budgets
too: the assignment of every sample is a function of (seed, stage, step), resumes
exactly and shards across ranks without communication. Token ``t`` of a sample tagged
``b`` is fed as ``t + vocab * b``; :class:`~stagetrain.elastic.model.ElasticGPT`
splits it back. Targets are left untagged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stagetrain.data import _accepts, fetch
from stagetrain.errors import DataError
from stagetrain.registry import BUILTIN_SOURCES, call_factory, resolve_factory


class BudgetTagged:
    """``dataset`` with every input token id shifted by ``vocab * budget``."""

    def __init__(self, dataset: Any, *, budget: int, vocab: int) -> None:
        if budget < 0 or vocab < 1:
            raise DataError(
                f"budget_text: budget must be >= 0 and vocab >= 1 (got {budget}, {vocab})"
            )
        self.dataset = dataset
        self.offset = vocab * budget
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.dataset)

    def _tag(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs + self.offset

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.dataset[index]
        return self._tag(torch.as_tensor(inputs)), torch.as_tensor(targets)

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = fetch(self.dataset, indices)
        return self._tag(inputs), targets


def budget_tagged(
    *,
    budget: int,
    source: str = "stdlib_text",
    args: dict[str, Any] | None = None,
    vocab: int = 256,
    seed: int = 0,
) -> BudgetTagged:
    """A built-in token source (default: the stdlib text) tagged with budget index ``budget``."""
    factory = resolve_factory(
        builtin=source, factory=None, table=BUILTIN_SOURCES, field="args.source", kind="data"
    )
    inner_args = dict(args or {})
    if "seed" not in inner_args and _accepts(factory, "seed"):
        inner_args["seed"] = seed
    dataset = call_factory(
        factory, inner_args, error=DataError, what=f"budget_tagged: building {source!r}"
    )
    return BudgetTagged(dataset, budget=budget, vocab=vocab)

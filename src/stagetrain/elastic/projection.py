"""Projection onto a budget's target: the nearest configuration within tolerance.

:meth:`~stagetrain.elastic.router.BudgetRouter.project` pins each budget, from the
largest down, to the configuration nearest the router's current choice (fewest steps
along the axes, each capped by the larger budgets' pins) whose parameter count is
within the tolerance of the target; :func:`nearest_within` is that search.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stagetrain.errors import ConfigError

# The search goes outward from the current choice; it gives up after this many.
MAX_SEARCH = 1_000_000


def nearest_within(
    start: torch.Tensor,
    cap: torch.Tensor,
    cost: Callable[[torch.Tensor], Any],
    target: float,
    tolerance: float,
    name: str,
) -> torch.Tensor:
    """The choice-index vector ``<= cap`` nearest ``start`` (L1 steps along the axes)
    whose ``cost`` is within ``tolerance`` of ``target``; among equally near ones the
    closest to the target. A breadth-first search outward from ``start``."""
    origin = tuple(torch.minimum(start, cap).tolist())
    limit = cap.tolist()
    frontier = [origin]
    seen = {origin}
    while frontier and len(seen) <= MAX_SEARCH:
        index = torch.tensor(frontier)
        miss = (torch.as_tensor(cost(index), dtype=torch.float64) / target - 1).abs()
        if bool((miss <= tolerance).any()):
            best = int(torch.where(miss <= tolerance, miss, torch.inf).argmin())
            return index[best]
        following = []
        for point in frontier:
            for axis, value in enumerate(point):
                for step in (-1, 1):
                    moved = value + step
                    if 0 <= moved <= limit[axis]:
                        neighbour = (*point[:axis], moved, *point[axis + 1 :])
                        if neighbour not in seen:
                            seen.add(neighbour)
                            following.append(neighbour)
        frontier = following
    raise ConfigError(
        f"budget {name!r}: no configuration nested in the larger budgets' is within "
        f"{tolerance:.0%} of its target: offer finer choices or widen the tolerance"
    )

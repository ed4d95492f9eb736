"""What every elastic model shares: the router, the layer ranking, the budget side channel.

An elastic model (:class:`~stagetrain.elastic.model.ElasticGPT`, or
:class:`~stagetrain.elastic.hf.ElasticModel` around a Hugging Face model) is an
:class:`ElasticHost`: it has a family, the module that family describes (``root``),
:class:`~stagetrain.elastic.masking.MaskHooks` on that module, a ``layer_rank`` buffer
and, when it has budgets, a :class:`~stagetrain.elastic.space.Space` and a
:class:`~stagetrain.elastic.router.BudgetRouter`. Importance ranking, budget checks
and extraction work on any host.

The budget travels beside the inputs, never inside them: one budget index per sample
(an int64 tensor, or one name for the whole batch), passed as ``budget=``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from stagetrain.elastic.family import Family
from stagetrain.elastic.masking import MaskHooks, Masks
from stagetrain.elastic.router import BudgetRouter, BudgetSpec
from stagetrain.elastic.space import Space
from stagetrain.errors import ConfigError


class ElasticHost(Protocol):
    """An elastic model (see the module docstring)."""

    family: Family
    hooks: MaskHooks
    layer_rank: torch.Tensor
    router: BudgetRouter | None
    space: Space | None
    training: bool

    @property
    def root(self) -> nn.Module:
        """The module the family describes (its parameter names follow the family's)."""
        ...

    def plain_logits(self, batch: Any) -> torch.Tensor:
        """Logits of the full model (no masks) for a calibration ``batch``."""
        ...

    def budget_logits(self, batch: Any, budget: int) -> torch.Tensor:
        """Logits of the masked model at budget index ``budget``."""
        ...


def build_router(
    family: Family,
    budgets: Sequence[Mapping[str, Any]] | None,
    choices: Mapping[str, Sequence[int]] | None,
    router: Mapping[str, Any] | None,
    heterogeneous: bool,
) -> tuple[Space | None, BudgetRouter | None]:
    """The space and router of ``budgets`` and ``choices`` (both or neither)."""
    if budgets is None and choices is None:
        return None, None
    if budgets is None or choices is None:
        raise ConfigError("an elastic model needs both 'budgets' and 'choices'")
    space = Space(family, choices, heterogeneous=heterogeneous)
    specs = [BudgetSpec(**b) for b in budgets]
    return space, BudgetRouter(specs, space, **dict(router or {}))


def masks_for(
    space: Space, selection: Mapping[str, torch.Tensor], layer_rank: torch.Tensor
) -> Masks:
    """Per-sample masks from one-hot choices ``{axis: (B, n_choices)}``."""
    sizes = space.family.sizes
    out = {axis.name: selection[axis.name] @ space.keep_matrix(axis, layer_rank)
           for axis in space.axes}  # fmt: skip
    batch = out["width"].shape[0]
    heads, neurons = [], []
    for layer in range(sizes.layers):
        suffix = f"_{layer}" if space.heterogeneous else ""
        head = out["heads" + suffix].repeat_interleave(sizes.head_dim, dim=-1)
        heads.append(head.view(batch, 1, -1))
        neurons.append(out["ffn" + suffix].view(batch, 1, -1))
    return Masks(
        channels=out["width"].view(batch, 1, -1),
        heads=heads,  # type: ignore[arg-type]
        neurons=neurons,  # type: ignore[arg-type]
        layers=out["depth"],
    )


def budget_index(router: BudgetRouter | None, budget: Any, batch: int, device: Any) -> torch.Tensor:
    """``budget=`` as a ``(batch,)`` int64 tensor: per-sample indices, one index, or one
    budget name for the whole batch."""
    if router is None:
        raise ConfigError("budget=: this model has no budgets (build it with budgets and choices)")
    if isinstance(budget, str):
        try:
            budget = router.index(budget)
        except KeyError as exc:
            raise ConfigError(f"budget=: {exc.args[0]}") from None
    index = torch.as_tensor(budget, device=device)
    if index.is_floating_point():
        raise ConfigError(f"budget=: expected integer budget indices, got {index.dtype}")
    index = index.long().reshape(-1)
    if index.numel() == 1 and batch != 1:
        index = index.expand(batch)
    if index.numel() != batch:
        raise ConfigError(f"budget=: {index.numel()} budgets for a batch of {batch} samples")
    return index


def route(host: Any, budget: torch.Tensor) -> Masks:
    """Run the host's router for ``budget``; stores the router loss on the host."""
    assert host.router is not None and host.space is not None
    selection, host.router_loss = host.router(
        budget, training=host.training, layer_rank=host.layer_rank
    )
    return masks_for(host.space, selection, host.layer_rank)

"""Routers that turn a budget into a nested configuration, and the parameter cost.

One small network per axis (width, heads, ffn, depth): one-hot budget -> Linear ->
LeakyReLU -> Linear -> logits over that axis's choices, sampled with a straight-through
Gumbel-softmax while training (argmax in evaluation): the forward pass uses an exact
one-hot choice, the gradient is that of the relaxed sample. The temperature anneals
geometrically from ``tau[0]`` to ``tau[1]`` and the logit scale linearly from
``scale[0]`` to ``scale[1]`` over ``anneal_forwards`` training forward passes (counted in
a buffer, so a resumed run continues the annealing exactly). The router loss is
``|params / target - 1|`` with the parameter count of the relaxed sample (exact for the
one-hot choice as the temperature falls; the count is a sum of products of distinct
axes' sizes, so it is smooth in every router's probabilities).

Nesting is enforced, not hoped for: with budgets ordered by target, each axis's choice
of a budget is capped at the choice of every larger budget (a running minimum), so the
components of a smaller budget are always a subset of a larger one's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

AXES = ("width", "heads", "ffn", "depth")


class BudgetSpec(BaseModel):
    """A named budget: ``target`` is the fraction of the full model's parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    target: float = Field(gt=0, le=1)


def param_count(
    *, vocab: Any, context: Any, width: Any, heads: Any, head_dim: Any, ffn: Any, layers: Any
) -> Any:
    """Parameters of an :class:`~stagetrain.elastic.model.ElasticGPT` of these sizes.

    Works on ints and on tensors (then differentiable in the sizes).
    """
    inner = heads * head_dim
    per_layer = (
        2 * width  # ln1
        + width * 3 * inner + 3 * inner  # qkv
        + inner * width + width  # proj
        + 2 * width  # ln2
        + width * ffn + ffn  # fc1
        + ffn * width + width  # fc2
    )  # fmt: skip
    return (vocab + context) * width + layers * per_layer + 2 * width + width * vocab + vocab


class BudgetRouter(nn.Module):
    """Per-axis routers for a set of budgets (see the module docstring)."""

    order: torch.Tensor
    targets: torch.Tensor
    forwards: torch.Tensor
    is_full: torch.Tensor

    def __init__(
        self,
        budgets: list[BudgetSpec],
        choices: dict[str, list[int]],
        *,
        full: dict[str, int],
        arch: dict[str, int],
        hidden: int = 256,
        anneal_forwards: int = 1000,
        tau: tuple[float, float] = (1.0, 0.05),
        scale: tuple[float, float] = (1.0, 10.0),
    ) -> None:
        super().__init__()
        if not budgets:
            raise ValueError("budgets: at least one budget is needed")
        names = [b.name for b in budgets]
        if len(set(names)) != len(names):
            raise ValueError(f"budgets: names must be unique, got {names}")
        if set(choices) != set(AXES):
            raise ValueError(f"choices: needs exactly the axes {list(AXES)}, got {sorted(choices)}")
        for axis in AXES:
            values = list(choices[axis])
            if not values or values != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"choices.{axis}: must be distinct positive sizes, ascending")
            if values[-1] != full[axis]:
                raise ValueError(
                    f"choices.{axis}: the largest choice must be the full size {full[axis]}"
                )
        if anneal_forwards < 1 or min(tau) <= 0 or min(scale) <= 0:
            raise ValueError("router: anneal_forwards, tau and scale must be positive")
        self.budgets = list(budgets)
        self.choices = {axis: list(choices[axis]) for axis in AXES}
        self.arch = dict(arch)
        self.anneal_forwards = anneal_forwards
        self.tau, self.scale = tuple(tau), tuple(scale)
        self.nets = nn.ModuleDict(
            {
                axis: nn.Sequential(
                    nn.Linear(len(budgets), hidden),
                    nn.LeakyReLU(),
                    nn.Linear(hidden, len(self.choices[axis])),
                )
                for axis in AXES
            }
        )
        # Budgets from the largest target down: the order in which choices are capped.
        order = sorted(range(len(budgets)), key=lambda i: -budgets[i].target)
        self.register_buffer("order", torch.tensor(order))
        self.register_buffer("targets", torch.tensor([b.target for b in budgets]))
        for axis in AXES:
            self.register_buffer(f"sizes_{axis}", torch.tensor(self.choices[axis]).float())
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.register_buffer("is_full", self.targets >= 1.0)

    def index(self, name: str) -> int:
        """Position of the budget called ``name`` (its tag)."""
        for i, budget in enumerate(self.budgets):
            if budget.name == name:
                return i
        raise KeyError(f"no budget {name!r}; budgets are {[b.name for b in self.budgets]}")

    def annealing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(temperature, logit scale)`` at the current training progress (as tensors,
        so reading the counter never waits on the device)."""
        progress = (self.forwards.float() / self.anneal_forwards).clamp(max=1.0)
        tau = self.tau[0] * (self.tau[1] / self.tau[0]) ** progress
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * progress
        return tau, scale

    def keep_matrix(self, axis: str, layer_rank: torch.Tensor) -> torch.Tensor:
        """``(n_choices, size)``: 1 where choice ``c`` keeps component ``j``."""
        sizes = getattr(self, f"sizes_{axis}")
        if axis == "depth":
            positions = layer_rank.float()
        else:
            positions = torch.arange(int(sizes[-1]), device=sizes.device).float()
        return (positions[None, :] < sizes[:, None]).float()

    def select(
        self, training: bool, *, relaxed: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """One-hot choices ``{axis: (n_budgets, n_choices)}`` for every budget, nested.

        The forward value is exactly one-hot; the gradient is that of the budget's own
        (Gumbel-)softmax sample (straight-through), also when its choice was capped.
        ``relaxed``, when given, receives those soft samples (for the cost term).
        """
        eye = torch.eye(len(self.budgets), device=self.targets.device)
        tau, scale = self.annealing()
        selection = {}
        for axis in AXES:
            logits = self.nets[axis](eye) * scale
            if training:
                gumbel = -torch.empty_like(logits).exponential_().log()
                soft = torch.softmax((logits + gumbel) / tau, dim=-1)
            else:
                soft = torch.softmax(logits / tau, dim=-1)
            index = soft.argmax(-1)
            # A budget of target 1.0 is the parent itself: every axis at its full size.
            index = torch.where(self.is_full, len(self.choices[axis]) - 1, index)
            # Cap each budget's choice at every larger budget's: a running minimum in
            # target order, so smaller budgets are always nested in larger ones.
            capped = torch.empty_like(index).index_copy(
                0, self.order, torch.cummin(index[self.order], dim=0).values
            )
            hard = F.one_hot(capped, len(self.choices[axis])).to(soft.dtype)
            selection[axis] = hard + (soft - soft.detach())  # exactly one-hot forward
            if relaxed is not None:
                relaxed[axis] = soft
        return selection

    def params_of(self, sizes: dict[str, Any]) -> Any:
        """Parameters of a configuration ``{axis: size}`` (ints, or tensors per budget)."""
        return param_count(
            vocab=self.arch["vocab"], context=self.arch["context"], width=sizes["width"],
            heads=sizes["heads"], head_dim=self.arch["head_dim"], ffn=sizes["ffn"],
            layers=sizes["depth"],
        )  # fmt: skip

    def cost(self, selection: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parameters of each budget's chosen configuration, ``(n_budgets,)``."""
        return self.params_of(
            {axis: selection[axis] @ getattr(self, f"sizes_{axis}") for axis in AXES}
        )

    def forward(
        self, budget: torch.Tensor, *, training: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample one-hot choices for ``budget`` (``(B,)`` indices) and the router loss."""
        if training:
            self.forwards += 1
        relaxed: dict[str, torch.Tensor] = {}
        selection = self.select(training, relaxed=relaxed)
        full = param_count(**self.arch)
        # The cost of the relaxed sample: smooth in the router's logits, and equal to the
        # chosen configuration's cost as the temperature anneals toward zero.
        per_budget = (self.cost(relaxed) / (self.targets * full) - 1).abs()
        return {axis: sel[budget] for axis, sel in selection.items()}, per_budget[budget].mean()

    @torch.no_grad()
    def configuration(self, name: str) -> dict[str, int]:
        """The sizes the (evaluation-mode) router picks for budget ``name``."""
        index = self.index(name)
        selection = self.select(training=False)
        return {
            axis: int(self.choices[axis][int(selection[axis][index].argmax())]) for axis in AXES
        }

    def describe(self) -> str:
        """One line per budget: its configuration and parameter count against its target."""
        full = param_count(**self.arch)
        lines = []
        for budget in self.budgets:
            config = self.configuration(budget.name)
            params = self.params_of(config)
            lines.append(
                f"{budget.name}: {config} -> {params:,} params "
                f"({params / full:.3f} of full; target {budget.target:.3f})"
            )
        return "\n".join(lines)

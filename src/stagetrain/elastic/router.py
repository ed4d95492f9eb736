"""Routers that turn a budget into a nested configuration, and the router loss.

One small network per axis of the :class:`~stagetrain.elastic.space.Space`: one-hot
budget -> Linear -> LeakyReLU -> Linear -> logits over that axis's choices, sampled
with a straight-through Gumbel-softmax while training (argmax in evaluation): the
forward pass uses an exact one-hot choice, the gradient is that of the relaxed sample.
The temperature anneals geometrically from ``tau[0]`` to ``tau[1]`` and the logit scale
linearly from ``scale[0]`` to ``scale[1]`` over ``anneal_forwards`` training forward
passes (counted in a buffer, so a resumed run continues the annealing exactly).

The router loss is ``E |params / target - 1|`` under the router's sampling distribution
(the Gumbel-max sample of ``softmax(scale * logits)`` follows that distribution whatever
the temperature). ``cost="exact"`` sums it over every configuration of the grid (at
most ``MAX_GRID``): noise-free. ``cost="sampled"`` estimates it from ``samples`` draws
per budget with a score-function gradient and a leave-one-out baseline: for grids too
large to enumerate, such as per-layer (heterogeneous) widths. ``"auto"`` (default)
takes the exact sum when the grid allows. While the anneal runs, an entropy bonus
(weight ``entropy``, falling linearly to zero) keeps the choices open, so a budget does
not commit early to a configuration that misses its target.

Nesting is enforced, not hoped for: with budgets ordered by target, each axis's choice
of a budget is capped at the choice of every larger budget (a running minimum), so the
components of a smaller budget are always a subset of a larger one's.

Budgets honoured: :meth:`BudgetRouter.project` pins every budget to the configuration
nearest its current choice (fewest steps along the axes) whose parameter count is
within ``tolerance`` of the target, nested in the larger budgets' pins. With
``project=<tolerance>`` the router does this by itself at the end of the anneal, and
the rest of training adapts the weights to the pinned configurations.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from stagetrain.elastic.projection import nearest_within
from stagetrain.elastic.space import Space
from stagetrain.errors import ConfigError

# The exact router loss enumerates every configuration of the grid; beyond this many
# it would cost more than the forward pass it steers.
MAX_GRID = 65_536


class BudgetSpec(BaseModel):
    """A named budget: ``target`` is the fraction of the full model's parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    target: float = Field(gt=0, le=1)


class BudgetRouter(nn.Module):
    """Per-axis routers for a set of budgets (see the module docstring).

    Args:
        budgets: the budgets; a sample of budget index ``b`` uses ``budgets[b]``.
        space: the axes, their choices and the parameter count.
        hidden: hidden size of each axis's network.
        anneal_forwards: training forward passes over which temperature and logit scale
            anneal (and the entropy bonus fades).
        tau, scale: ``(start, end)`` temperature and logit scale.
        entropy: weight of the entropy bonus at the start of the anneal.
        cost: ``"exact"``, ``"sampled"`` or ``"auto"`` (see the module docstring).
        samples: draws per budget and forward pass for ``cost="sampled"``.
        project: when set, the tolerance (e.g. ``0.05``) within which :meth:`project`
            pins every budget at the end of the anneal.
    """

    order: torch.Tensor
    grid_index: torch.Tensor
    forwards: torch.Tensor
    is_full: torch.Tensor
    pinned: torch.Tensor

    def __init__(
        self,
        budgets: list[BudgetSpec],
        space: Space,
        *,
        hidden: int = 256,
        anneal_forwards: int = 1000,
        tau: tuple[float, float] = (1.0, 0.05),
        scale: tuple[float, float] = (1.0, 10.0),
        entropy: float = 0.05,
        cost: Literal["auto", "exact", "sampled"] = "auto",
        samples: int = 1024,
        project: float | None = None,
    ) -> None:
        super().__init__()
        if not budgets:
            raise ConfigError("budgets: at least one budget is needed")
        names = [b.name for b in budgets]
        if len(set(names)) != len(names):
            raise ConfigError(f"budgets: names must be unique, got {names}")
        if anneal_forwards < 1 or min(tau) <= 0 or min(scale) <= 0:
            raise ConfigError("router: anneal_forwards, tau and scale must be positive")
        if entropy < 0:
            raise ConfigError(f"router.entropy: must be >= 0, got {entropy}")
        if cost not in ("auto", "exact", "sampled"):
            raise ConfigError(f"router.cost: 'auto', 'exact' or 'sampled', got {cost!r}")
        if samples < 2:
            raise ConfigError(f"router.samples: must be >= 2, got {samples}")
        if project is not None and not 0 < project < 1:
            raise ConfigError(f"router.project: a tolerance in (0, 1), e.g. 0.05; got {project}")
        grid = 1
        for axis in space.axes:
            grid *= len(axis.choices)
        if cost == "exact" and grid > MAX_GRID:
            raise ConfigError(
                f"choices: {grid:,} configurations in the grid; at most {MAX_GRID:,} are "
                "supported by router.cost 'exact' (it sums over all of them): offer fewer "
                "sizes per axis, or use router.cost 'sampled'"
            )
        self.exact = cost == "exact" or (cost == "auto" and grid <= MAX_GRID)
        self.budgets = list(budgets)
        self.space = space
        self.axes = list(space.axes)
        self.anneal_forwards = anneal_forwards
        self.tau, self.scale = tuple(tau), tuple(scale)
        self.entropy = entropy
        self.samples = samples
        self.tolerance = project
        self.nets = nn.ModuleDict(
            {
                axis.name: nn.Sequential(
                    nn.Linear(len(budgets), hidden),
                    nn.LeakyReLU(),
                    nn.Linear(hidden, len(axis.choices)),
                )
                for axis in self.axes
            }
        )
        # Budgets from the largest target down: the order in which choices are capped.
        order = sorted(range(len(budgets)), key=lambda i: -budgets[i].target)
        self.register_buffer("order", torch.tensor(order))
        if self.exact:
            # Every configuration of the grid as choice indices, one row per axis.
            ranges = [torch.arange(len(axis.choices)) for axis in self.axes]
            mesh = torch.meshgrid(*ranges, indexing="ij")
            grid_index = torch.stack([g.flatten() for g in mesh])
        else:
            grid_index = torch.zeros(len(self.axes), 0, dtype=torch.long)
        self.register_buffer("grid_index", grid_index, persistent=False)
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.register_buffer("is_full", torch.tensor([b.target >= 1.0 for b in budgets]))
        # Choice index per (budget, axis) once projected; -1 while the router chooses.
        self.register_buffer("pinned", torch.full((len(budgets), len(self.axes)), -1))

    # --- choices ---------------------------------------------------------------------

    def index(self, name: str) -> int:
        """Position of the budget called ``name``."""
        for i, budget in enumerate(self.budgets):
            if budget.name == name:
                return i
        raise KeyError(f"no budget {name!r}; budgets are {[b.name for b in self.budgets]}")

    @property
    def device(self) -> torch.device:
        return self.order.device

    # Costs are computed in float64 from the configuration, not from buffers, so that
    # casting the model to half precision leaves parameter counts and targets exact.
    def sizes(self, axis: str) -> torch.Tensor:
        """The choices of ``axis`` as a float64 tensor."""
        choices = next(a.choices for a in self.axes if a.name == axis)
        return torch.tensor(choices, dtype=torch.float64, device=self.device)

    @property
    def targets(self) -> torch.Tensor:
        """The budgets' targets as a float64 tensor."""
        return torch.tensor([b.target for b in self.budgets], dtype=torch.float64,
                            device=self.device)  # fmt: skip

    def annealing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(temperature, logit scale)`` at the current training progress (as tensors,
        so reading the counter never waits on the device)."""
        progress = self.progress()
        tau = self.tau[0] * (self.tau[1] / self.tau[0]) ** progress
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * progress
        return tau, scale

    def progress(self) -> torch.Tensor:
        return (self.forwards.float() / self.anneal_forwards).clamp(max=1.0)

    def logits(self, axis: str) -> torch.Tensor:
        """``(n_budgets, n_choices)`` scaled logits of one axis (the sampling distribution
        is their softmax)."""
        net = self.nets[axis]
        dtype = next(net.parameters()).dtype
        eye = torch.eye(len(self.budgets), device=self.device, dtype=dtype)
        return net(eye).float() * self.annealing()[1]

    def all_logits(self) -> dict[str, torch.Tensor]:
        """:meth:`logits` of every axis (computed once per forward pass and shared)."""
        return {axis.name: self.logits(axis.name) for axis in self.axes}

    def _cap(self, index: torch.Tensor) -> torch.Tensor:
        # A running minimum in target order: smaller budgets nest in larger ones.
        return torch.empty_like(index).index_copy(
            0, self.order, torch.cummin(index[self.order], dim=0).values
        )

    def select(
        self, training: bool, logits: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """One-hot choices ``{axis: (n_budgets, n_choices)}`` for every budget, nested.

        The forward value is exactly one-hot; the gradient is that of the budget's own
        (Gumbel-)softmax sample (straight-through), also when its choice was capped.
        Pinned budgets use their pinned choice, without gradient.
        """
        tau, _ = self.annealing()
        logits = self.all_logits() if logits is None else logits
        selection = {}
        for position, axis in enumerate(self.axes):
            scores = logits[axis.name]
            if training:
                gumbel = -torch.empty_like(scores).exponential_().log()
                soft = torch.softmax((scores + gumbel) / tau, dim=-1)
            else:
                soft = torch.softmax(scores / tau, dim=-1)
            index = soft.argmax(-1)
            # A budget of target 1.0 is the parent itself: every axis at its full size.
            index = torch.where(self.is_full, len(axis.choices) - 1, index)
            pin = self.pinned[:, position]
            index = torch.where(pin >= 0, pin, index)
            hard = F.one_hot(self._cap(index), len(axis.choices)).to(soft.dtype)
            straight = hard + (soft - soft.detach())  # exactly one-hot forward
            selection[axis.name] = torch.where((pin >= 0)[:, None], hard, straight)
        return selection

    # --- cost ------------------------------------------------------------------------

    def _caps(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(n_budgets, n_axes)``: the largest choice index each budget may use — the
        most likely choice of the next larger budget (the largest: no cap)."""
        with torch.no_grad():
            mode = self.select(training=False, logits=logits)
        previous = self.order.clone()
        previous[self.order[1:]] = self.order[:-1]
        largest = torch.arange(len(self.budgets), device=self.device) == self.order[0]
        caps = []
        for axis in self.axes:
            chosen = mode[axis.name].argmax(-1)
            caps.append(torch.where(largest, len(axis.choices) - 1, chosen[previous]))
        return torch.stack(caps, dim=1)

    def error_of(self, index: torch.Tensor, layer_rank: torch.Tensor | None) -> torch.Tensor:
        """``|params / target - 1|`` of choice indices ``(n_budgets, N, n_axes)``."""
        sizes = {
            axis.name: self.sizes(axis.name)[index[..., position]]
            for position, axis in enumerate(self.axes)
        }
        params = self.space.params(sizes, layer_rank)
        full = self.space.full_params
        return (params / (self.targets[:, None] * full) - 1).abs()

    def expected_error(
        self,
        logits: dict[str, torch.Tensor] | None = None,
        layer_rank: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``E |params / target - 1|`` per budget, ``(n_budgets,)``.

        Each budget's configurations are costed as they would be used: capped by the
        most likely choices of the larger budgets (held fixed for the gradient), so a
        smaller budget learns the best configuration nested in theirs. Exact over the
        grid, or estimated from samples (``cost``); zero for the parent; the (constant)
        error of its pinned configuration for a pinned budget.
        """
        logits = self.all_logits() if logits is None else logits
        caps = self._caps(logits)
        n = len(self.budgets)
        if self.exact:
            index = self.grid_index.T[None].expand(n, -1, -1)  # (budgets, grid, axes)
            index = torch.minimum(index, caps[:, None, :])
            probability = torch.ones(n, self.grid_index.shape[1], device=self.device)
            for position, axis in enumerate(self.axes):
                p = torch.softmax(logits[axis.name], -1)
                probability = probability * p[:, self.grid_index[position]]
            value = (probability * self.error_of(index, layer_rank)).sum(-1)
        else:
            value = self._sampled_error(logits, caps, layer_rank)
        pinned = (self.pinned >= 0).all(-1)
        if bool(pinned.any()):
            with torch.no_grad():
                fixed = self.error_of(self.pinned.clamp(min=0)[:, None, :], layer_rank)[:, 0]
            value = torch.where(pinned, fixed, value)
        # The parent (target 1.0) is pinned to its full size: nothing to learn there.
        return torch.where(self.is_full, 0.0, value).float()

    def _sampled_error(
        self,
        logits: dict[str, torch.Tensor],
        caps: torch.Tensor,
        layer_rank: torch.Tensor | None,
    ) -> torch.Tensor:
        """Monte-Carlo ``E |params / target - 1|`` whose gradient is the score-function
        (REINFORCE) estimate with a leave-one-out baseline."""
        n, k = len(self.budgets), self.samples
        draws, log_p = [], torch.zeros(n, k, device=self.device)
        for axis in self.axes:
            log_probs = torch.log_softmax(logits[axis.name], -1)
            drawn = torch.multinomial(log_probs.detach().exp(), k, replacement=True)
            log_p = log_p + log_probs.gather(1, drawn)
            draws.append(drawn)
        index = torch.minimum(torch.stack(draws, dim=-1), caps[:, None, :])
        with torch.no_grad():
            error = self.error_of(index, layer_rank)  # (budgets, k)
            baseline = (error.sum(-1, keepdim=True) - error) / (k - 1)
        surrogate = ((error - baseline) * log_p).mean(-1)
        return error.mean(-1) + surrogate - surrogate.detach()

    def entropy_bonus(self, logits: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``entropy * (1 - progress) * H`` per budget, ``H`` the summed entropy of its
        axes' distributions; zero for the parent and pinned budgets (they have nothing
        to choose) and from the end of the anneal on. Deterministic annealing: while
        the weight is high the choices stay open, so a budget does not commit early to
        a configuration that no single-axis change can improve but that misses its
        target."""
        logits = self.all_logits() if logits is None else logits
        total = torch.zeros(len(self.budgets), device=self.device)
        for axis in self.axes:
            log_p = torch.log_softmax(logits[axis.name], -1)
            total = total - (log_p.exp() * log_p).sum(-1)
        idle = self.is_full | (self.pinned >= 0).all(-1)
        return torch.where(idle, 0.0, self.entropy * (1 - self.progress()) * total)

    def forward(
        self, budget: torch.Tensor, *, training: bool, layer_rank: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample one-hot choices for ``budget`` (``(B,)`` indices) and the router loss."""
        if training:
            self.forwards += 1
            if self.tolerance is not None and self._anneal_over_unpinned():
                self.project(self.tolerance, layer_rank)
        logits = self.all_logits()  # once: the sample, the cost and the bonus share them
        selection = self.select(training, logits)
        per_budget = self.expected_error(logits, layer_rank)
        if self.entropy > 0 and training:
            per_budget = per_budget - self.entropy_bonus(logits)
        return {axis: sel[budget] for axis, sel in selection.items()}, per_budget[budget].mean()

    def _anneal_over_unpinned(self) -> bool:
        # Two host reads on the forward passes before projection, none after it.
        if getattr(self, "_projected", False):
            return False
        if bool((self.pinned >= 0).all()):
            self._projected = True
            return False
        return int(self.forwards) >= self.anneal_forwards

    # --- configurations ----------------------------------------------------------------

    @torch.no_grad()
    def choice_indices(self) -> torch.Tensor:
        """``(n_budgets, n_axes)`` choice indices the evaluation-mode router picks."""
        selection = self.select(training=False)
        return torch.stack([selection[a.name].argmax(-1) for a in self.axes], dim=1)

    def configuration(self, name: str) -> dict[str, int]:
        """The sizes the (evaluation-mode) router picks for budget ``name``."""
        row = self.choice_indices()[self.index(name)]
        return {a.name: int(a.choices[int(row[i])]) for i, a in enumerate(self.axes)}

    def params_of(self, config: dict[str, int], layer_rank: torch.Tensor | None = None) -> int:
        """Parameters of a configuration ``{axis: size}``."""
        return int(self.space.params(config, layer_rank))

    @torch.no_grad()
    def project(self, tolerance: float, layer_rank: torch.Tensor | None = None) -> None:
        """Pin every budget to the nearest configuration within ``tolerance`` of its
        target (see the module docstring), greedily from the largest budget down (each
        nested in the pins before it); raises :class:`ConfigError` naming a budget for
        which no such configuration is that close."""
        current = self.choice_indices().cpu()
        pins = self.pinned.clone().cpu()
        cap = torch.tensor([len(a.choices) - 1 for a in self.axes])
        full = self.space.full_params
        for b in self.order.tolist():
            budget = self.budgets[b]
            if budget.target >= 1.0:
                pins[b] = cap
            else:
                target = budget.target * full

                def cost(index: torch.Tensor) -> torch.Tensor:
                    sizes = {
                        a.name: self.sizes(a.name).cpu()[index[:, i]]
                        for i, a in enumerate(self.axes)
                    }
                    return self.space.params(sizes, layer_rank)

                pins[b] = nearest_within(current[b], cap, cost, target, tolerance, budget.name)
            cap = torch.minimum(cap, pins[b])
        self.pinned.copy_(pins.to(self.pinned.device))

    def describe(self, layer_rank: torch.Tensor | None = None) -> str:
        """One line per budget: its configuration and parameter count against its target."""
        full = self.space.full_params
        lines = []
        for budget in self.budgets:
            config = self.configuration(budget.name)
            params = self.params_of(config, layer_rank)
            lines.append(
                f"{budget.name}: {config} -> {params:,} params "
                f"({params / full:.3f} of full; target {budget.target:.3f})"
            )
        return "\n".join(lines)

"""Budgets honoured: each budget's chosen configuration checked against its target.

A trained router picks one configuration per budget; :func:`check_budgets` costs each
(from the model's config) against its target. ``stagetrain extract`` refuses a budget
that misses by more than the tolerance (default 5 %) unless told to go ahead
(``--allow-off-target``, a warning) or to pin it to the nearest configuration within
tolerance first (``--project``, :meth:`~stagetrain.elastic.router.BudgetRouter.project`).
:class:`BudgetCheck` is a training callback that writes the same check into the run
directory (``budgets.json``) when a run ends.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from stagetrain.elastic.core import ElasticHost
from stagetrain.errors import ConfigError

DEFAULT_TOLERANCE = 0.05


class BudgetError(ConfigError):
    """A budget's configuration misses its parameter target by more than the tolerance."""


@dataclass(frozen=True)
class BudgetStatus:
    """One budget's configuration against its target."""

    name: str
    config: dict[str, int]
    params: int
    full_params: int
    target: float
    tolerance: float
    pinned: bool

    @property
    def fraction(self) -> float:
        return self.params / self.full_params

    @property
    def off_target(self) -> float:
        """Relative miss: ``params / (target * full) - 1``."""
        return self.fraction / self.target - 1

    @property
    def ok(self) -> bool:
        return abs(self.off_target) <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else f"off its parameter target (tolerance {self.tolerance:.0%})"
        return (
            f"{self.name}: {self.params:,} parameters = {self.fraction:.3f} of the full "
            f"{self.full_params:,} (target {self.target:.3f}; {self.off_target:+.1%}) {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction, "off_target": self.off_target,
                "ok": self.ok}  # fmt: skip


def check_budgets(host: ElasticHost, tolerance: float = DEFAULT_TOLERANCE) -> list[BudgetStatus]:
    """Every budget's evaluation-mode configuration against its target."""
    router = host.router
    if router is None or host.space is None:
        raise ConfigError("budgets: the model has no budgets (it is not an elastic parent)")
    full = host.space.full_params
    pinned = (router.pinned >= 0).all(-1).tolist()
    out = []
    for index, budget in enumerate(router.budgets):
        config = router.configuration(budget.name)
        out.append(
            BudgetStatus(
                name=budget.name,
                config=config,
                params=router.params_of(config, host.layer_rank),
                full_params=full,
                target=budget.target,
                tolerance=tolerance,
                pinned=bool(pinned[index]),
            )
        )
    return out


def require_on_target(status: BudgetStatus) -> None:
    """Raise :class:`BudgetError` (one line, naming the way out) when ``status`` misses."""
    if not status.ok:
        raise BudgetError(
            f"budget {status.name!r} is {status.off_target:+.1%} off its parameter target "
            f"({status.params:,} vs {status.target:.3f} x {status.full_params:,}; tolerance "
            f"{status.tolerance:.0%}): train the router longer, set router.project, or pass "
            "--project (pin the nearest configuration within tolerance) or --allow-off-target"
        )


class BudgetCheck:
    """Training callback: at the end of a run, write ``budgets.json`` (every budget's
    configuration against its target) into the run directory and print any budget
    that misses by more than ``tolerance``."""

    def __init__(self, tolerance: float = DEFAULT_TOLERANCE) -> None:
        self.tolerance = tolerance

    def on_fit_end(self, run: Any) -> None:
        model = getattr(run.model, "module", run.model)
        if getattr(model, "router", None) is None:
            return
        statuses = check_budgets(model, self.tolerance)
        path = run.run_dir / "budgets.json"
        path.write_text(json.dumps([s.to_dict() for s in statuses], indent=2) + "\n")
        for status in statuses:
            if not status.ok:
                print(f"stagetrain: warning: {status.line()}")

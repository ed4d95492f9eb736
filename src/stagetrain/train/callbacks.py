"""Callbacks: what a run tells the outside (logging services, early stops, probes).

Implement any subset of the :class:`Callback` methods on any object; the loop calls
the ones present, with the run's :class:`RunContext`. The context is one live object
for the whole run: read ``run.loss``, ``run.lr`` or ``run.grad_norm`` in ``on_log``
(they are the values of the record just written), ``run.last_metrics`` after
``on_eval``, and call ``run.request_stop()`` to end training after the current step.

Example — a Weights & Biases or MLflow bridge is ``on_log``::

    class Print:
        def on_log(self, run, record):
            print(record["step"], record.get("loss"), record.get("lr"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from stagetrain.curriculum import Curriculum, Stage
from stagetrain.state import TrainState


@dataclass
class RunContext:
    """What callbacks see: the live objects and the latest values of the run."""

    curriculum: Curriculum
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    state: TrainState
    run_dir: Path
    stage: Stage
    last_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """The latest values of every evaluation, by evaluation name."""
    loss: float | None = None
    """Mean training loss over the latest logging interval."""
    lr: float | None = None
    """Learning rate of the latest logged step (before per-group factors)."""
    grad_norm: float | None = None
    """Gradient norm of the latest logged step (before clipping)."""
    resumed: bool = False
    """In ``on_stage_start``: the stage is continuing from a checkpoint, not starting."""
    stop: tuple[bool, bool] | None = None
    """Set by :meth:`request_stop`: (stop, write a checkpoint first)."""

    def request_stop(self, *, checkpoint: bool = True) -> None:
        """End the run after the current step (with a checkpoint unless told otherwise)."""
        self.stop = (True, checkpoint)


class Callback(Protocol):
    """Hooks of the loop; any subset may be implemented (missing ones are skipped)."""

    def on_fit_start(self, run: RunContext) -> None:
        """Before the first step (also when resuming)."""

    def on_stage_start(self, run: RunContext) -> None:
        """When a stage starts, or continues after a resume (``run.resumed``)."""

    def on_step_end(self, run: RunContext) -> None:
        """After every optimizer step (keep it cheap: it runs every step)."""

    def on_log(self, run: RunContext, record: dict[str, Any]) -> None:
        """After a training record was written (every ``log_every`` steps)."""

    def on_eval(self, run: RunContext, name: str, metrics: dict[str, float]) -> None:
        """After an evaluation."""

    def on_checkpoint(self, run: RunContext, path: Path) -> None:
        """After a checkpoint was written (rank 0)."""

    def on_stage_end(self, run: RunContext) -> None:
        """When a stage ends (after its final evaluations)."""

    def on_fit_end(self, run: RunContext) -> None:
        """After the last stage, before ``summary.json`` is written."""


def emit(callbacks: list[Any], hook: str, run: RunContext, *args: Any) -> None:
    """Call ``hook`` on every callback that has it."""
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(run, *args)

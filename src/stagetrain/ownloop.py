"""A user's own training loop, driven by a curriculum: :meth:`Curriculum.steps`.

Each :class:`StepInfo` gives the stage, the batch, the loss and the learning rate of one
step, and the stage hooks that make an own loop behave like :func:`stagetrain.fit` —
:meth:`StepInfo.enter_stage` (hand-off and freezing, through the same
:func:`~stagetrain.handoff.enter_stage` the built-in loop calls) and
:meth:`StepInfo.report` (evaluation results for the stage's advance rule; the iterator
then moves on to the next stage).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from stagetrain.advance import check_advance
from stagetrain.batch import Batch
from stagetrain.handoff import enter_stage, trainable_flags
from stagetrain.optim import apply_lr
from stagetrain.state import TrainState
from stagetrain.time import Duration

if TYPE_CHECKING:
    from stagetrain.curriculum import Curriculum, Stage


@dataclass
class StepInfo:
    """One step of a curriculum, as seen from a user's own loop (see :meth:`Curriculum.steps`).

    The stage hooks make an own loop behave like :func:`stagetrain.fit`:
    :meth:`enter_stage` applies the stage's hand-off and freezing at its first step,
    :meth:`set_lr` its learning rate, :meth:`loss` its loss terms, and :meth:`report`
    feeds evaluation results to its advance rule (the iterator then moves on).
    """

    run: StepIterator
    stage: Stage
    step: int
    """Global step (completed steps before this one)."""
    stage_step: int

    @property
    def curriculum(self) -> Curriculum:
        return self.run.curriculum

    @property
    def is_stage_start(self) -> bool:
        return self.stage_step == 0

    @property
    def lr(self) -> float:
        return self.stage.lr(self.stage_step, self.step)

    def batch(self) -> Batch:
        """This step's deterministic batch (this rank's share)."""
        return self.stage.batch(self.stage_step, self.run.rank, self.run.world_size)

    def enter_stage(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> torch.optim.Optimizer:
        """At a stage's first step: apply its hand-off and freezing; returns the optimizer to
        use from now on (a new one for the first stage and after ``reset``)."""
        if self.run.trainable is None:
            self.run.trainable = trainable_flags(model)
        return enter_stage(
            self.stage.config, self.stage.index, model, optimizer, self.run.trainable
        )

    def loss(
        self,
        output: Any,
        target: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The stage's weighted loss on a model ``output`` against ``target`` (``model``: for
        terms that read it, such as a router cost). For dict batches or causal-LM labels use
        :meth:`compute_loss`."""
        return self.stage.loss(output, target, model=model)[0]

    def compute_loss(
        self, model: torch.nn.Module, batch: Batch, teacher: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """Run ``model`` on ``batch`` by the stage's convention and return its loss."""
        pred = self.stage.io.predict(model, batch)
        teacher_pred = None
        if teacher is not None:
            with torch.no_grad():
                teacher_pred = self.stage.io.predict_teacher(teacher, batch, model)
        return self.stage.loss(pred, teacher=teacher_pred, model=model)[0]

    def set_lr(self, optimizer: torch.optim.Optimizer) -> float:
        """Write this step's learning rate into every param group; returns it."""
        lr = self.lr
        apply_lr(optimizer, lr)
        return lr

    def report(self, metrics: Mapping[str, float]) -> bool:
        """Feed evaluation results (``{"val.accuracy": 0.91}``) to the stage's advance rule.

        Returns True when the stage ends after this step (the iterator then continues
        with the next stage).
        """
        rule = self.stage.config.advance
        if rule is None or rule.metric not in metrics:
            return False
        state = self.run.state
        state.stage_step = self.stage_step + 1
        decision = check_advance(
            rule, float(metrics[rule.metric]), state, self.run.min_steps(self.stage)
        )
        if decision.advance:
            self.run.advance_after = self.step
        return decision.advance


class StepIterator:
    """Iterates the steps of a curriculum for a user's loop, ending stages early when
    their advance rule says so (see :meth:`StepInfo.report`)."""

    def __init__(
        self, curriculum: Curriculum, start: TrainState | None, rank: int, world_size: int
    ) -> None:
        self.curriculum = curriculum
        self.state = dataclasses.replace(start) if start is not None else TrainState()
        self.rank, self.world_size = rank, world_size
        self.trainable: dict[str, bool] | None = None
        self.advance_after: int | None = None

    def min_steps(self, stage: Stage) -> int:
        rule = stage.config.advance
        if rule is None or rule.min_duration is None:
            return 0
        return stage.context.to_steps(
            Duration.parse(rule.min_duration), field=f"stages[{stage.index}].advance.min_duration"
        )

    def __iter__(self) -> Iterator[StepInfo]:
        state = self.state
        step = state.step
        for stage in self.curriculum.stages[state.stage_index :]:
            first = state.stage_step if stage.index == state.stage_index else 0
            if stage.index != state.stage_index:
                state.plateau_best, state.plateau_waits = None, 0
            state.stage_index = stage.index
            for stage_step in range(first, stage.steps):
                state.stage_step = stage_step
                yield StepInfo(self, stage, step, stage_step)
                step += 1
                state.step = step
                if self.advance_after is not None:
                    self.advance_after = None
                    break
        state.stage_index, state.stage_step = len(self.curriculum.stages), 0

"""The run log's records of a run's position and of its stage boundaries.

The built-in loop (:mod:`stagetrain.train.runner`) and the Keras adapter write the same
records through these builders, so ``stagetrain report``, ``compare`` and resume read
one format whichever loop trained the run (see :mod:`stagetrain.logs` for the fields
every record carries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stagetrain.state import TrainState

if TYPE_CHECKING:
    from stagetrain.curriculum import Stage


def position_record(kind: str, stage: str, state: TrainState, **fields: Any) -> dict[str, Any]:
    """A record of type ``kind`` at the run's position (``step``, ``stage``,
    ``stage_step``), followed by ``fields``."""
    return {
        "type": kind,
        "step": state.step,
        "stage": stage,
        "stage_step": state.stage_step,
        **fields,
    }


def stage_start_record(stage: Stage, state: TrainState, *, time: float) -> dict[str, Any]:
    """The ``stage_start`` record: the stage's index, hand-off and planned steps."""
    return position_record(
        "stage_start",
        stage.name,
        state,
        stage_index=stage.index,
        handoff=stage.config.handoff if stage.index else "start",
        planned_steps=stage.steps,
        samples=state.samples,
        tokens=state.tokens,
        time=time,
    )


def stage_end_record(
    stage: Stage, state: TrainState, *, reason: str, detail: str, time: float
) -> dict[str, Any]:
    """The ``stage_end`` record: why the stage ended (``reason``, ``detail``)."""
    return position_record(
        "stage_end",
        stage.name,
        state,
        reason=reason,
        detail=detail,
        samples=state.samples,
        tokens=state.tokens,
        time=time,
    )

"""The stage callback: the per-step work of one stage's ``model.fit``, handed to the run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras

from stagetrain.advance import AdvanceDecision
from stagetrain.curriculum import Stage

if TYPE_CHECKING:
    from stagetrain.integrations.keras._run import _Run


class _StepHooks(keras.callbacks.Callback):
    """The per-step work of one stage's ``model.fit`` (see :class:`_Run`)."""

    def __init__(self, run: _Run, stage: Stage) -> None:
        super().__init__()
        self.run = run
        self.stage = stage
        self.ending: AdvanceDecision | None = None

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.run.before_step(self.stage, self.model)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        ending = self.run.after_step(self.stage, self.model, logs or {})
        if ending is not None:
            self.ending = ending
            self.model.stop_training = True

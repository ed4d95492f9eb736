"""PyTorch Lightning with a stagetrain curriculum.

* :class:`CurriculumDataModule`: the training DataLoader yields, per global step, the
  curriculum's batch (the same indices as stagetrain's own loop). It starts at the
  trainer's ``global_step``, so resuming from a Lightning checkpoint continues the
  order exactly.
* :class:`CurriculumCallback`: before every batch it sets the curriculum's LR on the
  optimizer's param groups, applies ``reset`` hand-offs at stage starts, logs
  ``stage_index`` and records the stage timeline.
* In ``training_step``, take the stage's loss with
  ``self.curriculum.stage_at(self.global_step).loss(output, target)[0]``.

Metric-triggered advance rules are not supported here (fixed stage lengths): use
``stagetrain.fit`` for those.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from stagetrain.curriculum import Curriculum
from stagetrain.errors import ConfigError
from stagetrain.stepdata import step_loader


class CurriculumDataModule(L.LightningDataModule):
    """The curriculum's training batches, from the trainer's current global step."""

    def __init__(self, curriculum: Curriculum) -> None:
        super().__init__()
        if any(s.config.advance is not None for s in curriculum.stages):
            raise ConfigError(
                "advance: metric-triggered stages need stagetrain.fit; Lightning runs fixed lengths"
            )
        self.curriculum = curriculum

    def train_dataloader(self) -> Any:
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        return step_loader(self.curriculum, start, rank, world)


class CurriculumCallback(L.Callback):
    """Sets the LR per step, applies hand-offs, logs the stage and records the timeline."""

    def __init__(self, curriculum: Curriculum) -> None:
        self.curriculum = curriculum
        self.timeline: list[tuple[int, str]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        counters = self.curriculum.state_at(step)
        stage = self.curriculum.stages[counters.stage_index]
        if counters.stage_step == 0 or not self.timeline:
            self.timeline.append((step, stage.name))
        for optimizer in trainer.optimizers:
            if counters.stage_step == 0 and stage.index > 0 and stage.config.handoff == "reset":
                optimizer.state.clear()
            lr = stage.lr(counters.stage_step, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
        pl_module.log("stage_index", float(stage.index), on_step=True, prog_bar=True)

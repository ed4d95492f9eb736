"""Hugging Face ``Trainer`` with a stagetrain curriculum.

:class:`CurriculumTrainer` is a ``Trainer`` whose training batches, loss and learning
rate come from the curriculum, step by step:

* data: one batch per global step from :class:`~stagetrain.stepdata.StepBatchSampler`
  (the same indices as stagetrain's own loop). On ``resume_from_checkpoint`` the Trainer
  skips the steps already done at the sampler level (no data is loaded for them), so
  the order continues exactly;
* loss: the stage's loss terms on ``model(input_ids).logits`` against ``labels``;
* learning rate: a ``LambdaLR`` equal to the curriculum's LR at every global step
  (stage schedules, warmups and hand-off rewarms included); ``reset`` hand-offs clear
  the optimizer state at the stage start. The optimizer itself is the Trainer's
  (``args.optim``), with ``args.learning_rate`` as the base the schedule is divided by.

:class:`CurriculumCallback` logs ``stage_index`` with every Trainer log and records the
stage timeline. Metric-triggered advance rules are not supported here (stage lengths
must be fixed): use ``stagetrain.fit`` for those.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from stagetrain.batch import Batch
from stagetrain.curriculum import Curriculum
from stagetrain.errors import ConfigError
from stagetrain.modelio import Prediction, logits_of
from stagetrain.stepdata import step_loader


def to_hf_batch(batch: Batch) -> dict[str, torch.Tensor]:
    """``(inputs, targets)`` as the Trainer's dict: ``input_ids`` and ``labels``."""
    inputs, targets = batch
    return {"input_ids": inputs, "labels": targets}


class CurriculumCallback(TrainerCallback):
    """Applies stage hand-offs at stage starts, logs the stage, records the timeline."""

    def __init__(self, curriculum: Curriculum) -> None:
        self.curriculum = curriculum
        self.timeline: list[tuple[int, str]] = []
        """(global step, stage name) of every stage start seen."""

    def on_step_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        counters = self.curriculum.state_at(state.global_step)
        stage = self.curriculum.stages[counters.stage_index]
        if counters.stage_step == 0 or not self.timeline:
            self.timeline.append((state.global_step, stage.name))
        if (
            counters.stage_step == 0
            and stage.index > 0
            and stage.config.handoff == "reset"
            and optimizer is not None
        ):
            optimizer.state.clear()  # a fresh optimizer: moments and step counts start over

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        index = self.curriculum.state_at(
            min(state.global_step, self.curriculum.total_steps - 1)
        ).stage_index
        if logs is not None:
            logs["stage_index"] = index  # seen by the reporting integrations (TensorBoard, ...)
        if state.log_history:
            state.log_history[-1]["stage_index"] = index  # the Trainer stored its copy first


class CurriculumTrainer(Trainer):
    """A ``Trainer`` driven by ``curriculum`` (see the module docstring)."""

    def __init__(self, *args: Any, curriculum: Curriculum, **kwargs: Any) -> None:
        if any(s.config.advance is not None for s in curriculum.stages):
            raise ConfigError(
                "advance: metric-triggered stages need stagetrain.fit; "
                "the Trainer runs fixed lengths"
            )
        self.curriculum = curriculum
        self.curriculum_callback = CurriculumCallback(curriculum)
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.curriculum_callback]
        super().__init__(*args, **kwargs)
        self.args.max_steps = curriculum.total_steps
        world = self.args.world_size
        if any(s.batch_size % world for s in curriculum.stages):
            raise ConfigError(
                f"batch_size: every stage's batch must divide by the world size {world}"
            )

    def get_train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
        # Not passed through accelerator.prepare: the sampler already shards by rank.
        return step_loader(
            self.curriculum,
            0,
            self.args.process_index,
            self.args.world_size,
            collate_fn=lambda b: to_hf_batch(b),
        )

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        if self.lr_scheduler is None:
            base = self.args.learning_rate
            curriculum = self.curriculum

            def factor(step: int) -> float:
                stage = curriculum.stage_at(min(step, curriculum.total_steps - 1))
                return stage.lr(step - stage.planned_start, step) / base

            target = optimizer if optimizer is not None else self.optimizer
            assert target is not None, "the Trainer builds its optimizer before its scheduler"
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(target, factor)
        return self.lr_scheduler

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        stage = self.curriculum.stage_at(
            min(self.state.global_step, self.curriculum.total_steps - 1)
        )
        outputs = model(input_ids=inputs["input_ids"])
        pred = Prediction(logits_of(outputs), inputs["labels"], None, outputs, inputs)
        loss = stage.loss(pred, model=model)[0]
        return (loss, outputs) if return_outputs else loss

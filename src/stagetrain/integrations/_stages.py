"""What the framework adapters do around each step, over the core's single owners.

A framework (the Hugging Face Trainer, Lightning) owns the loop, and it keeps one
optimizer object from the first step to the last. So, per step, the adapters call
:class:`StageDriver`, which does in place what :func:`stagetrain.fit` does:

* at a stage's first step, the hand-off and freezing of
  :func:`stagetrain.handoff.enter_stage`. For an optimizer the curriculum built
  (:func:`stage_optimizer`; its param groups carry ``lr_factor``) a ``reset`` makes
  the optimizer the fresh one the stage builds: its state is cleared and its groups
  take the fresh one's hyperparameters (:func:`check_in_place_resets` refuses, before
  training, a reset to another optimizer class or other param groups). For an
  optimizer the framework built, ``reset`` clears its state
  (:func:`stagetrain.handoff.reset_optimizer_state`);
* after a resume mid-stage, the stage's freezing again (``requires_grad`` is not in
  checkpoints);
* every step, the curriculum's LR through :func:`stagetrain.optim.apply_lr` (so
  ``lr_multipliers`` apply);
* the stage timeline, complete after a resume (the stages before the resume point
  come from the curriculum's plan).

:func:`check_framework_run` holds the checks both adapters make before training, and
:func:`stage_loss` computes a step's loss as :class:`stagetrain.train.step.StepRunner`
does (the stage's calling convention, the teacher's prediction, the model for terms
that read it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from stagetrain.batch import Batch
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.errors import ConfigError
from stagetrain.handoff import (
    apply_freeze,
    builds_optimizer,
    enter_stage,
    reset_optimizer_state,
    trainable_flags,
)
from stagetrain.modelio import Prediction
from stagetrain.optim import apply_lr, build_optimizer


def lr_at(curriculum: Curriculum, step: int) -> float:
    """The curriculum's learning rate at global ``step`` of its planned timeline."""
    stage = curriculum.stage_at(step)
    return stage.lr(step - stage.planned_start, step)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (Accelerate's ``.optimizer``,
    Lightning's ``._optimizer``)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    assert isinstance(optimizer, torch.optim.Optimizer), type(optimizer)
    return optimizer


def is_curriculum_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` was built by :func:`stagetrain.optim.build_optimizer`."""
    return all("lr_factor" in group for group in inner_optimizer(optimizer).param_groups)


def stage_optimizer(
    curriculum: Curriculum, model: torch.nn.Module, index: int = 0
) -> torch.optim.Optimizer:
    """The optimizer stage ``index`` builds over ``model``'s named parameters."""
    cfg = curriculum.stages[index].config.optimizer
    assert cfg is not None
    return build_optimizer(model.named_parameters(), cfg, field=f"stages[{index}].optimizer")


def _layout(optimizer: torch.optim.Optimizer) -> list[tuple[int, ...]]:
    return [tuple(id(p) for p in group["params"]) for group in optimizer.param_groups]


def check_in_place_resets(
    curriculum: Curriculum, model: torch.nn.Module, optimizer: Any, *, framework: str
) -> None:
    """Every ``reset`` stage's fresh optimizer must be able to replace ``optimizer`` in place.

    Raises:
        ConfigError: naming the stage whose optimizer has another class or other param
            groups (``lr_multipliers`` / ``no_decay`` patterns).
    """
    kept = inner_optimizer(optimizer)
    for stage in curriculum.stages[1:]:
        if not builds_optimizer(stage.config, stage.index):
            continue
        fresh = stage_optimizer(curriculum, model, stage.index)
        if type(fresh) is not type(kept) or _layout(fresh) != _layout(kept):
            raise ConfigError(
                f"stages[{stage.index}].optimizer: {framework} keeps one optimizer object, so "
                "a 'reset' hand-off re-initialises it in place; this stage's "
                f"{type(fresh).__name__} with {len(fresh.param_groups)} param group(s) cannot "
                f"replace the {type(kept).__name__} with {len(kept.param_groups)}: keep the "
                "optimizer name, lr_multipliers and no_decay of the first stage, or train "
                "with stagetrain.fit"
            )


def reinitialise(optimizer: torch.optim.Optimizer, fresh: torch.optim.Optimizer) -> None:
    """Make ``optimizer`` the ``fresh`` one in place: no state, ``fresh``'s hyperparameters.

    The group dicts and the state mapping stay the same objects, so wrappers that copied
    references to them (Lightning's, Accelerate's) keep seeing the optimizer's.
    """
    assert type(optimizer) is type(fresh) and _layout(optimizer) == _layout(fresh)
    reset_optimizer_state(optimizer)
    for group, new in zip(optimizer.param_groups, fresh.param_groups, strict=True):
        group.update({key: value for key, value in new.items() if key != "params"})


def check_framework_run(
    curriculum: Curriculum, *, grad_accum: int, world_size: int, framework: str, argument: str
) -> None:
    """What a framework run needs of the curriculum, checked before training.

    Args:
        grad_accum: the framework's micro-batches per optimizer step.
        world_size: data-parallel processes.
        framework: its name, for messages.
        argument: the framework's name for ``grad_accum``, for messages.

    Raises:
        ConfigError: advance rules (the frameworks run the planned lengths), a batch that
            does not divide over the ranks or into ``grad_accum`` micro-batches, or a
            stage declaring another ``grad_accum``.
    """
    evals = [ev.name for stage in curriculum.stages for ev in curriculum.evals_for(stage)]
    if evals:
        warnings.warn(
            f"evals: {framework} does not run the curriculum's evaluation sets "
            f"({', '.join(sorted(set(evals)))}); evaluate with the framework's own (the "
            "Trainer's eval_dataset, a LightningModule's validation_step)",
            UserWarning,
            stacklevel=3,
        )
    for stage in curriculum.stages:
        field = f"stages[{stage.index}]"
        if stage.config.advance is not None:
            raise ConfigError(
                f"{field}.advance: metric-triggered stage ends need stagetrain.fit; "
                f"{framework} runs every stage's planned duration"
            )
        if stage.batch_size % world_size:
            raise ConfigError(
                f"{field}.batch_size: {stage.batch_size} is not divisible by the world size "
                f"{world_size}; the global batch is split evenly across ranks"
            )
        if stage.config.grad_accum not in (1, grad_accum):
            raise ConfigError(
                f"{field}.grad_accum: {stage.config.grad_accum}, but {argument} {grad_accum}; "
                f"{framework} cuts every step into the same number of micro-batches: set "
                "them equal (or leave the stage's grad_accum at 1)"
            )
        if stage.batch_size // world_size < grad_accum:
            raise ConfigError(
                f"{field}.batch_size: {stage.batch_size} samples over {world_size} rank(s) "
                f"cannot make {grad_accum} micro-batches ({argument})"
            )


def stage_loss(
    stage: Stage,
    model: torch.nn.Module,
    batch: Batch,
    teacher: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Prediction]:
    """The stage's loss on one (micro-)batch, as our loop computes it.

    Returns:
        The weighted total, each term, and the model's aligned prediction.

    Raises:
        ConfigError: when a term needs the teacher and none was given.
    """
    pred = stage.io.predict(model, batch)
    teacher_pred = None
    if stage.loss.needs_teacher:
        if teacher is None:
            raise ConfigError(
                f"stages[{stage.index}].loss: a term needs the teacher's output; pass teacher="
            )
        with torch.no_grad():
            teacher_pred = stage.io.predict(teacher, batch)
    loss, terms = stage.loss(pred, teacher=teacher_pred, model=model)
    return loss, terms, pred


def needs_teacher(curriculum: Curriculum) -> bool:
    return any(stage.loss.needs_teacher for stage in curriculum.stages)


class StageDriver:
    """Per-step stage bookkeeping of a framework run (see the module docstring).

    Args:
        curriculum: the run's curriculum (planned stage lengths).
    """

    def __init__(self, curriculum: Curriculum) -> None:
        self.curriculum = curriculum
        self.timeline: list[tuple[int, str]] = []
        """(planned start step, stage name) of every stage the run has reached."""
        self.trainable: dict[str, bool] = {}
        self._frozen_for: int | None = None

    def start(self, step: int, model: torch.nn.Module) -> None:
        """At the start of training, fresh (``step`` 0) or resumed at ``step``."""
        self.trainable = trainable_flags(model)
        self._frozen_for = None
        self.timeline = [
            (s.planned_start, s.name) for s in self.curriculum.stages if s.planned_start < step
        ]

    def begin_step(self, step: int, model: torch.nn.Module, optimizers: Sequence[Any]) -> Stage:
        """Before the first micro-batch of global ``step``: hand-off, freezing, LR."""
        counters = self.curriculum.state_at(step)
        stage = self.curriculum.stages[counters.stage_index]
        while len(self.timeline) <= stage.index:
            reached = self.curriculum.stages[len(self.timeline)]
            self.timeline.append((reached.planned_start, reached.name))
        if counters.stage_step == 0:
            self._enter(stage, model, optimizers)
        elif self._frozen_for != stage.index:
            apply_freeze(
                model, stage.config.freeze, self.trainable, field=f"stages[{stage.index}].freeze"
            )
        self._frozen_for = stage.index
        lr = lr_at(self.curriculum, step)
        for optimizer in optimizers:
            apply_lr(inner_optimizer(optimizer), lr)
        return stage

    def _enter(self, stage: Stage, model: torch.nn.Module, optimizers: Sequence[Any]) -> None:
        cfg, index = stage.config, stage.index
        apply_freeze(model, cfg.freeze, self.trainable, field=f"stages[{index}].freeze")
        for wrapped in optimizers:
            optimizer = inner_optimizer(wrapped)
            if is_curriculum_optimizer(optimizer):
                # The hand-off's owner decides; a new optimizer it returns becomes the kept one.
                entered = enter_stage(cfg, index, model, optimizer, self.trainable)
                if entered is not optimizer:
                    reinitialise(optimizer, entered)
            elif index > 0 and builds_optimizer(cfg, index):
                reset_optimizer_state(optimizer)

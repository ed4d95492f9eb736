"""PyTorch Lightning with a stagetrain curriculum.

Three pieces, computing what :func:`stagetrain.fit` computes (tested: bitwise the same
weights):

* :class:`CurriculumDataModule`: the training DataLoader yields, per optimizer step, the
  curriculum's batch cut into ``accumulate_grad_batches`` micro-batches exactly as our
  loop cuts it for ``grad_accum`` (every micro-batch of a step belongs to that step's
  stage). It starts at the trainer's ``global_step``, so resuming from a Lightning
  checkpoint continues the order exactly without loading the skipped data.
* :class:`CurriculumCallback`: before the first micro-batch of every step it applies the
  step's stage: at a stage's first step ``freeze`` and the ``carry``/``rewarm``/``reset``
  hand-off of :func:`stagetrain.handoff.enter_stage`, in place on the trainer's
  optimizers; after a resume mid-stage the stage's freezing again; every step the
  curriculum's LR through :func:`stagetrain.optim.apply_lr` (times each param group's
  ``lr_multipliers`` factor). It clips gradients at the stage's ``grad_clip`` when the
  optimizer is the curriculum's, logs ``stage_index`` and records the stage ``timeline``
  (the stages before a resume point included).
* The module: :class:`CurriculumModule` wraps a model, or in your own ``LightningModule``
  return :func:`curriculum_optimizer` from ``configure_optimizers`` (the first stage's
  optimizer with its param groups: ``lr_multipliers``, ``no_decay``) and
  :func:`stage_loss` from ``training_step`` (the stage's calling convention and loss
  terms, the teacher for ``kl_distill``, the model for terms that read it). Lightning
  divides each micro-batch's loss by ``accumulate_grad_batches``, as our loop does.

An optimizer you build yourself works too: it gets the curriculum's LR (no
``lr_multipliers``: those live in the curriculum's param groups), ``reset`` clears its
state, and clipping is Lightning's ``gradient_clip_val``.

Freeze and ``lr_multipliers`` patterns name the parameters of the module's ``model``
attribute when it has one (``CurriculumModule``, and the usual ``self.model = ...``),
else of the LightningModule itself.

Refused (a ``ConfigError`` when ``fit`` starts): metric-triggered ``advance`` rules (use
:func:`stagetrain.fit`), ``max_steps`` other than the curriculum's, an LR scheduler from
``configure_optimizers``, a ``GradientAccumulationScheduler``, a stage ``grad_accum``
other than ``accumulate_grad_batches``, ``gradient_clip_val`` together with a stage's
``grad_clip``, and a ``reset`` to another optimizer class or other param groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler

from stagetrain.batch import Batch
from stagetrain.curriculum import Curriculum
from stagetrain.errors import ConfigError
from stagetrain.integrations import _stages
from stagetrain.integrations._stages import StageDriver, inner_optimizer, is_curriculum_optimizer
from stagetrain.stepdata import CurriculumDataset, StepBatchSampler, pass_through


def curriculum_optimizer(curriculum: Curriculum, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The first stage's optimizer over ``model`` (for ``configure_optimizers``)."""
    return _stages.stage_optimizer(curriculum, model)


def stage_loss(
    curriculum: Curriculum,
    step: int,
    model: torch.nn.Module,
    batch: Batch,
    teacher: torch.nn.Module | None = None,
) -> torch.Tensor:
    """The loss of global ``step``'s stage on ``batch`` (for ``training_step``: pass
    ``self.global_step``)."""
    return _stages.stage_loss(curriculum.stage_at(step), model, batch, teacher)[0]


def trained_model(pl_module: L.LightningModule) -> torch.nn.Module:
    """The network the curriculum's parameter patterns name: ``pl_module.model`` if any."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else pl_module


class CurriculumModule(L.LightningModule):
    """A LightningModule training ``model`` with the curriculum's loss and optimizer.

    Args:
        model: the network (``self.model``).
        curriculum: the stages.
        teacher: the frozen teacher of ``kl_distill`` terms (default: the curriculum's).
    """

    teacher: torch.nn.Module | None

    def __init__(
        self, model: torch.nn.Module, curriculum: Curriculum, teacher: torch.nn.Module | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.curriculum = curriculum
        teacher = teacher if teacher is not None else curriculum.build_teacher()
        if teacher is None and _stages.needs_teacher(curriculum):
            raise ConfigError("teacher: a stage's loss needs the teacher's output; pass teacher=")
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        # Not a submodule: checkpoints hold the student only, and Lightning's train() does
        # not switch the teacher's dropout on.
        object.__setattr__(self, "teacher", teacher)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = stage_loss(self.curriculum, self.global_step, self.model, batch, self.teacher)
        self.log("loss", loss.detach(), prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return curriculum_optimizer(self.curriculum, self.model)


class WholeRunSampler(StepBatchSampler):
    """:class:`StepBatchSampler` whose length is the whole run's, from any ``start``.

    Lightning counts an epoch's batches from its beginning, a resumed one too; with the
    length of the remaining steps only, it would end the epoch early and iterate the
    loader again.
    """

    def __len__(self) -> int:
        return self.curriculum.total_steps * self.micro_batches


class CurriculumLoader(torch.utils.data.DataLoader[Batch]):
    """The curriculum's micro-batches from global step ``position()`` on; resumable
    (Lightning stores and restores its state, the global step, in checkpoints)."""

    def __init__(
        self,
        curriculum: Curriculum,
        position: Callable[[], int],
        rank: int = 0,
        world_size: int = 1,
        micro_batches: int = 1,
    ) -> None:
        sampler = WholeRunSampler(curriculum, position(), rank, world_size, micro_batches)
        super().__init__(
            CurriculumDataset(curriculum),
            batch_sampler=sampler,  # type: ignore[arg-type]
            collate_fn=pass_through,
        )
        self._position = position
        self._sampler = sampler

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._position()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Read when iteration starts: Lightning loads the state before its first iter().
        self._sampler.start = int(state_dict["step"])


class CurriculumDataModule(L.LightningDataModule):
    """The curriculum's training micro-batches, from the trainer's current global step."""

    def __init__(self, curriculum: Curriculum) -> None:
        super().__init__()
        self.curriculum = curriculum

    def train_dataloader(self) -> CurriculumLoader:
        trainer = self.trainer
        if trainer is None:
            return CurriculumLoader(self.curriculum, lambda: 0)
        return CurriculumLoader(
            self.curriculum,
            lambda: trainer.global_step,
            trainer.global_rank,
            trainer.world_size,
            micro_batches=trainer.accumulate_grad_batches,
        )


class CurriculumCallback(L.Callback):
    """Applies every step's stage (see the module docstring); ``timeline`` lists the stages
    reached."""

    def __init__(self, curriculum: Curriculum) -> None:
        self.curriculum = curriculum
        self.driver = StageDriver(curriculum)
        self._step: int | None = None
        self._clip = False

    @property
    def timeline(self) -> list[tuple[int, str]]:
        """(planned start step, stage name) of every stage reached, before a resume too."""
        return self.driver.timeline

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        curriculum = self.curriculum
        if trainer.max_steps != curriculum.total_steps:
            raise ConfigError(
                f"max_steps: L.Trainer(max_steps={trainer.max_steps}), but the curriculum runs "
                f"{curriculum.total_steps} steps; pass max_steps=curriculum.total_steps"
            )
        if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):  # type: ignore[attr-defined]
            raise ConfigError(
                "accumulate_grad_batches: a GradientAccumulationScheduler changes the "
                "micro-batches per step by epoch; set a stage's grad_accum-equal number instead"
            )
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ConfigError(
                "use_distributed_sampler: the curriculum's sampler shards by rank itself; pass "
                "L.Trainer(use_distributed_sampler=False)"
            )
        freezes = [s for s in curriculum.stages if s.config.freeze]
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None) or {}
        if trainer.world_size > 1 and freezes and not ddp_kwargs.get("find_unused_parameters"):
            # DDP expects a gradient for every parameter that was trainable when it wrapped
            # the model; a stage that freezes some later needs it to look for unused ones.
            raise ConfigError(
                f"stages[{freezes[0].index}].freeze: under DDP, freezing parameters during the "
                "run needs L.Trainer(strategy='ddp_find_unused_parameters_true')"
            )
        _stages.check_framework_run(
            curriculum, grad_accum=trainer.accumulate_grad_batches, world_size=trainer.world_size,
            framework="Lightning", argument="L.Trainer's accumulate_grad_batches",
        )  # fmt: skip

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.lr_scheduler_configs:
            raise ConfigError(
                "configure_optimizers: returns an LR scheduler, but the learning rate is the "
                "curriculum's at every step (CurriculumCallback sets it); return the optimizer only"
            )
        model = trained_model(pl_module)
        owned = [o for o in trainer.optimizers if is_curriculum_optimizer(o)]
        for optimizer in owned:
            _stages.check_in_place_resets(self.curriculum, model, optimizer, framework="Lightning")
        self._clip = bool(owned)
        clips = [
            s for s in self.curriculum.stages if s.config.optimizer and s.config.optimizer.grad_clip
        ]
        if owned and clips and trainer.gradient_clip_val is not None:
            raise ConfigError(
                f"stages[{clips[0].index}].optimizer.grad_clip: the curriculum clips gradients; "
                "leave L.Trainer's gradient_clip_val unset"
            )
        self.driver.start(trainer.global_step, model)
        self._step = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._step:
            return  # a later micro-batch of the same step
        self._step = step
        stage = self.driver.begin_step(step, trained_model(pl_module), trainer.optimizers)
        pl_module.log("stage_index", float(stage.index), on_step=True, prog_bar=True)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if not self._clip or not is_curriculum_optimizer(inner_optimizer(optimizer)):
            return
        cfg = self.curriculum.stage_at(trainer.global_step).config.optimizer
        if cfg is not None and cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trained_model(pl_module).parameters(), cfg.grad_clip)

"""Hugging Face ``Trainer`` with a stagetrain curriculum.

:class:`CurriculumTrainer` is a ``Trainer`` whose training data, loss, optimizer and
learning rate come from the curriculum, step by step, computing what
:func:`stagetrain.fit` computes (tested: bitwise the same weights):

* **data**: per optimizer step, the step's batch from
  :class:`~stagetrain.stepdata.StepBatchSampler`, cut into ``gradient_accumulation_steps``
  micro-batches exactly as our loop cuts it for ``grad_accum`` (every micro-batch of a
  step belongs to that step's stage). The samples per step are the curriculum's:
  ``per_device_train_batch_size x world size x gradient_accumulation_steps`` must equal
  the stage's ``batch_size`` (a :class:`~stagetrain.errors.ConfigError` otherwise; a
  warning names the stages of another size). On ``resume_from_checkpoint`` the Trainer
  skips the steps already done at the sampler level: no data is loaded for them;
* **loss**: the stage's loss terms, called by the stage's convention
  (:mod:`stagetrain.modelio`): pair batches ``(inputs, targets)`` as ``model(inputs)``
  against ``targets``; ``{"input_ids", "labels"}`` rows of a causal LM with
  ``labels == input_ids`` shifted against the logits, as ``transformers`` does, in
  training and in ``evaluate``; ``loss: model`` is the model's own loss. ``kl_distill``
  gets the ``teacher``'s prediction, terms that read the model get the model. The loss
  of a micro-batch is its mean, and the Trainer divides it by the number of
  micro-batches (``loss_is_scaled_for_ga = False``), as our loop does;
  ``num_items_in_batch`` (the Trainer's token count over a step) is therefore not used:
  a step's loss is the mean of its micro-batches' means, which is the token mean when
  they hold equally many label tokens;
* **optimizer** (``curriculum_optimizer=True``, the default): built by
  :func:`stagetrain.optim.build_optimizer` from the first stage's ``optimizer`` (its
  param groups: ``lr_multipliers``, ``no_decay``), gradients clipped at each stage's
  ``grad_clip``. The Trainer's optimizer arguments (``optim``, ``weight_decay``,
  ``adam_*``, ``max_grad_norm``) then do not apply: a changed one is named in a warning.
  With ``curriculum_optimizer=False`` the optimizer and clipping are the Trainer's;
* **learning rate**: the curriculum's at every global step, set through
  :func:`stagetrain.optim.apply_lr` (times each group's ``lr_multipliers`` factor) —
  stage schedules, warmups and rewarms included. ``learning_rate``,
  ``lr_scheduler_type`` and the warmup arguments do not apply (warned), and a scheduler
  passed in ``optimizers`` is refused;
* **hand-offs**: at a stage's first step, ``freeze`` and ``carry``/``rewarm``/``reset`` as
  :func:`stagetrain.handoff.enter_stage` defines them, applied in place to the Trainer's
  one optimizer (see :mod:`stagetrain.integrations._stages`).

Logs carry ``stage_index`` (and ``stage``, in ``log_history``): the Trainer logs at step
N the mean over the steps since its last log; every stage's last step closes such a
record, so each record averages the steps of one stage, and it is labelled with that
stage. ``learning_rate`` in a record is the curriculum's LR of its last step.
``trainer.curriculum_callback.timeline`` lists (start step, stage) of every stage
reached, those before a resume point included.

Refused (a ``ConfigError`` before training): metric-triggered ``advance`` rules (the
Trainer runs the planned lengths: use :func:`stagetrain.fit`), ``max_steps`` other than
the curriculum's, ``auto_find_batch_size``, a stage ``grad_accum`` other than
``gradient_accumulation_steps``, a ``reset`` to another optimizer class or other param
groups, a loss term needing a teacher without one.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from stagetrain.batch import Batch
from stagetrain.collate import collate
from stagetrain.curriculum import Curriculum
from stagetrain.errors import ConfigError
from stagetrain.integrations._stages import (
    StageDriver,
    check_framework_run,
    check_in_place_resets,
    is_curriculum_optimizer,
    lr_at,
    needs_teacher,
    stage_loss,
    stage_optimizer,
)
from stagetrain.optim import apply_lr
from stagetrain.stepdata import step_loader

TUPLE_KEY = "stagetrain_tuple"
"""Where a tuple batch's parts after the first travel through the Trainer."""

LR_ARGUMENTS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
                "warmup_ratio")  # fmt: skip
OPTIMIZER_ARGUMENTS = ("optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2",
                       "adam_epsilon", "max_grad_norm")  # fmt: skip
OTHER_ARGUMENTS = ("dataloader_num_workers", "group_by_length", "label_smoothing_factor")


def to_trainer_batch(batch: Batch, main_input: str = "input_ids") -> dict[str, Any]:
    """A curriculum batch as the Trainer's dict (undone by :func:`from_trainer_batch`).

    Mappings stay as they are; a tuple ``(inputs, ..., targets)`` puts its first part
    under ``main_input`` (the Trainer counts its tokens and FLOPs there) and the rest
    under :data:`TUPLE_KEY`; a bare tensor is a one-part tuple.
    """
    if isinstance(batch, Mapping):
        return dict(batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    parts = tuple(batch) if isinstance(batch, tuple | list) else (batch,)
    return {main_input: parts[0], TUPLE_KEY: parts[1:]}


def from_trainer_batch(inputs: Mapping[str, Any], main_input: str = "input_ids") -> Batch:
    """The curriculum batch a Trainer dict came from (dicts of evaluation sets as they are)."""
    if TUPLE_KEY in inputs:
        return (inputs[main_input], *inputs[TUPLE_KEY])
    return dict(inputs)


class CurriculumLR(torch.optim.lr_scheduler.LRScheduler):
    """The curriculum's LR at global step ``last_epoch``, written by ``apply_lr``.

    The Trainer steps it after every optimizer step; its state is the step counter.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, curriculum: Curriculum) -> None:
        self.curriculum = curriculum
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        step = min(max(self.last_epoch, 0), self.curriculum.total_steps - 1)
        apply_lr(self.optimizer, lr_at(self.curriculum, step))
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "curriculum")}


class CurriculumCallback(TrainerCallback):
    """Applies the stage of every step (hand-off, freezing, LR, clipping) and closes a
    log record at every stage's last step; ``timeline`` lists the stages reached."""

    def __init__(self, curriculum: Curriculum, *, clip: bool = True) -> None:
        self.curriculum = curriculum
        self.driver = StageDriver(curriculum)
        self.clip = clip

    @property
    def timeline(self) -> list[tuple[int, str]]:
        """(planned start step, stage name) of every stage reached, before a resume too."""
        return self.driver.timeline

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        self.driver.start(state.global_step, model)

    def on_step_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        stage = self.driver.begin_step(state.global_step, model, [optimizer])
        if self.clip:
            assert stage.config.optimizer is not None
            args.max_grad_norm = stage.config.optimizer.grad_clip or 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        done = self.curriculum.stage_at(state.global_step - 1)
        if state.global_step == done.planned_start + done.steps:
            control.should_log = True  # no log record averages two stages


def _changed(args: TrainingArguments, names: tuple[str, ...]) -> list[str]:
    """``name=value`` of the arguments in ``names`` that differ from their defaults."""
    defaults = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    changed = []
    for name in names:
        if name not in defaults or not hasattr(args, name):
            continue
        spec = defaults[name]
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            continue
        value = getattr(args, name)
        if value != default and not (value in (None, {}, "") and default in (None, {}, "")):
            changed.append(f"{name}={value!r}")
    return changed


class CurriculumTrainer(Trainer):
    """A ``Trainer`` driven by ``curriculum`` (see the module docstring).

    Args:
        *args: the ``Trainer``'s (``model``, ``args``, ``eval_dataset``, ...).
        curriculum: the stages to train through; its ``train_dataset`` is the Trainer's.
        teacher: the frozen teacher of ``kl_distill`` terms (default: the curriculum's
            declared ``teacher``).
        curriculum_optimizer: build the optimizer from the curriculum (param groups,
            clipping); False: the Trainer's ``args.optim``, ``weight_decay`` and
            ``max_grad_norm``.
        **kwargs: the ``Trainer``'s.

    Raises:
        ConfigError: see "Refused" in the module docstring.
    """

    loss_is_scaled_for_ga = False  # per-micro-batch means: the Trainer divides by GA, as fit

    def __init__(
        self,
        *args: Any,
        curriculum: Curriculum,
        teacher: torch.nn.Module | None = None,
        curriculum_optimizer: bool = True,
        **kwargs: Any,
    ) -> None:
        self.curriculum = curriculum
        self.curriculum_optimizer = curriculum_optimizer
        self.curriculum_callback = CurriculumCallback(curriculum)
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.curriculum_callback]
        if len(args) < 3 and kwargs.get("data_collator") is None:
            # Evaluation rows are collated as training's are (padded, masked): the
            # Trainer's default collator stacks them and fails on different lengths.
            kwargs["data_collator"] = self._collate_eval
        super().__init__(*args, **kwargs)
        # Our compute_loss does not hand num_items_in_batch to the model: say so, so that
        # Trainer releases without loss_is_scaled_for_ga also divide by the micro-batches.
        self.model_accepts_loss_kwargs = False
        self._check_arguments()
        if teacher is None:
            teacher = curriculum.build_teacher()
        if teacher is None and needs_teacher(curriculum):
            raise ConfigError(
                "teacher: a stage's loss needs the teacher's output (kl_distill); pass "
                "CurriculumTrainer(..., teacher=model) or declare 'teacher' in the config"
            )
        self.teacher = (
            teacher.to(self.args.device).eval().requires_grad_(False)
            if teacher is not None
            else None
        )
        self._main_input = getattr(self.model, "main_input_name", "input_ids")

    # --- checks -----------------------------------------------------------------------

    def _check_arguments(self) -> None:
        args, curriculum, model = self.args, self.curriculum, self.model
        assert model is not None, "the Trainer needs a model"
        total = curriculum.total_steps
        if args.max_steps > 0 and args.max_steps != total:
            raise ConfigError(
                f"max_steps: {args.max_steps}, but the curriculum runs {total} steps; leave "
                "max_steps unset"
            )
        args.max_steps = total
        if args.auto_find_batch_size:
            raise ConfigError(
                "auto_find_batch_size: the curriculum fixes each step's batch; turn it off "
                "(use gradient_accumulation_steps to fit memory)"
            )
        if self.lr_scheduler is not None:
            raise ConfigError(
                "optimizers: the learning rate is the curriculum's at every step; pass "
                "optimizers=(optimizer, None) and let CurriculumTrainer schedule it"
            )
        ga, world = args.gradient_accumulation_steps, args.world_size
        check_framework_run(
            curriculum, grad_accum=ga, world_size=world, framework="the Trainer",
            argument="the Trainer's gradient_accumulation_steps",
        )  # fmt: skip
        freezes = [s for s in curriculum.stages if s.config.freeze]
        if world > 1 and freezes and args.ddp_find_unused_parameters is False:
            # DDP expects a gradient for every parameter that was trainable when it wrapped
            # the model; a stage that freezes some later needs it to look for unused ones.
            raise ConfigError(
                f"stages[{freezes[0].index}].freeze: under DDP, freezing parameters during the "
                "run needs ddp_find_unused_parameters=True (or unset)"
            )
        per_step = args.train_batch_size * world * ga
        stages = curriculum.stages
        if all(s.batch_size != per_step for s in stages):
            first = stages[0].batch_size
            hint = (
                f"per_device_train_batch_size={first // (world * ga)}"
                if first % (world * ga) == 0
                else "a batch_size divisible by world size x gradient_accumulation_steps"
            )
            raise ConfigError(
                f"per_device_train_batch_size: {args.per_device_train_batch_size} x world size "
                f"{world} x gradient_accumulation_steps {ga} = {per_step} samples per step, but "
                f"stages[0] has the curriculum's batch_size {first}; set {hint}"
            )
        for stage in stages:
            if stage.batch_size != per_step:
                warnings.warn(
                    f"stages[{stage.index}].batch_size: {stage.batch_size} samples per step in "
                    f"stage {stage.name!r}, not per_device_train_batch_size x world size x "
                    f"gradient_accumulation_steps = {per_step}: each step trains on its "
                    "stage's batch",
                    UserWarning,
                    stacklevel=3,
                )
        ignored = _changed(args, LR_ARGUMENTS + OTHER_ARGUMENTS)
        probe = self.optimizer
        if self.curriculum_optimizer and probe is None:
            ignored += _changed(args, OPTIMIZER_ARGUMENTS)
            probe = stage_optimizer(curriculum, model)
        if ignored:
            warnings.warn(
                f"TrainingArguments {', '.join(ignored)} do not apply: each step's data, loss, "
                "learning rate, optimizer and clipping come from the curriculum "
                "(stages[0].optimizer and each stage's; its data loader runs in the main "
                "process); curriculum_optimizer=False keeps the Trainer's optimizer and clipping",
                UserWarning,
                stacklevel=3,
            )
        owned = probe is not None and is_curriculum_optimizer(probe)
        if owned:
            check_in_place_resets(curriculum, model, probe, framework="the Trainer")
        self.curriculum_callback.clip = owned  # the curriculum's grad_clip with its optimizer

    # --- what the Trainer asks for ----------------------------------------------------

    def _collate_eval(self, items: list[Any]) -> Any:
        return to_trainer_batch(collate(items, self.curriculum.fmt), self._main_input)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
        main = self._main_input
        # Not passed through accelerator.prepare: the sampler already shards by rank.
        return step_loader(
            self.curriculum,
            0,
            self.args.process_index,
            self.args.world_size,
            micro_batches=self.args.gradient_accumulation_steps,
            collate_fn=lambda batch: to_trainer_batch(batch, main),
        )

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.curriculum_optimizer:
            target = self.model if model is None else model
            assert target is not None
            self.optimizer = stage_optimizer(self.curriculum, target)
        return super().create_optimizer(model)

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        if self.lr_scheduler is None:
            target = optimizer if optimizer is not None else self.optimizer
            assert target is not None, "the Trainer builds its optimizer before its scheduler"
            # Typed LambdaLR in transformers; any LRScheduler works (get_last_lr, step).
            self.lr_scheduler = CurriculumLR(target, self.curriculum)  # type: ignore[assignment]
            self._created_lr_scheduler = True  # rebuilt on the next train() call, as HF does
        return self.lr_scheduler

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The loss of the current step's stage (training) or of the stage trained last
        (evaluation); ``num_items_in_batch`` is not used (see the module docstring)."""
        stage = self.curriculum.stage_at(
            min(self.state.global_step, self.curriculum.total_steps - 1)
        )
        batch = from_trainer_batch(inputs, self._main_input)
        loss, _, pred = stage_loss(stage, model, batch, self.teacher)
        return (loss, pred.outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Labels every record with the stage of the steps it covers (the last one run)."""
        step = min(max(self.state.global_step - 1, 0), self.curriculum.total_steps - 1)
        stage = self.curriculum.stage_at(step)
        logs["stage_index"] = stage.index
        if "learning_rate" in logs:
            logs["learning_rate"] = lr_at(self.curriculum, step)
        if start_time is None:
            super().log(logs)  # Trainer releases before start_time existed
        else:
            super().log(logs, start_time)
        if self.state.log_history:
            # The name only in the stored history: reporting integrations take numbers.
            self.state.log_history[-1]["stage"] = stage.name  # type: ignore[assignment]

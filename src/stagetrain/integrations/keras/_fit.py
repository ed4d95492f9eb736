"""``fit_keras``: a Keras model trained through every stage of a curriculum.

One ``model.fit`` per stage (resumed stages start past step 0), over the stage's
:class:`StageDataset`. A callback owns everything per step, in the order of
stagetrain's own loop: the LR before the batch; after it the counters, the ``train``
record, evaluations, the advance rule and checkpoints. Between stages this module
applies the hand-off, the freeze patterns and the stage's loss, and recompiles.

Run directory (the same layout as :func:`stagetrain.fit`)::

    config.yaml  metrics.jsonl  summary.json  checkpoints/{ckpt-XXXXXXXX.pt, manifest.json}
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import torch
import yaml

from stagetrain.advance import AdvanceDecision, check_advance
from stagetrain.checkpoint import CheckpointStore, atomic_write_text, rng_state, set_rng_state
from stagetrain.config import (
    AdvanceConfig,
    CurriculumConfig,
    EvalConfig,
    load_config,
)
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.errors import CheckpointError, ConfigError, TrainingError
from stagetrain.evaluation import build_eval, evaluate_sums, finalize
from stagetrain.handoff import builds_optimizer
from stagetrain.integrations.keras._data import StageDataset, to_numpy
from stagetrain.integrations.keras._losses import BatchLoss, stage_losses
from stagetrain.integrations.keras._optim import (
    apply_keras_freeze,
    build_keras_optimizer,
    check_keras_optimizer,
    set_learning_rate,
    update_keras_optimizer,
)
from stagetrain.integrations.keras._state import capture_variables, restore_variables
from stagetrain.logs import METRICS_FILE, RunLogger, read_records
from stagetrain.state import TrainState
from stagetrain.time import Counters, Duration, Interval
from stagetrain.train import resume as resuming
from stagetrain.train import rundir
from stagetrain.train.resume import OnChange

FRAMEWORK = "keras"
_BATCH_LOSS = "stagetrain_loss"


@dataclass(frozen=True)
class StageSpan:
    """Where a stage ran in the global step count, and why it ended."""

    stage: str
    start: int
    end: int | None
    """Global step at the stage's end (None if the run stopped inside it)."""
    reason: str | None = None
    """``duration``, ``threshold`` or ``plateau``."""


@dataclass
class KerasFitResult:
    """What :func:`fit_keras` returns."""

    state: TrainState
    metrics: dict[str, dict[str, float]]
    """The newest value of every evaluation: ``{eval name: {metric: value}}``."""
    run_dir: Path
    timeline: list[StageSpan] = field(default_factory=list)
    """Every stage of the run so far, earlier processes' included (read from the log)."""
    status: str = "completed"
    """``completed``, or ``stopped`` when a user callback set ``model.stop_training``."""


def fit_keras(
    model: Any,
    curriculum: Curriculum | CurriculumConfig | str | Path,
    *,
    run_dir: str | Path,
    resume: bool = False,
    on_change: OnChange = "refuse",
    overwrite: bool = False,
    datasets: Mapping[str, Any] | None = None,
    losses: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    tensorboard: bool = False,
    jit_compile: bool | str = "auto",
) -> KerasFitResult:
    """Train a Keras 3 model through every stage of ``curriculum`` (any Keras backend).

    Per stage: the stage's batches (exactly those of stagetrain's own loop), its loss
    (built-in names mapped to Keras losses), its LR at every step, the hand-off
    (``carry``/``rewarm`` keep the optimizer and its state, ``reset`` builds a fresh
    one), ``freeze`` patterns on Keras variable paths, ``grad_clip`` as
    ``global_clipnorm``, the curriculum's evaluations and advance rules, JSONL logs
    and atomic checkpoints from which ``resume=True`` continues exactly.

    Example::

        curriculum = stagetrain.Curriculum.from_file("curriculum.yaml")
        model = keras.Sequential([keras.Input((50,)), keras.layers.Dense(2)])
        result = fit_keras(model, curriculum, run_dir="runs/keras")

    Args:
        model: a ``keras.Model`` mapping a batch's inputs to outputs (logits). The
            config's ``model`` section is not used (a warning says so).
        curriculum: a built :class:`~stagetrain.Curriculum`, a config, or a YAML/TOML path.
        run_dir: where config, logs and checkpoints go.
        resume: continue from the newest intact checkpoint in ``run_dir``.
        on_change: when the curriculum differs from the checkpoint's, as in
            :func:`stagetrain.fit`: ``refuse``, ``keep-position`` or ``restart-stage``.
        overwrite: start a fresh run in a ``run_dir`` that holds one (its files are moved
            aside, as ``stagetrain.fit(overwrite=True)`` does).
        datasets: in-memory datasets named ``"@name"`` in the config.
        losses: a ``keras.losses.Loss`` per stage name, replacing that stage's ``loss``
            (for losses without a Keras counterpart in the adapter).
        callbacks: Keras callbacks, passed to every stage's ``model.fit``.
        progress: show Keras' progress bar.
        tensorboard: also write TensorBoard events of the records (``keras.callbacks
            .TensorBoard`` in ``callbacks`` is the Keras way).
        jit_compile: passed to ``model.compile``.

    Returns:
        A :class:`KerasFitResult`.

    Raises:
        ConfigError: for a setting the Keras adapter refuses (named in the message).
        CheckpointError: for a resume that cannot continue (no checkpoint, another
            curriculum, another backend).
        StageTrainError: for a fresh run into a directory holding a run.
        TrainingError: on a non-finite loss.
    """
    if not isinstance(curriculum, Curriculum):
        config = curriculum if isinstance(curriculum, CurriculumConfig) else load_config(curriculum)
        curriculum = Curriculum(config, datasets=datasets)
    check_supported(curriculum)
    stage_loss_list = stage_losses(curriculum.stages, losses)
    run = _Run(
        model,
        curriculum,
        Path(run_dir),
        stage_loss_list,
        list(callbacks),
        progress=progress,
        jit_compile=jit_compile,
    )
    try:
        fresh = run.start(
            resume=resume, overwrite=overwrite, on_change=on_change, tensorboard=tensorboard
        )
        status = run.run() if fresh else "completed"
    finally:
        run.close()
    records = read_records(Path(run_dir) / METRICS_FILE)
    return KerasFitResult(run.state, run.last_metrics, Path(run_dir), timeline(records), status)


def check_supported(curriculum: Curriculum) -> None:
    """Refuse what the Keras adapter does not do, each with the field that asks for it.

    Raises:
        ConfigError: for ``teacher`` / ``kl_distill``, ``precision`` other than fp32,
            ``compile``, ``grad_accum`` > 1, a ``nonfinite.policy`` other than ``raise``,
            ``data_workers`` > 0, optimizer settings Keras cannot honour, ``batch.forward``,
            an evaluation loss ``model``, or a multi-process launch.
    """
    config = curriculum.config
    if config.teacher is not None:
        raise ConfigError("teacher: distillation (kl_distill) is not supported by fit_keras")
    if config.precision != "fp32":
        raise ConfigError(
            f"precision: {config.precision!r} is not supported by fit_keras; train in fp32 "
            "(Keras mixed-precision policies are not supported either)"
        )
    if keras.config.dtype_policy().name.startswith("mixed"):
        raise ConfigError(
            f"Keras dtype policy {keras.config.dtype_policy().name!r}: mixed precision is not "
            "supported by fit_keras (its loss-scale state would not be checkpointed)"
        )
    if config.compile:
        raise ConfigError("compile: torch.compile does not apply; use fit_keras(jit_compile=...)")
    if config.nonfinite.policy != "raise":
        raise ConfigError(
            f"nonfinite.policy: {config.nonfinite.policy!r} needs stagetrain.fit; fit_keras "
            "supports 'raise' (stop at the first non-finite loss)"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("fit_keras runs in a single process (WORLD_SIZE > 1 is not supported)")
    if config.model is not None:
        warnings.warn(
            "model: the config's model section is ignored by fit_keras (it trains the Keras "
            "model passed to it)",
            stacklevel=3,
        )
    if config.data_workers:
        # Keras 3.15's threaded PyDataset enqueuer replays the batches it prefetched while
        # model.fit peeks at the first one (measured: steps 1-11, then 0, 1, ...).
        raise ConfigError(
            f"data_workers: {config.data_workers} worker threads would reorder the batches "
            "in Keras' PyDataset enqueuer; fit_keras prepares batches in the training "
            "process (data_workers: 0)"
        )
    if config.pin_memory:
        warnings.warn("pin_memory: ignored by fit_keras", stacklevel=3)
    for stage in curriculum.stages:
        field = f"stages[{stage.index}]"
        if stage.config.grad_accum > 1:
            raise ConfigError(
                f"{field}.grad_accum: gradient accumulation is not supported by fit_keras"
            )
        assert stage.config.optimizer is not None
        check_keras_optimizer(stage.config.optimizer, field=f"{field}.optimizer")
    if config.batch.forward is not None:
        raise ConfigError(
            "batch.forward: a torch forward function cannot call a Keras model; fit_keras "
            "calls model(inputs) on (inputs, targets) batches"
        )
    for ev in [*config.evals, *(ev for s in config.stages for ev in s.evals)]:
        eval_set = build_eval(curriculum, ev)  # the config's errors, before training
        if ev.loss.name == "model":
            raise ConfigError(
                f"{eval_set.field}.loss: 'model' (the model's own loss) is not available "
                "from a Keras model; use a loss such as cross_entropy"
            )


def timeline(records: Sequence[Mapping[str, Any]]) -> list[StageSpan]:
    """Stage spans from a run's ``stage_start`` / ``stage_end`` records."""
    spans: list[StageSpan] = []
    for record in records:
        if record["type"] == "stage_start":
            spans.append(StageSpan(record["stage"], record["step"], None))
        elif record["type"] == "stage_end" and spans and spans[-1].stage == record["stage"]:
            start = spans[-1].start
            spans[-1] = StageSpan(record["stage"], start, record["step"], record["reason"])
    return spans


class _KerasAsModule(torch.nn.Module):
    """A Keras model seen as a torch module, for stagetrain's own evaluation code."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        # Not an attribute torch would register: a torch-backend Keras model is itself
        # an nn.Module, and .eval() here must not reach into it.
        self._keras = (model,)

    def forward(self, inputs: Any) -> torch.Tensor:
        output = self._keras[0].predict_on_batch(to_numpy(inputs))
        return torch.from_numpy(np.array(output))


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


class _Run:
    """The state machine behind :func:`fit_keras` (one instance per call)."""

    def __init__(
        self,
        model: Any,
        curriculum: Curriculum,
        run_dir: Path,
        losses: list[Any],
        callbacks: list[Any],
        *,
        progress: bool,
        jit_compile: bool | str,
    ) -> None:
        self.model = model
        self.curriculum = curriculum
        self.config = curriculum.config
        self.run_dir = run_dir
        self.losses = losses
        self.callbacks = callbacks
        self.progress = progress
        self.jit_compile = jit_compile
        self.store = CheckpointStore(run_dir / "checkpoints", keep=self.config.checkpoint.keep)
        self.state = TrainState()
        self.optimizer: Any = None
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.last_eval_step: dict[str, int] = {}
        self._eval_data: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._lr = 0.0
        self._data: StageDataset | None = None
        self._meter: list[float] = []
        """The losses of the steps since the last ``train`` record."""
        self._meter_started = time.perf_counter()
        self._t0 = time.perf_counter()
        self._elapsed_base = 0.0
        self.logger: RunLogger | None = None
        self.trainable: list[Any] = []

    # --- setup ------------------------------------------------------------------------

    def start(
        self, *, resume: bool, overwrite: bool, on_change: OnChange, tensorboard: bool
    ) -> bool:
        """Build the model's variables, restore a checkpoint if resuming, open the log.

        Returns False when the run directory holds this run, already completed.
        """
        _build(self.model, self.curriculum.stages[0])
        # The variables any stage may train; those the user froze before stay frozen.
        self.trainable = list(self.model.trainable_weights)
        resume_lines = None
        if resume:
            if not self.run_dir.is_dir():
                raise CheckpointError(f"{self.run_dir}: no such run directory to resume")
            payload, entry = self.store.load_latest()
            self._restore(payload, str(self.run_dir / "checkpoints" / entry.file), on_change)
            if self.state.stage_index >= len(self.curriculum.stages):
                return False  # a completed run: resuming it changes nothing
            resume_lines = int(payload["log_lines"])
        else:
            rundir.check_fresh(self.run_dir, overwrite=overwrite)
        rundir.check_writable(self.run_dir)
        atomic_write_text(
            self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        )
        (self.run_dir / rundir.SUMMARY).unlink(missing_ok=True)
        self.logger = RunLogger(
            self.run_dir,
            resume_lines=resume_lines,
            tensorboard=tensorboard,
            purge_step=self.state.step if resume else None,
        )
        self._t0 = time.perf_counter()
        self._elapsed_base = self.state.elapsed_s
        return True

    def _restore(self, payload: dict[str, Any], where: str, on_change: OnChange) -> None:
        if payload.get("framework") != FRAMEWORK:
            raise CheckpointError(f"{where}: written by stagetrain.fit, not fit_keras")
        if payload["backend"] != keras.backend.backend():
            raise CheckpointError(
                f"{where}: written on the Keras {payload['backend']} backend; this process "
                f"runs {keras.backend.backend()}"
            )
        # stagetrain's own rules: a changed curriculum is refused unless on_change says how.
        self.state = resuming.check_resume(payload, self.curriculum, on_change)
        saved = payload["keras"]
        restore_variables(self.model.variables, saved["model"], what="model")
        # The optimizer as the stage that built it (the first or a 'reset' stage) made it.
        builder = self.curriculum.stages[resuming.optimizer_builder(self.curriculum, self.state)]
        assert builder.config.optimizer is not None
        self.optimizer = build_keras_optimizer(builder.config.optimizer, self.trainable)
        restore_variables(self.optimizer.variables, saved["optimizer"], what="optimizer")
        set_rng_state(payload["rng"])
        self.last_metrics = json.loads(payload["metrics"])
        self.last_eval_step = dict(payload["last_eval_step"])

    def close(self) -> None:
        for variable in self.trainable:  # the model leaves as it came: freezes undone
            variable.trainable = True
        if self.logger is not None:
            self.logger.close()

    # --- the run ----------------------------------------------------------------------

    def run(self) -> str:
        stages = self.curriculum.stages
        while self.state.stage_index < len(stages):
            stage = stages[self.state.stage_index]
            self._enter_stage(stage)
            ending = self._train_stage(stage)
            if ending is None:
                self._checkpoint(stage)  # a user callback stopped training: resumable here
                return "stopped"
            self._finish_stage(stage, ending)
        summary = {
            "status": "completed",
            "state": self.state.to_dict(),
            "metrics": self.last_metrics,
        }
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return "completed"

    def _elapsed(self) -> float:
        return self._elapsed_base + time.perf_counter() - self._t0

    def _record(self, kind: str, stage: Stage, **fields: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "step": self.state.step,
            "stage": stage.name,
            "stage_step": self.state.stage_step,
            **fields,
        }

    def _log(self, record: dict[str, Any]) -> None:
        assert self.logger is not None
        self.logger.log(record)

    def _enter_stage(self, stage: Stage) -> None:
        cfg = stage.config
        assert cfg.optimizer is not None
        field = f"stages[{stage.index}].optimizer"
        if self.state.stage_step == 0:
            self.state.plateau_best, self.state.plateau_waits = None, 0
            if self.optimizer is None or builds_optimizer(cfg, stage.index):
                self.optimizer = build_keras_optimizer(cfg.optimizer, self.trainable, field=field)
                self.state.optimizer_stage = stage.index
            else:
                update_keras_optimizer(self.optimizer, cfg.optimizer, field=field)
            self.state.stage_start = {
                "step": self.state.step,
                "samples": self.state.samples,
                "tokens": self.state.tokens,
                "real_tokens": self.state.real_tokens,
            }
            self._log(
                self._record(
                    "stage_start",
                    stage,
                    stage_index=stage.index,
                    handoff=cfg.handoff if stage.index else "start",
                    planned_steps=stage.steps,
                    samples=self.state.samples,
                    tokens=self.state.tokens,
                    time=self._elapsed(),
                )
            )
        else:  # resumed inside the stage: its settings, as applied when it started
            update_keras_optimizer(self.optimizer, cfg.optimizer, field=field)
        apply_keras_freeze(self.trainable, cfg.freeze, field=f"stages[{stage.index}].freeze")
        loss = self.losses[stage.index]
        # Recompiled per stage: compiled train functions capture the trainable variables,
        # the loss and the optimizer's hyperparameters when they are traced.
        self.model.compile(
            optimizer=self.optimizer,
            loss=loss,
            metrics=[BatchLoss(loss, name=_BATCH_LOSS)],
            jit_compile=self.jit_compile,
        )

    def _train_stage(self, stage: Stage) -> AdvanceDecision | None:
        """Fit the rest of the stage; the reason it ended, or None if a callback stopped it."""
        self.evals = [
            (ev, Interval(ev.every or self.config.eval_every))
            for ev in self.curriculum.evals_for(stage)
        ]
        self.checkpoint_every = Interval(self.config.checkpoint.every, field="checkpoint.every")
        rule = stage.config.advance
        self.min_steps = 0
        if rule is not None and rule.min_duration is not None:
            self.min_steps = stage.context.to_steps(
                Duration.parse(rule.min_duration),
                field=f"stages[{stage.index}].advance.min_duration",
            )
        if self.state.stage_step < stage.steps:
            data = StageDataset(stage, self.state.stage_step)
            self._data = data
            self._meter, self._meter_started = [], time.perf_counter()
            hooks = _StepHooks(self, stage)
            self.model.fit(
                data,
                epochs=1,
                shuffle=False,  # Keras shuffles a PyDataset's batches by default
                verbose=1 if self.progress else 0,
                callbacks=[hooks, *self.callbacks],
            )
            if hooks.ending is not None:
                return hooks.ending
        if self.state.stage_step < stage.steps:
            return None
        return AdvanceDecision(False, "duration", f"reached its duration {stage.config.duration}")

    def before_step(self, stage: Stage, model: Any) -> None:
        self._lr = stage.lr(self.state.stage_step, self.state.step)
        set_learning_rate(model.optimizer, self._lr)

    def after_step(
        self, stage: Stage, model: Any, logs: Mapping[str, Any]
    ) -> AdvanceDecision | None:
        """Count the step, then log, evaluate, decide and checkpoint; a decision to advance."""
        state = self.state
        loss = float(logs[_BATCH_LOSS])  # the step's loss (Keras' own "loss" is a running mean)
        if not math.isfinite(loss):
            raise TrainingError(
                f"non-finite loss at step {state.step} in stage {stage.name!r} (stage step "
                f"{state.stage_step}). Lower the LR or set grad_clip"
            )
        before = Counters(state.step, state.samples, state.tokens)
        state.step += 1
        state.stage_step += 1
        state.samples += stage.batch_size
        state.tokens += stage.context.tokens(1)
        assert self._data is not None
        state.real_tokens += self._data.real_tokens.pop(state.stage_step - 1, 0)
        self._meter.append(loss)
        after = Counters(state.step, state.samples, state.tokens)
        last = state.stage_step == stage.steps
        if state.step % self.config.log_every == 0 or last:
            self._log_train(stage)
        rule = stage.config.advance
        decision = AdvanceDecision(False)
        for ev, every in self.evals:
            if every.due(before, after, state.stage_step, stage.context) and not last:
                metrics = self._evaluate(stage, ev)
                if rule is not None and rule.metric.startswith(ev.name + "."):
                    decision = self._decide(stage, rule, metrics)
        if decision.advance:
            return decision
        if not last and self.checkpoint_every.due(before, after, state.stage_step, stage.context):
            self._checkpoint(stage)
        return None

    def _log_train(self, stage: Stage) -> None:
        """A ``train`` record: the mean loss of the steps since the last one, as in fit."""
        state, losses = self.state, self._meter
        seconds = max(time.perf_counter() - self._meter_started, 1e-9)
        self._log(
            self._record(
                "train",
                stage,
                loss=sum(losses) / len(losses),
                lr=self._lr,
                samples=state.samples,
                tokens=state.tokens,
                tokens_real=state.real_tokens,
                samples_per_s=len(losses) * stage.batch_size / seconds,
                step_time=seconds / len(losses),
                time=self._elapsed(),
            )
        )
        self._meter = []
        self._meter_started = time.perf_counter()

    def _decide(self, stage: Stage, rule: AdvanceConfig, metrics: dict[str, float]) -> Any:
        key = rule.metric.partition(".")[2]
        if key not in metrics:
            raise TrainingError(
                f"stages[{stage.index}].advance.metric: the evaluation produced no {key!r}; "
                f"it produced {sorted(metrics)}"
            )
        value = metrics[key]
        if not math.isfinite(value):
            raise TrainingError(
                f"{rule.metric} is {value} at step {self.state.step} in stage {stage.name!r}: "
                "the model diverged or the metric failed; an advance rule never acts on a "
                "non-finite value"
            )
        return check_advance(rule, value, self.state, self.min_steps)

    def _evaluate(self, stage: Stage, ev: EvalConfig) -> dict[str, float]:
        # Computed by stagetrain's own evaluation code on the Keras model's outputs, so
        # every metric means what it means in stagetrain.fit.
        key = (ev.name, stage.index)
        if key not in self._eval_data:
            self._eval_data[key] = (
                build_eval(self.curriculum, ev),
                self.curriculum.eval_dataset(ev, stage),
            )
        eval_set, dataset = self._eval_data[key]
        sums = evaluate_sums(
            _KerasAsModule(self.model),
            dataset,
            eval_set,
            seq_len=self.curriculum.eval_seq_len(ev, stage),
        )
        metrics = finalize(eval_set, sums)
        self.last_metrics[ev.name] = metrics
        self.last_eval_step[ev.name] = self.state.step
        self._log(
            self._record(
                "eval",
                stage,
                name=ev.name,
                samples=self.state.samples,
                tokens=self.state.tokens,
                time=self._elapsed(),
                **metrics,
            )
        )
        return metrics

    def _finish_stage(self, stage: Stage, ending: AdvanceDecision) -> None:
        for ev in self.curriculum.evals_for(stage):
            if self.last_eval_step.get(ev.name) != self.state.step:
                self._evaluate(stage, ev)
        if self.progress:
            message = f"stage {stage.name!r} ended at step {self.state.step:,}: {ending.detail}"
            if ending.advance:
                message += f" ({ending.reason}; planned up to {stage.steps:,} stage steps)"
            print(message)
        self._log(
            self._record(
                "stage_end",
                stage,
                reason=ending.reason,
                detail=ending.detail,
                samples=self.state.samples,
                tokens=self.state.tokens,
                time=self._elapsed(),
            )
        )
        self.state.stage_index += 1
        self.state.stage_step = 0
        # A boundary checkpoint holds the next stage at step 0: resume applies its hand-off.
        self._checkpoint(stage)

    def _checkpoint(self, stage: Stage) -> None:
        assert self.logger is not None
        self.state.elapsed_s = self._elapsed()
        payload = {
            "framework": FRAMEWORK,
            "backend": keras.backend.backend(),
            "keras": {
                "model": capture_variables(self.model.variables),
                "optimizer": capture_variables(self.optimizer.variables),
            },
            "state": self.state.to_dict(),
            "rng": rng_state(),
            "fingerprint": self.config.fingerprint(),
            "config": json.dumps(self.config.fingerprint_dict()),
            "score_digests": dict(self.curriculum.score_digests),
            "metrics": json.dumps(self.last_metrics),
            "last_eval_step": dict(self.last_eval_step),
            "log_lines": self.logger.lines,
        }
        self.store.save(payload, step=self.state.step, stage=stage.name)


def _build(model: Any, stage: Stage) -> None:
    """Create the model's variables (a model without an input shape builds on a batch)."""
    if model.built and model.weights:
        return
    inputs, _ = StageDataset(stage)[0]
    model(inputs, training=False)

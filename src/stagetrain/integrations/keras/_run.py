"""The state machine behind ``fit_keras``: start or resume, enter, train and end each stage."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from stagetrain.advance import (
    NONFINITE_ADVICE,
    AdvanceDecision,
    check_advance,
    nonfinite_metric,
    rule_value,
    stage_end_message,
)
from stagetrain.checkpoint import CheckpointStore, atomic_write_text
from stagetrain.config import AdvanceConfig, EvalConfig
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.errors import CheckpointError, TrainingError
from stagetrain.handoff import builds_optimizer
from stagetrain.integrations.keras._data import StageDataset
from stagetrain.integrations.keras._evals import evaluate
from stagetrain.integrations.keras._hooks import _StepHooks
from stagetrain.integrations.keras._losses import BatchLoss
from stagetrain.integrations.keras._optim import (
    apply_keras_freeze,
    build_keras_optimizer,
    set_learning_rate,
    update_keras_optimizer,
)
from stagetrain.integrations.keras._resume import checkpoint_payload, restore_checkpoint
from stagetrain.logs import RunLogger
from stagetrain.records import position_record, stage_end_record, stage_start_record
from stagetrain.state import TrainState
from stagetrain.time import Counters, Duration, Interval
from stagetrain.train import rundir
from stagetrain.train.resume import OnChange

_BATCH_LOSS = "stagetrain_loss"


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
        self.state, self.optimizer = restore_checkpoint(
            payload, where, self.model, self.curriculum, self.trainable, on_change
        )
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
        return position_record(kind, stage.name, self.state, **fields)

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
            self.state.mark_stage_start()
            self._log(stage_start_record(stage, self.state, time=self._elapsed()))
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
        value = rule_value(rule, metrics, stage_index=stage.index)
        if not math.isfinite(value):
            detail = nonfinite_metric(rule, value, self.state.step, stage.name)
            raise TrainingError(detail + NONFINITE_ADVICE)
        return check_advance(rule, value, self.state, self.min_steps)

    def _evaluate(self, stage: Stage, ev: EvalConfig) -> dict[str, float]:
        metrics = evaluate(self.model, self.curriculum, stage, ev, self._eval_data)
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
            print(stage_end_message(stage.name, self.state.step, ending, stage.steps))
        self._log(
            stage_end_record(
                stage, self.state, reason=ending.reason, detail=ending.detail, time=self._elapsed()
            )
        )
        self.state.stage_index += 1
        self.state.stage_step = 0
        # A boundary checkpoint holds the next stage at step 0: resume applies its hand-off.
        self._checkpoint(stage)

    def _checkpoint(self, stage: Stage) -> None:
        assert self.logger is not None
        self.state.elapsed_s = self._elapsed()
        payload = checkpoint_payload(
            self.model,
            self.optimizer,
            self.state,
            self.curriculum,
            last_metrics=self.last_metrics,
            last_eval_step=self.last_eval_step,
            log_lines=self.logger.lines,
        )
        self.store.save(payload, step=self.state.step, stage=stage.name)


def _build(model: Any, stage: Stage) -> None:
    """Create the model's variables (a model without an input shape builds on a batch)."""
    if model.built and model.weights:
        return
    inputs, _ = StageDataset(stage)[0]
    model(inputs, training=False)

"""The stage machine behind :func:`stagetrain.fit`: enter a stage, train it, end it.

Every stage goes through the same three doors:

* :meth:`Runner.enter_stage` applies the hand-off and freezing (at its first step) and
  wraps the model for the engine;
* :meth:`Runner.train_stage` runs its steps until its duration, its advance rule or a
  stop request, logging, evaluating and checkpointing on the way;
* :meth:`Runner.end_stage` is the **only** stage exit: it always flushes the
  non-finite guard first, then runs the stage's final evaluations, logs ``stage_end``
  and writes the boundary checkpoint — whichever reason ended the stage.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stagetrain.advance import AdvanceDecision, stage_end_message
from stagetrain.checkpoint import atomic_write_text
from stagetrain.config import AdvanceConfig
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.errors import CheckpointError, TrainingError
from stagetrain.evaluation import EvalSet
from stagetrain.handoff import apply_freeze, builds_optimizer, enter_stage
from stagetrain.logs import RunLogger
from stagetrain.optim import apply_lr
from stagetrain.records import position_record, stage_end_record, stage_start_record
from stagetrain.signals import StopRequest
from stagetrain.state import TrainState
from stagetrain.stepdata import stage_batches
from stagetrain.time import Counters, Duration, Interval
from stagetrain.train import lr_auto, resume
from stagetrain.train.callbacks import RunContext, emit
from stagetrain.train.engine import Engine
from stagetrain.train.evals import Evaluations
from stagetrain.train.guards import NonFiniteGuard, Rollback
from stagetrain.train.meter import IntervalMeter
from stagetrain.train.progress import Reporter
from stagetrain.train.step import StepRunner
from stagetrain.train.stores import RunStore


@dataclass(frozen=True)
class Ending:
    """Why a stage ended: ``duration``, ``threshold`` or ``plateau``, and in words."""

    reason: str
    detail: str
    early: bool = False


class Runner:
    """Runs the stages of one :func:`~stagetrain.fit` call (see the module docstring)."""

    def __init__(
        self,
        *,
        curriculum: Curriculum,
        model: torch.nn.Module,
        engine: Engine,
        store: RunStore,
        logger: RunLogger,
        state: TrainState,
        optimizer: torch.optim.Optimizer | None,
        teacher: torch.nn.Module | None,
        callbacks: list[Any],
        run_dir: Path,
        reporter: Reporter,
        trainable: dict[str, bool],
        eval_sets: dict[str, EvalSet],
        scaler_state: dict[str, Any] | None = None,
        sampler_state: dict[str, Any] | None = None,
        signals: StopRequest | None = None,
    ) -> None:
        self.curriculum = curriculum
        self.config = curriculum.config
        self.model = model
        self.engine = engine
        self.store = store
        self.logger = logger
        self.state = state
        self.optimizer = optimizer
        self.callbacks = callbacks
        self.run_dir = run_dir
        self.reporter = reporter
        self.trainable = trainable
        self.eval_sets = eval_sets
        self.device = engine.device
        self.steps = StepRunner(engine, self.device, self.config.precision, teacher)
        if scaler_state is not None and self.steps.scaler is not None:
            self.steps.scaler.load_state_dict(scaler_state)  # fp16: the loss scale continues
        self.guard = NonFiniteGuard(self.config.nonfinite, engine)
        self.signals = signals if signals is not None else StopRequest()
        if sampler_state is not None and state.stage_index < len(curriculum.stages):
            # A scheduled mixture's cursor at the resumed step: no recomputation of its past.
            restore = getattr(curriculum.stages[state.stage_index].sampler, "restore", None)
            if restore is not None:
                restore(sampler_state)
        self.checkpoint_every = Interval(self.config.checkpoint.every, field="checkpoint.every")
        self.meter = IntervalMeter(engine)
        self.evals = Evaluations(
            curriculum=curriculum, model=model, engine=engine, eval_sets=eval_sets,
            guard=self.guard, logger=logger, reporter=reporter,
        )  # fmt: skip
        self.last_eval_step: dict[str, int] = {}
        self.train_model: torch.nn.Module = model
        self.step_optimizer: Any = optimizer
        self.clock_start = time.perf_counter()
        self.elapsed_base = state.elapsed_s
        self.resumed = state.step > 0 or state.stage_index > 0
        self.context = RunContext(
            curriculum, model, optimizer, state, run_dir, self.current_stage, {}
        )

    # --- small helpers ----------------------------------------------------------------

    @property
    def current_stage(self) -> Stage:
        """The stage in progress (the last one once the run is complete)."""
        stages = self.curriculum.stages
        return stages[min(self.state.stage_index, len(stages) - 1)]

    @property
    def last_metrics(self) -> dict[str, dict[str, float]]:
        return self.context.last_metrics

    def elapsed(self) -> float:
        return self.elapsed_base + time.perf_counter() - self.clock_start

    def record(self, kind: str, stage: Stage, **fields: Any) -> dict[str, Any]:
        return position_record(kind, stage.name, self.state, **fields)

    def emit(self, hook: str, *args: Any) -> None:
        if self.callbacks:
            self.context.state, self.context.optimizer = self.state, self.optimizer
            self.context.stage = self.current_stage
            emit(self.callbacks, hook, self.context, *args)

    # --- the run ----------------------------------------------------------------------

    def run(self) -> bool:
        """Train every remaining stage; False when stopped early (by a request or signal)."""
        stages = self.curriculum.stages
        self.emit("on_fit_start")
        try:
            while self.state.stage_index < len(stages):
                stage = stages[self.state.stage_index]
                self.enter_stage(stage)
                try:
                    ending = self.train_stage(stage)
                except Rollback as rollback:
                    self.roll_back(str(rollback))
                    continue
                if ending is None:
                    self.store.wait()  # a background checkpoint is complete before we return
                    return False
                self.end_stage(stage, ending)
            self.store.wait()
            self.finish()
            return True
        finally:
            self.reporter.close()

    def enter_stage(self, stage: Stage) -> None:
        state, cfg = self.state, stage.config
        self.reporter.stage(stage.index, len(self.curriculum.stages), stage.name)
        if state.stage_step == 0:
            state.plateau_best, state.plateau_waits = None, 0
            if self.optimizer is None or builds_optimizer(cfg, stage.index):
                state.optimizer_stage = stage.index
            self.optimizer = enter_stage(
                cfg, stage.index, self.model, self.optimizer, self.trainable
            )
            state.mark_stage_start()
            self.logger.log(stage_start_record(stage, state, time=self.elapsed()))
            self.context.resumed = False
        else:  # continuing a stage from a checkpoint: its hand-off was applied already
            apply_freeze(
                self.model, cfg.freeze, self.trainable, field=f"stages[{stage.index}].freeze"
            )
            self.context.resumed = True
            self.reporter.line(
                f"resumed from step {state.step:,}: stage {stage.name!r}, stage step "
                f"{state.stage_step:,} of {stage.steps:,}"
            )
        self.emit("on_stage_start")
        self.context.resumed = False
        assert self.optimizer is not None
        self.train_model, self.step_optimizer = self.engine.wrap(self.model, self.optimizer)
        if self.config.compile:
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]
        lr_auto.enter_stage(self, stage)  # lr: auto: the stage's LR search (after its hand-off)

    def _min_steps(self, stage: Stage, rule: AdvanceConfig | None) -> int:
        if rule is None or rule.min_duration is None:
            return 0
        return stage.context.to_steps(
            Duration.parse(rule.min_duration), field=f"stages[{stage.index}].advance.min_duration"
        )

    def train_stage(self, stage: Stage) -> Ending | None:
        """Run the stage's steps; None when a stop was requested (the run ends)."""
        state, cfg, config = self.state, stage.config, self.config
        assert cfg.optimizer is not None
        model, optimizer = self.train_model, self.step_optimizer
        grad_clip = cfg.optimizer.grad_clip
        samples_per_step, tokens_per_step = stage.batch_size, stage.context.tokens(1)
        evals = [
            (self.eval_sets[ev.name], Interval(ev.every or config.eval_every))
            for ev in self.curriculum.evals_for(stage)
        ]
        rule = cfg.advance
        min_steps = self._min_steps(stage, rule)
        deferred = self.guard.deferred
        log_every = config.log_every
        info = self.engine.info
        model.train()
        batches = stage_batches(
            self.curriculum,
            stage,
            state.stage_step,
            rank=info.rank,
            world_size=info.world_size,
            micro_batches=cfg.grad_accum,
            workers=config.data_workers,
            pin_memory=config.pin_memory,
        )
        for micro in batches:
            stage_step = state.stage_step
            lr = stage.lr(stage_step, state.step) * state.rollback_lr_scale
            apply_lr(optimizer, lr)
            result = self.steps.forward_backward(stage, model, micro)
            will_log = (state.step + 1) % log_every == 0 or stage_step + 1 == stage.steps
            if deferred:
                self.guard.watch(state.step, stage.name, stage_step, result.loss, result.terms)
                skipped = None
            else:
                skipped = self.guard.check_now(
                    state.step, stage.name, stage_step, result.loss, result.terms
                )
            if skipped is None:
                norm = self.steps.update(model, optimizer, grad_clip=grad_clip, want_norm=will_log)
            else:
                self.steps.discard(optimizer)
                state.skipped += 1
                norm = None
                self.logger.log(self.record("skip", stage, detail=skipped, time=self.elapsed()))
            before = Counters(state.step, state.samples, state.tokens)
            state.step += 1
            state.stage_step += 1
            state.samples += samples_per_step
            state.tokens += tokens_per_step
            self.meter.add(result, samples_per_step)
            self.reporter.advance()
            if will_log:
                self.log_train(stage, lr, norm)
            if self.callbacks:
                self.emit("on_step_end")
            if self.signals.installed and self._signalled(log_every):
                self.context.stop = (True, True)  # a scheduler's SIGTERM: checkpoint, then stop
            if self.context.stop is not None:
                self.stop()
                return None
            after = Counters(state.step, state.samples, state.tokens)
            at_end = state.stage_step == stage.steps
            decision: AdvanceDecision | None = None
            for eval_set, interval in evals:
                if interval.due(before, after, state.stage_step, stage.context) and not at_end:
                    metrics = self.evaluate(stage, eval_set)
                    if rule is not None and rule.metric.startswith(eval_set.name + "."):
                        decision = self.evals.decide(
                            stage, rule, metrics, state, min_steps, self.record,
                            config.nonfinite.policy,
                        )  # fmt: skip
            if decision is not None and decision.advance:
                return Ending(decision.reason, decision.detail, early=True)
            if not at_end and self.checkpoint_every.due(
                before, after, state.stage_step, stage.context
            ):
                self.checkpoint(stage)
        counted = lr_auto.counted_search(state, stage)
        return Ending("duration", f"reached its duration {cfg.duration}{counted}")

    def _signalled(self, every: int) -> bool:
        """Whether a stop signal arrived (every rank stops at the same step: in a
        distributed run the flag is agreed every ``every`` steps, a host sync already)."""
        if self.engine.info.world_size == 1:
            return self.signals.requested
        if self.state.step % every:
            return False
        if self.engine.any(self.signals.requested):
            if not self.signals.requested:  # another rank got it: stop for the same reason
                self.signals.request(signal.SIGTERM)
            return True
        return False

    def end_stage(self, stage: Stage, ending: Ending) -> None:
        """The only exit of a stage: flush the guard, evaluate, log, checkpoint."""
        self.guard.flush()
        for ev in self.curriculum.evals_for(stage):
            if self.last_eval_step.get(ev.name) != self.state.step:
                self.evaluate(stage, self.eval_sets[ev.name])
        decision = AdvanceDecision(ending.early, ending.reason, ending.detail)
        if ending.early:
            self.reporter.shrink(stage.steps - self.state.stage_step)
        self.reporter.line(stage_end_message(stage.name, self.state.step, decision, stage.steps))
        self.logger.log(
            stage_end_record(
                stage, self.state, reason=ending.reason, detail=ending.detail, time=self.elapsed()
            )
        )
        self.emit("on_stage_end")
        self.state.stage_index += 1
        self.state.stage_step = 0
        # A boundary checkpoint holds the next stage at step 0: resume applies its hand-off.
        self.checkpoint(stage)

    def finish(self) -> None:
        self.emit("on_fit_end")
        if self.engine.is_main:
            summary = {
                "status": "completed",
                "state": self.state.to_dict(),
                "metrics": self.last_metrics,
            }
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))

    def stop(self) -> None:
        """End the run after this step, as requested (with a checkpoint unless told not to)."""
        assert self.context.stop is not None
        _, with_checkpoint = self.context.stop
        if with_checkpoint:
            self.checkpoint(self.current_stage)

    # --- what happens inside a stage ------------------------------------------------------

    def log_train(self, stage: Stage, lr: float, norm: torch.Tensor | None) -> None:
        self.guard.flush()
        fields = self.meter.fields(self.state, lr, norm)
        by_source = stage.source_tokens(self.state.stage_step)
        if by_source is not None:  # e.g. did stage 2 really see 70 % / 30 %?
            fields.update({f"source_tokens/{label}": n for label, n in by_source.items()})
        record = self.record("train", stage, **fields, time=self.elapsed())
        self.logger.log(record)
        self.reporter.train(record)
        self.context.loss, self.context.lr = fields["loss"], lr
        self.context.grad_norm = fields.get("grad_norm")
        self.emit("on_log", record)

    def evaluate(self, stage: Stage, eval_set: EvalSet) -> dict[str, float]:
        started = time.perf_counter()
        metrics = self.evals.run(stage, eval_set, self.state, self.record, self.elapsed())
        self.last_metrics[eval_set.name] = metrics
        self.last_eval_step[eval_set.name] = self.state.step
        self.emit("on_eval", eval_set.name, metrics)
        self.meter.pause(time.perf_counter() - started)
        return metrics

    def checkpoint(self, stage: Stage) -> None:
        assert self.optimizer is not None
        self.guard.flush()  # a checkpoint never holds a non-finite model
        started = time.perf_counter()
        self.meter.fold_tokens(self.state)
        self.state.elapsed_s = self.elapsed()
        rngs, meters = resume.gather_ranks(self.engine, self.meter)  # every rank joins
        meta = resume.capture_meta(
            curriculum=self.curriculum, state=self.state, rngs=rngs, log_lines=self.logger.lines,
            world_size=self.engine.info.world_size, scaler=self.steps.scaler, meter=meters,
        )  # fmt: skip
        sampler_state = getattr(self.current_stage.sampler, "resume_state", None)
        if sampler_state is not None and self.state.stage_index < len(self.curriculum.stages):
            meta["sampler"] = sampler_state(self.state.stage_step)
        # Single files: rank 0 writes; sharded (FSDP): every rank writes its shards.
        path = self.store.save(
            model=self.model, optimizer=self.optimizer, meta=meta, step=self.state.step,
            stage=stage.name,
        )  # fmt: skip
        if path is not None:
            self.emit("on_checkpoint", path)
        self.meter.pause(time.perf_counter() - started)

    def roll_back(self, detail: str) -> None:
        """Restore the newest checkpoint and lower the LR (the ``rollback`` policy)."""
        policy = self.config.nonfinite
        if self.state.rollbacks >= policy.max_rollbacks:
            raise TrainingError(f"{detail}; gave up after {policy.max_rollbacks} rollbacks")
        try:
            payload, _entry = self.store.load_latest()
        except CheckpointError:
            raise TrainingError(f"{detail}; no checkpoint to roll back to") from None
        state = resume.TrainState.from_dict(payload["state"])
        state.rollback_lr_scale = self.state.rollback_lr_scale * policy.rollback_lr_factor
        state.rollbacks = self.state.rollbacks + 1
        state.skipped = self.state.skipped
        self.model.zero_grad(set_to_none=True)  # the bad step's gradients must not leak in
        self.optimizer = resume.restore(payload, self.curriculum, self.model, state, self.engine)
        if self.steps.scaler is not None and "scaler" in payload:
            self.steps.scaler.load_state_dict(payload["scaler"])
        record = self.record(
            "rollback", self.current_stage, detail=detail, to_step=state.step,
            lr_scale=state.rollback_lr_scale, time=self.elapsed(),
        )  # fmt: skip
        self.state = state
        self.guard.clear()
        self.meter.restore(payload.get("meter"), state.step)  # the checkpoint's interval
        self.last_eval_step.clear()
        # The log goes back to the checkpoint too: the steps after it will be logged again.
        self.logger.truncate(int(payload["log_lines"]))
        self.logger.log(record)
        self.reporter.goto(state.step)
        self.reporter.line(
            f"{detail}: rolled back to step {state.step:,}, LR x{state.rollback_lr_scale:g}"
        )

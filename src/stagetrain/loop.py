"""The built-in training loop: :func:`fit` runs a curriculum from start or checkpoint to end.

Plain PyTorch: one forward, one backward and one optimizer step per step; the loss is
read back to the host only at logging intervals, so the loop never stalls the device
in between. Everything the curriculum decides (batch, loss, LR, stage) comes from
:class:`~stagetrain.curriculum.Curriculum`, the same object a user's own loop drives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import yaml
from tqdm.auto import tqdm

from stagetrain.advance import AdvanceDecision, check_advance
from stagetrain.checkpoint import CheckpointStore, atomic_write_text, rng_state, set_rng_state
from stagetrain.config import CurriculumConfig, config_diff, load_config
from stagetrain.curriculum import Curriculum, Stage, TrainState
from stagetrain.data import Batch
from stagetrain.distributed import DistInfo, default_device, gather_objects, init_from_env, wrap_ddp
from stagetrain.errors import CheckpointError, ConfigError, StageTrainError, TrainingError
from stagetrain.evaluation import evaluate, finalize_metrics
from stagetrain.handoff import apply_freeze, apply_handoff, build_optimizer
from stagetrain.logs import RunLogger
from stagetrain.time import Duration, TimeUnit

OnChange = Literal["refuse", "keep-position", "restart-stage"]


class Callback(Protocol):
    """Hooks of the loop; implement any subset (missing methods are skipped).

    Methods: ``on_stage_start(run)``, ``on_step_end(run)``, ``on_eval(run, name, metrics)``,
    ``on_checkpoint(run, path)``, ``on_stage_end(run)``, ``on_fit_end(run)``; ``run`` is the
    :class:`RunContext`.
    """


@dataclass
class RunContext:
    """What callbacks see: the live objects of the run."""

    curriculum: Curriculum
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    run_dir: Path
    stage: Stage
    last_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class FitResult:
    """Outcome of :func:`fit`: final counters, last metrics per evaluation, run directory."""

    state: TrainState
    metrics: dict[str, dict[str, float]]
    run_dir: Path


class _StageSteps(torch.utils.data.IterableDataset):
    """A stage's batches from ``start`` on, split across DataLoader workers by step."""

    def __init__(self, stage: Stage, start: int, rank: int, world_size: int) -> None:
        self.stage, self.start, self.rank, self.world_size = stage, start, rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + worker, self.stage.steps, workers):
            yield self.stage.batch(step, self.rank, self.world_size)


def _pin(batch: Batch) -> Batch:
    return batch[0].pin_memory(), batch[1].pin_memory()


@dataclass(frozen=True)
class _Counters:
    """The counters an interval is measured in, just before a step."""

    step: int
    samples: int
    tokens: int


class _Interval:
    """'Every N units' as a crossing test on the run's counters.

    Steps, samples and tokens are global (so arms of a comparison evaluate at the same
    amount of data); epochs and fractions are converted per stage.
    """

    def __init__(self, text: str | None) -> None:
        self.duration = Duration.parse(text, field="every") if text else None

    def due(self, before: _Counters, after: TrainState, stage: Stage) -> bool:
        if self.duration is None:
            return False
        unit = self.duration.unit
        if unit in (TimeUnit.STEP, TimeUnit.SAMPLE, TimeUnit.TOKEN):
            attr = {TimeUnit.STEP: "step", TimeUnit.SAMPLE: "samples", TimeUnit.TOKEN: "tokens"}[
                unit
            ]
            every = self.duration.value
            return math.floor(getattr(after, attr) / every) > math.floor(
                getattr(before, attr) / every
            )
        every_steps = stage.context.to_steps(self.duration, field="every")
        return after.stage_step % every_steps == 0


def default_run_dir(name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def check_writable(run_dir: Path, needed_bytes: int = 0) -> None:
    """Fail before training when the run directory cannot be written or has too little space.

    ``needed_bytes`` is an estimate of what the run's checkpoints will occupy.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise StageTrainError(
            f"{run_dir}: run directory is not writable ({exc.strerror})"
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise StageTrainError(
            f"{run_dir}: only {free / 2**20:,.1f} MiB free, but the checkpoints need about "
            f"{needed_bytes / 2**20:,.1f} MiB; free space or lower checkpoint.keep"
        )


def checkpoint_bytes_estimate(model: torch.nn.Module, keep: int) -> int:
    """Model + two optimizer moments per kept checkpoint, one more while writing, plus logs."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params * 3 * (keep + 1) + (1 << 20)


def fit(
    model: torch.nn.Module,
    curriculum: Curriculum | CurriculumConfig | str | Path,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_change: OnChange = "refuse",
    datasets: Mapping[str, Any] | None = None,
    teacher: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    tensorboard: bool = True,
    stop_after: int | None = None,
    engine: Literal["torch", "accelerate"] = "torch",
) -> FitResult:
    """Train ``model`` through every stage of ``curriculum``.

    Args:
        model: any ``nn.Module`` mapping a batch's inputs to outputs (logits).
        curriculum: a built :class:`Curriculum`, a config, or a path to a YAML/TOML file.
        run_dir: where config, logs and checkpoints go (default ``runs/<name>-<time>``).
        resume: continue from the newest intact checkpoint in ``run_dir``.
        on_change: when the curriculum differs from the checkpoint's: ``refuse`` (default,
            lists what changed), ``keep-position`` (same stage and stage-local step under
            the new curriculum) or ``restart-stage`` (the current stage starts over).
        datasets: in-memory datasets named ``"@name"`` in the config.
        teacher: frozen model for ``kl_distill`` loss terms.
        device: defaults to CUDA when available, else CPU.
        callbacks: objects with any of the :class:`Callback` methods.
        progress: show a progress bar.
        tensorboard: write TensorBoard events (when the package is installed).
        stop_after: stop (without a final checkpoint) once this many global steps are done;
            used to simulate an interrupted run.
        engine: ``torch`` (the process group ``torchrun`` describes, DDP) or ``accelerate``
            (Hugging Face Accelerate prepares model and optimizer, for ``accelerate launch``).

    Returns:
        A :class:`FitResult`.
    """
    if not isinstance(curriculum, Curriculum):
        config = curriculum if isinstance(curriculum, CurriculumConfig) else load_config(curriculum)
        curriculum = Curriculum(config, datasets=datasets, has_teacher=teacher is not None)
    config = curriculum.config
    accelerator = None
    if engine == "accelerate":
        try:
            from accelerate import Accelerator
        except ImportError:
            raise StageTrainError(
                "engine 'accelerate' needs: pip install 'stagetrain[accelerate]'"
            ) from None
        accelerator = Accelerator()
        info = DistInfo(
            accelerator.process_index, accelerator.num_processes, accelerator.local_process_index
        )
        if device is None:
            device = accelerator.device
    elif engine == "torch":
        info = init_from_env()
    else:
        raise ConfigError(f"engine: expected 'torch' or 'accelerate', got {engine!r}")
    rank, world_size, is_main = info.rank, info.world_size, info.is_main
    for stage in curriculum.stages:
        if stage.batch_size % world_size:
            raise ConfigError(
                f"stages[{stage.index}].batch_size: {stage.batch_size} is not divisible by the "
                f"world size {world_size}; the global batch is split evenly across ranks"
            )
    run_path = Path(run_dir) if run_dir is not None else default_run_dir(config.name)
    if resume and not run_path.is_dir():
        raise CheckpointError(f"{run_path}: no such run directory to resume")
    if is_main:
        check_writable(run_path, checkpoint_bytes_estimate(model, config.checkpoint.keep))
    dev = torch.device(device) if device is not None else default_device(info)
    model.to(dev)
    if teacher is None:
        teacher = curriculum.build_teacher()
    if teacher is not None:
        teacher.to(dev).eval()
    store = CheckpointStore(run_path / "checkpoints", keep=config.checkpoint.keep)
    trainable_at_start = {n: p.requires_grad for n, p in model.named_parameters()}
    state = TrainState()
    optimizer: torch.optim.Optimizer | None = None
    resume_lines: int | None = None
    if resume:
        payload, _entry = store.load_latest()
        state = _check_resume(payload, curriculum, on_change)
        optimizer = _restore(payload, curriculum, model, state, info)
        resume_lines = int(payload["log_lines"])
    else:
        torch.manual_seed(config.seed)
    if is_main:
        atomic_write_text(
            run_path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False)
        )
    logger = RunLogger(
        run_path,
        enabled=is_main,
        resume_lines=resume_lines,
        tensorboard=tensorboard,
        purge_step=state.step if resume else None,
    )
    # The first optimizer built in a process imports torch._dynamo (about a second on a
    # small CPU). Pay it before the run clock starts so wall-clock curves measure training.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    loop = _Loop(
        curriculum,
        model,
        optimizer,
        state,
        run_path,
        store,
        logger,
        dev,
        teacher,
        list(callbacks),
        rank,
        world_size,
        trainable_at_start,
        accelerator,
    )
    if resume and loop.scaler is not None and "scaler" in payload:
        loop.scaler.load_state_dict(payload["scaler"])  # fp16: the loss scale continues
    try:
        loop.run(progress=progress and is_main, stop_after=stop_after)
    finally:
        logger.close()
    return FitResult(loop.state, loop.last_metrics, run_path)


def _restore(
    payload: dict[str, Any],
    curriculum: Curriculum,
    model: torch.nn.Module,
    state: TrainState,
    info: DistInfo,
) -> torch.optim.Optimizer:
    """Load model, optimizer and RNG from a checkpoint; returns the optimizer for ``state``.

    The data order depends only on the global step, so any world size continues it
    exactly. Per-rank random streams (dropout) continue exactly only with the world
    size the checkpoint was written with; otherwise each rank's stream is re-seeded
    from (seed, step, rank), and a warning says so.
    """
    model.load_state_dict(payload["model"])
    current = min(state.stage_index, len(curriculum.stages) - 1)
    # The param groups were laid out by the stage that last built the optimizer (the first
    # stage or a 'reset' hand-off); the saved state restores every group's settings.
    builder = max(
        i for i in range(current + 1) if i == 0 or curriculum.stages[i].config.handoff == "reset"
    )
    opt_cfg = curriculum.stages[builder].config.optimizer
    assert opt_cfg is not None
    optimizer = build_optimizer(model.named_parameters(), opt_cfg)
    optimizer.load_state_dict(payload["optimizer"])
    rngs = payload["rng"]
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    else:
        set_rng_state(rngs[0])
        torch.manual_seed(hash((curriculum.config.seed, state.step, info.rank)) & 0xFFFF_FFFF)
        if info.is_main:
            warnings.warn(
                f"resuming with world size {info.world_size} from a checkpoint written with "
                f"{len(rngs)}: the data order continues exactly; per-rank random streams "
                "(dropout) are re-seeded from (seed, step, rank)",
                stacklevel=3,
            )
    return optimizer


class _Rollback(Exception):
    """Raised inside the step loop to restart from the newest checkpoint (NaN policy)."""


def _check_resume(
    payload: dict[str, Any], curriculum: Curriculum, on_change: OnChange
) -> TrainState:
    """The state to continue from, after checking the curriculum did not change."""
    state = TrainState.from_dict(payload["state"])
    if payload["fingerprint"] == curriculum.config.fingerprint():
        return state
    changes = config_diff(json.loads(payload["config"]), curriculum.config.fingerprint_dict())
    listing = "; ".join(changes[:20]) + (
        f"; ... ({len(changes)} in all)" if len(changes) > 20 else ""
    )
    if on_change == "refuse":
        raise CheckpointError(
            f"the curriculum changed since the checkpoint: {listing}. Pass "
            "--on-change keep-position (continue at the same stage and stage step) or "
            "--on-change restart-stage (start the current stage over) to continue anyway"
        )
    if state.stage_index >= len(curriculum.stages):
        raise CheckpointError(
            f"the checkpoint is in stage {state.stage_index}, but the new curriculum has "
            f"{len(curriculum.stages)} stages"
        )
    if on_change == "restart-stage":
        state.stage_step = 0
    elif state.stage_step >= curriculum.stages[state.stage_index].steps:
        raise CheckpointError(
            f"the checkpoint is at step {state.stage_step} of stage "
            f"{curriculum.stages[state.stage_index].name!r}, past its new length"
        )
    return state


class _Loop:
    """The state machine behind :func:`fit` (one instance per call)."""

    def __init__(
        self,
        curriculum: Curriculum,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        state: TrainState,
        run_dir: Path,
        store: CheckpointStore,
        logger: RunLogger,
        device: torch.device,
        teacher: torch.nn.Module | None,
        callbacks: list[Any],
        rank: int,
        world_size: int,
        trainable_at_start: dict[str, bool],
        accelerator: Any = None,
    ) -> None:
        self.accelerator = accelerator
        self.curriculum = curriculum
        self.config = curriculum.config
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.run_dir = run_dir
        self.store = store
        self.logger = logger
        self.device = device
        self.teacher = teacher
        self.callbacks = callbacks
        self.rank = rank
        self.world_size = world_size
        self.info = DistInfo(rank, world_size, device.index or 0)
        self.train_model: torch.nn.Module = model
        self.step_optimizer: Any = optimizer
        precision = self.config.precision
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
            precision
        ]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.is_main = rank == 0
        self.trainable_at_start = trainable_at_start
        self.last_metrics: dict[str, dict[str, float]] = {}
        self._last_eval_step: dict[str, int] = {}
        self._consecutive_skips = 0
        self._watch_reset()
        self.checkpoint_every = _Interval(self.config.checkpoint.every)
        self._clock_start = time.perf_counter()
        self._elapsed_base = state.elapsed_s

    # --- helpers ----------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self._elapsed_base + time.perf_counter() - self._clock_start

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self._context(), *args)

    def _context(self) -> RunContext:
        assert self.optimizer is not None
        stage = self._current_stage()
        return RunContext(
            self.curriculum,
            self.model,
            self.optimizer,
            self.state,
            self.run_dir,
            stage,
            self.last_metrics,
        )

    def _current_stage(self) -> Stage:
        """The stage in progress (the last one once the run is complete)."""
        return self.curriculum.stages[min(self.state.stage_index, len(self.curriculum.stages) - 1)]

    def _record(self, kind: str, stage: Stage, **fields: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "step": self.state.step,
            "stage": stage.name,
            "stage_step": self.state.stage_step,
            **fields,
        }

    # --- the run ----------------------------------------------------------------------

    def run(self, *, progress: bool, stop_after: int | None) -> None:
        stages = self.curriculum.stages
        bar = tqdm(
            total=self.curriculum.total_steps,
            initial=self.state.step,
            disable=not progress,
            dynamic_ncols=True,
            unit="step",
        )
        try:
            while self.state.stage_index < len(stages):
                stage = stages[self.state.stage_index]
                self._enter_stage(stage)
                bar.set_description(f"[{stage.index + 1}/{len(stages)}] {stage.name}")
                try:
                    ending = self._train_stage(stage, bar, stop_after)
                except _Rollback as rollback:
                    self._roll_back(str(rollback), bar)
                    continue
                if ending is None:
                    return
                if ending.advance:
                    bar.total -= stage.steps - self.state.stage_step
                    bar.refresh()
                self._finish_stage(stage, ending, bar)
            self._emit("on_fit_end")
            if self.is_main:
                summary = {
                    "status": "completed",
                    "state": self.state.to_dict(),
                    "metrics": self.last_metrics,
                }
                atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        finally:
            bar.close()

    def _roll_back(self, detail: str, bar: Any) -> None:
        """Restore the newest checkpoint and lower the LR (the 'rollback' NaN policy)."""
        policy = self.config.nonfinite
        if self.state.rollbacks >= policy.max_rollbacks:
            raise TrainingError(f"{detail}; gave up after {policy.max_rollbacks} rollbacks")
        try:
            payload, _entry = self.store.load_latest()
        except CheckpointError:
            raise TrainingError(f"{detail}; no checkpoint to roll back to") from None
        state = TrainState.from_dict(payload["state"])
        state.lr_scale = self.state.lr_scale * policy.rollback_lr_factor
        state.rollbacks = self.state.rollbacks + 1
        state.skipped = self.state.skipped
        self.logger.log(
            self._record(
                "rollback", self._current_stage(), detail=detail, to_step=state.step,
                lr_scale=state.lr_scale, time=self._elapsed(),
            )
        )  # fmt: skip
        self.model.zero_grad(set_to_none=True)  # the bad step's gradients must not leak in
        self.optimizer = _restore(payload, self.curriculum, self.model, state, self.info)
        if self.scaler is not None and "scaler" in payload:
            self.scaler.load_state_dict(payload["scaler"])
        self.state = state
        self._watch_reset()
        bar.n = state.step
        bar.refresh()
        if self.is_main and not bar.disable:
            bar.write(f"{detail}: rolled back to step {state.step:,}, LR x{state.lr_scale:g}")

    def _watch_reset(self) -> None:
        self._pending: list[tuple[int, torch.Tensor, tuple[torch.Tensor, ...]]] = []

    def _watch(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], step: int) -> None:
        """Keep this step's loss for the next finiteness check (no device work, no sync)."""
        self._pending.append((step, loss.detach(), tuple(terms.values())))

    def _check_finite(self, stage: Stage, terms: list[str]) -> None:
        """Raise (policy 'raise') if any step since the last check had a non-finite loss.

        One stacked ``isfinite`` and one read-back per check (logging, checkpoint, stage
        end) instead of work on every step.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        finite = torch.isfinite(torch.stack([loss for _, loss, _ in pending]))
        if bool(finite.all()):  # host sync: only here
            return
        index = int((~finite).nonzero()[0, 0])
        first, _, values = pending[index]
        bad_terms = [
            name for name, v in zip(terms, values, strict=True) if not torch.isfinite(v).all()
        ]
        stage_step = first - (self.state.step - self.state.stage_step)
        raise TrainingError(
            f"non-finite loss at step {first} in stage {stage.name!r} (stage step {stage_step}); "
            f"non-finite terms: {bad_terms or terms}. Lower the LR, set grad_clip, or choose "
            "nonfinite.policy 'skip' or 'rollback'"
        )

    def _enter_stage(self, stage: Stage) -> None:
        cfg = stage.config
        if self.state.stage_step == 0:
            self.state.plateau_best, self.state.plateau_waits = None, 0
            self.optimizer = apply_handoff(
                self.optimizer, self.model, cfg, first_stage=stage.index == 0
            )
            self.logger.log(
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
            self._emit("on_stage_start")
        assert self.optimizer is not None
        apply_freeze(
            self.model, cfg.freeze, self.trainable_at_start, field=f"stages[{stage.index}].freeze"
        )
        # DDP tracks the parameters that require gradients when it is built: rebuild per stage.
        if self.accelerator is not None:
            # Accelerate wraps for whatever `accelerate launch` configured (DDP on CPU here).
            self.train_model = self.accelerator.prepare_model(self.model)
            self.step_optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        else:
            self.train_model = (
                wrap_ddp(self.model, self.device) if self.world_size > 1 else self.model
            )
            self.step_optimizer = self.optimizer
        if self.config.compile:
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]

    def _train_stage(
        self, stage: Stage, bar: Any, stop_after: int | None
    ) -> AdvanceDecision | None:
        """Run the stage until its end or its advance rule; None when stopped by ``stop_after``."""
        assert self.optimizer is not None and stage.config.optimizer is not None
        optimizer, model, state = self.step_optimizer, self.train_model, self.state
        grad_clip = stage.config.optimizer.grad_clip
        tokens_per_step = stage.context.tokens(1)
        evals = [
            (ev, _Interval(ev.every or self.config.eval_every))
            for ev in self.curriculum.evals_for(stage)
        ]
        policy = self.config.nonfinite.policy
        rule = stage.config.advance
        min_steps = 0
        if rule is not None and rule.min_duration is not None:
            min_steps = stage.context.to_steps(
                Duration.parse(rule.min_duration),
                field=f"stages[{stage.index}].advance.min_duration",
            )
        model.train()
        batches = self._batches(stage, state.stage_step)
        for stage_step in range(state.stage_step, stage.steps):
            inputs, targets = next(batches)
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            lr = stage.lr(stage_step, state.step) * state.lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_multiplier", 1.0)
            loss, terms = self._forward_backward(stage, model, inputs, targets)
            if policy == "raise":
                self._watch(loss, terms, state.step)
                update = True
            else:
                update = self._finite_or_handle(stage, loss, terms)
            if update:
                if self.scaler is not None:
                    self.scaler.unscale_(optimizer)
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                if self.scaler is not None:
                    self.scaler.step(optimizer)
                    self.scaler.update()
                else:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            before = _Counters(state.step, state.samples, state.tokens)
            state.step += 1
            state.stage_step += 1
            state.samples += stage.batch_size
            state.tokens += tokens_per_step
            bar.update(1)
            if state.step % self.config.log_every == 0 or state.stage_step == stage.steps:
                self._log_train(stage, loss, terms, lr, bar)
            self._emit("on_step_end")
            decision = AdvanceDecision(False)
            for ev, interval in evals:
                if interval.due(before, state, stage) and state.stage_step != stage.steps:
                    metrics = self._evaluate(stage, ev)
                    if rule is not None and rule.metric.startswith(ev.name + "."):
                        value = metrics[rule.metric[len(ev.name) + 1 :]]
                        decision = self._agree(check_advance(rule, value, state, min_steps))
            if decision.advance:
                return decision
            if self.checkpoint_every.due(before, state, stage) and state.stage_step != stage.steps:
                self._check_finite(stage, list(stage.loss.names))
                self._checkpoint(stage)
            if stop_after is not None and state.step >= stop_after:
                return None
        self._check_finite(stage, list(stage.loss.names))
        return AdvanceDecision(False, "duration", f"reached its duration {stage.config.duration}")

    def _batches(self, stage: Stage, start: int) -> Iterator[Batch]:
        """This rank's batches for stage steps ``start, start + 1, ...``.

        With ``data_workers > 0`` a DataLoader prepares them in worker processes: worker
        ``w`` builds steps ``start + w, start + w + W, ...`` and the loader hands them out
        round-robin, so the order is exactly the single-process one.
        """
        workers = self.config.data_workers
        if workers == 0:
            for step in range(start, stage.steps):
                batch = stage.batch(step, self.rank, self.world_size)
                yield _pin(batch) if self.config.pin_memory else batch
            return
        loader = torch.utils.data.DataLoader(
            _StageSteps(stage, start, self.rank, self.world_size),
            batch_size=None,
            num_workers=workers,
            pin_memory=self.config.pin_memory,
            prefetch_factor=4,
            multiprocessing_context="fork",  # stages hold closures (schedules): no pickling
        )
        yield from loader

    def _forward_backward(
        self, stage: Stage, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward over ``grad_accum`` micro-batches; returns the mean loss.

        Gradients are synchronised across ranks only on the last micro-batch.
        """
        accum = stage.config.grad_accum
        plain = self.autocast_dtype is None and self.scaler is None and self.accelerator is None
        if accum == 1 and plain and not stage.loss.needs_teacher:
            # The common case, kept free of per-step Python overhead.
            loss, terms = stage.loss(model(inputs), targets, model=model)
            loss.backward()
            return loss.detach(), terms
        micro = zip(inputs.chunk(accum), targets.chunk(accum), strict=True)
        total: torch.Tensor | None = None
        term_totals: dict[str, torch.Tensor] = {}
        for i, (x, y) in enumerate(micro):
            last = i == accum - 1
            sync = contextlib.nullcontext()
            if not last and self.world_size > 1:
                no_sync = getattr(model, "no_sync", None)
                if no_sync is not None:
                    sync = no_sync()
            with sync:
                autocast = (
                    torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None
                    else contextlib.nullcontext()
                )
                with autocast:
                    output = model(x)
                    teacher_output = None
                    if stage.loss.needs_teacher:
                        assert self.teacher is not None
                        with torch.no_grad():
                            teacher_output = self.teacher(x)
                    loss, terms = stage.loss(output, y, teacher_output, model=model)
                    loss = loss / accum
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                elif self.accelerator is not None:
                    self.accelerator.backward(loss)
                else:
                    loss.backward()
            detached = loss.detach()
            total = detached if total is None else total + detached
            for name, value in terms.items():
                value = value.detach() / accum
                term_totals[name] = value if name not in term_totals else term_totals[name] + value
        assert total is not None
        return total, term_totals

    def _finite_or_handle(
        self, stage: Stage, loss: torch.Tensor, terms: dict[str, torch.Tensor]
    ) -> bool:
        """Policies 'skip' and 'rollback': True when the loss is finite and the update may run."""
        value = float(loss.detach())  # a per-step host sync, the price of these policies
        if math.isfinite(value):
            self._consecutive_skips = 0
            return True
        bad = [k for k, v in terms.items() if not math.isfinite(float(v.detach()))]
        detail = (
            f"non-finite loss at step {self.state.step} in stage {stage.name!r} "
            f"(stage step {self.state.stage_step}; terms {bad or list(terms)})"
        )
        if self.config.nonfinite.policy == "rollback":
            raise _Rollback(detail)
        self._consecutive_skips += 1
        self.state.skipped += 1
        limit = self.config.nonfinite.max_consecutive_skips
        if self._consecutive_skips > limit:
            raise TrainingError(f"{detail}; more than {limit} consecutive batches skipped")
        self.logger.log(self._record("skip", stage, detail=detail, time=self._elapsed()))
        return False

    def _agree(self, decision: AdvanceDecision) -> AdvanceDecision:
        """Every rank takes rank 0's decision (they compute the same one from reduced metrics)."""
        if self.world_size == 1:
            return decision
        flag = torch.tensor([int(decision.advance)], dtype=torch.int64)
        torch.distributed.broadcast(flag, src=0)
        return dataclasses.replace(decision, advance=bool(flag.item()))

    def _log_train(
        self, stage: Stage, loss: torch.Tensor, terms: dict[str, torch.Tensor], lr: float, bar: Any
    ) -> None:
        self._check_finite(stage, list(terms))
        value = float(loss.detach())  # the one host sync, at logging intervals only
        term_values = (
            {f"loss/{k}": float(v.detach()) for k, v in terms.items()} if len(terms) > 1 else {}
        )
        self.logger.log(
            self._record(
                "train",
                stage,
                loss=value,
                lr=lr,
                samples=self.state.samples,
                tokens=self.state.tokens,
                time=self._elapsed(),
                **term_values,
            )
        )
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)

    def _evaluate(self, stage: Stage, ev: Any) -> dict[str, float]:
        dataset = self.curriculum.eval_dataset(ev)
        sums = evaluate(
            self.model,
            dataset,
            metrics=list(ev.metrics),
            loss_name=ev.loss,
            batch_size=ev.batch_size,
            max_samples=ev.max_samples,
            seq_len=ev.seq_len or stage.config.seq_len,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
        )
        if self.world_size > 1:
            for value in sums.values():
                torch.distributed.all_reduce(value)
        metrics = finalize_metrics(sums, list(ev.metrics))
        self.last_metrics[ev.name] = metrics
        self._last_eval_step[ev.name] = self.state.step
        self.logger.log(
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
        self._emit("on_eval", ev.name, metrics)
        return metrics

    def _finish_stage(self, stage: Stage, ending: AdvanceDecision, bar: Any) -> None:
        for ev in self.curriculum.evals_for(stage):
            if self._last_eval_step.get(ev.name) != self.state.step:
                self._evaluate(stage, ev)
        message = f"stage {stage.name!r} ended at step {self.state.step:,}: {ending.detail}"
        if ending.advance:
            message += f" ({ending.reason}; planned up to {stage.steps:,} stage steps)"
        if self.is_main and bar.disable is False:
            bar.write(message)
        self.logger.log(
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
        self._emit("on_stage_end")
        self.state.stage_index += 1
        self.state.stage_step = 0
        # A boundary checkpoint holds the next stage at step 0: resume applies its hand-off.
        self._checkpoint(stage)

    def _checkpoint(self, stage: Stage) -> None:
        assert self.optimizer is not None
        self.state.elapsed_s = self._elapsed()
        rngs = gather_objects(rng_state(), self.world_size)  # a collective: every rank joins
        if self.is_main:
            payload = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "state": self.state.to_dict(),
                "rng": rngs,
                "fingerprint": self.config.fingerprint(),
                "config": json.dumps(self.config.fingerprint_dict()),
                "log_lines": self.logger.lines,
                "world_size": self.world_size,
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            }
            path = self.store.save(payload, step=self.state.step, stage=stage.name)
            self._emit("on_checkpoint", path)
        if self.world_size > 1:
            torch.distributed.barrier()

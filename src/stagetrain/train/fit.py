"""``fit()``: a curriculum from start (or checkpoint) to end, in one call.

This module decides *what* runs — a fresh run, a resume, or nothing (a finished run)
— checks everything before step 0 (:mod:`~stagetrain.train.preflight`) and hands the
rest to the :class:`~stagetrain.train.runner.Runner`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from stagetrain.checkpoint import atomic_write_text
from stagetrain.compat import ensure_compatible
from stagetrain.config import CurriculumConfig, ParallelConfig, load_config
from stagetrain.curriculum import Curriculum
from stagetrain.env import read_launch_env
from stagetrain.errors import ConfigError, StageTrainError
from stagetrain.handoff import trainable_flags
from stagetrain.logs import RunLogger
from stagetrain.optim import build_optimizer
from stagetrain.rundir import open_run_dir
from stagetrain.signals import StopRequest, graceful_shutdown
from stagetrain.state import TrainState
from stagetrain.train import resume as resuming
from stagetrain.train import rundir
from stagetrain.train.engine import AccelerateEngine, Engine, TorchEngine
from stagetrain.train.preflight import preflight
from stagetrain.train.progress import Reporter
from stagetrain.train.runner import Runner
from stagetrain.train.stores import RunStore, open_store

OnChange = resuming.OnChange


@dataclass
class FitResult:
    """Outcome of :func:`fit`: final counters, last metrics per evaluation, run directory."""

    state: TrainState
    metrics: dict[str, dict[str, float]]
    run_dir: Path
    completed: bool = True
    """False when the run stopped early (a stop request or a signal)."""
    stopped_by: StopRequest | None = None
    """The signal that stopped the run (``exit_code`` 143 for SIGTERM, 130 for SIGINT)."""


def _as_curriculum(
    curriculum: Curriculum | CurriculumConfig | str | Path,
    datasets: Mapping[str, Any] | None,
    teacher: torch.nn.Module | None,
) -> Curriculum:
    if isinstance(curriculum, Curriculum):
        if datasets:
            raise ConfigError(
                "datasets: the curriculum is already built, so datasets= would be ignored; "
                "pass them to Curriculum(config, datasets=...) instead"
            )
        return curriculum
    config = curriculum if isinstance(curriculum, CurriculumConfig) else load_config(curriculum)
    return Curriculum(config, datasets=datasets, has_teacher=teacher is not None)


def make_engine(
    engine: str | Engine,
    device: str | torch.device | None,
    parallel: ParallelConfig | None = None,
) -> Engine:
    """The engine object for ``engine`` (``torch``, ``accelerate``, or one already built)
    and the config's ``parallel`` block (``fsdp``: :class:`~stagetrain.train.fsdp.FSDPEngine`)."""
    dev = torch.device(device) if device is not None else None
    fsdp = parallel is not None and parallel.kind == "fsdp"
    if not isinstance(engine, str):
        if fsdp and not getattr(engine, "sharded", False):
            raise ConfigError(
                f"parallel.kind: 'fsdp', but the engine passed to fit() "
                f"({type(engine).__name__}) does not shard; pass engine='torch'"
            )
        return engine
    if engine == "torch":
        if fsdp:
            from stagetrain.train.fsdp import FSDPEngine

            assert parallel is not None
            return FSDPEngine(parallel, device=dev)
        return TorchEngine(device=dev)
    if engine == "accelerate":
        if fsdp:
            raise ConfigError(
                "parallel.kind: 'fsdp' runs on PyTorch's FSDP2 under the torch engine; use "
                "--engine torch (it runs under accelerate launch as under torchrun)"
            )
        return AccelerateEngine(device=dev)
    raise ConfigError(f"engine: expected 'torch' or 'accelerate', got {engine!r}")


def fit(
    model: torch.nn.Module,
    curriculum: Curriculum | CurriculumConfig | str | Path,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_change: OnChange = "refuse",
    overwrite: bool = False,
    auto_resume: bool = False,
    datasets: Mapping[str, Any] | None = None,
    teacher: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    tensorboard: bool = True,
    engine: Literal["torch", "accelerate"] | Engine = "torch",
    handle_signals: bool = False,
) -> FitResult:
    """Train ``model`` through every stage of ``curriculum``.

    Args:
        model: any ``nn.Module``; it is called by the batch convention of
            :mod:`stagetrain.modelio` (``model(inputs)``, ``model(**batch)``, ...).
        curriculum: a built :class:`Curriculum`, a config, or a path to a YAML/TOML file.
        run_dir: where config, logs and checkpoints go (default ``runs/<name>-<time>``).
            A fresh run needs a directory without another run's files.
        resume: continue from the newest intact checkpoint in ``run_dir`` (a finished run
            is left as it is).
        on_change: when the curriculum differs from the checkpoint's: ``refuse`` (default,
            lists what changed), ``keep-position`` (same stage and stage-local step under
            the new curriculum) or ``restart-stage`` (the current stage starts over).
        overwrite: start fresh in a used ``run_dir``, moving its old files aside.
        auto_resume: resume when ``run_dir`` holds a checkpoint (rebuilding a lost manifest
            from the checkpoints' sidecars), else start fresh.
        datasets: in-memory datasets named ``"@name"`` in the config (when ``curriculum``
            is not built yet).
        teacher: frozen model for ``kl_distill`` loss terms (default: the config's).
        device: defaults to CUDA when available, else CPU.
        callbacks: objects with any of the :class:`~stagetrain.train.callbacks.Callback`
            methods; ``run.request_stop()`` ends training early.
        progress: show a progress bar (or plain lines when not on a terminal).
        tensorboard: write TensorBoard events (when the package is installed).
        engine: ``torch`` (the process group ``torchrun`` describes; DDP, or FSDP2 under
            the config's ``parallel: {kind: fsdp}``), ``accelerate``
            (for ``accelerate launch``), or an :class:`~stagetrain.train.engine.Engine`.
        handle_signals: on SIGTERM/SIGINT finish the current step, write a checkpoint and
            return (``FitResult.stopped_by``); a second signal exits at once. The CLI
            turns it on; off by default so a notebook's Ctrl-C keeps its usual meaning.

    Returns:
        A :class:`FitResult`.

    Raises:
        ConfigError, DataError, CheckpointError, StageTrainError: before step 0, naming
            the field or file; TrainingError: when training cannot go on.
    """
    curriculum = _as_curriculum(curriculum, datasets, teacher)
    config = curriculum.config
    eng = make_engine(engine, device, config.parallel)
    info = eng.info
    for stage in curriculum.stages:
        if stage.batch_size % info.world_size:
            raise ConfigError(
                f"stages[{stage.index}].batch_size: {stage.batch_size} is not divisible by the "
                f"world size {info.world_size}; the global batch is split evenly across ranks"
            )
    run_path = Path(run_dir) if run_dir is not None else rundir.default_run_dir(config.name)
    with contextlib.ExitStack() as held:
        action = _open_run_dir(held, run_path, eng, resume, auto_resume, overwrite)
        if action == "finished":
            return _finished(run_path)  # resuming a finished run changes nothing
        if info.is_main:
            needed = rundir.checkpoint_bytes_estimate(model, config.checkpoint.keep)
            rundir.check_writable(run_path, needed)
        eng.barrier()
        model.to(eng.device)
        model = eng.prepare(model)  # FSDP shards here, before any optimizer is built
        if teacher is None:
            teacher = curriculum.build_teacher()
        if teacher is not None:
            teacher.to(eng.device).eval()
        trainable = trainable_flags(model)
        store = open_store(
            run_path / "checkpoints",
            keep=config.checkpoint.keep,
            engine=eng,
            async_save=config.checkpoint.async_save,
        )
        start = _starting_point(action == "resume", store, curriculum, model, eng, on_change)
        eval_sets = preflight(
            curriculum, model, teacher, device=eng.device, rank=info.rank,
            world_size=info.world_size,
        )  # fmt: skip
        if info.is_main:  # only now: a refused resume or preflight leaves config.yaml as it was
            text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            atomic_write_text(run_path / "config.yaml", text)
            (run_path / "summary.json").unlink(missing_ok=True)
        logger = RunLogger(
            run_path,
            enabled=info.is_main,
            resume_lines=start.log_lines,
            tensorboard=tensorboard,
            purge_step=start.state.step if start.log_lines is not None else None,
        )
        # The first optimizer built in a process imports torch._dynamo (about a second on a
        # small CPU). Pay it before the run clock starts so wall-clock curves measure training.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        stop = held.enter_context(graceful_shutdown()) if handle_signals else StopRequest()
        runner = Runner(
            curriculum=curriculum,
            model=model,
            engine=eng,
            store=store,
            logger=logger,
            state=start.state,
            optimizer=start.optimizer,
            teacher=teacher,
            callbacks=list(callbacks),
            run_dir=run_path,
            reporter=Reporter(
                enabled=info.is_main,
                progress=progress,
                total=curriculum.total_steps,
                initial=start.state.step,
            ),
            trainable=trainable,
            eval_sets=eval_sets,
            scaler_state=start.scaler,
            sampler_state=start.sampler,
            signals=stop,
        )
        runner.meter.restore(start.meter, start.state.step)  # a resume's partial interval
        try:
            completed = runner.run()
        finally:
            logger.close()
    return FitResult(
        runner.state, runner.last_metrics, run_path, completed, stop if stop.requested else None
    )


@dataclass
class _Start:
    """Where a run starts: counters, optimizer, log position and saved loop state."""

    state: TrainState
    optimizer: torch.optim.Optimizer | None = None
    log_lines: int | None = None
    scaler: dict[str, Any] | None = None
    sampler: dict[str, Any] | None = None
    meter: dict[str, Any] | None = None
    """The checkpoint's partial logging interval (None before checkpoints carried it)."""


def _open_run_dir(
    held: contextlib.ExitStack,
    run_path: Path,
    eng: Engine,
    resume: bool,
    auto_resume: bool,
    overwrite: bool,
) -> str:
    """Lock the run directory on rank 0 for the whole run and decide what it does there
    (``fresh``, ``resume`` or ``finished``); every rank gets rank 0's decision."""
    info = eng.info
    outcome: tuple[str, str] = ("", "")
    error: StageTrainError | None = None
    if info.is_main:
        # After a torchrun restart, give the dead attempt's lock a moment to be released.
        wait = 5.0 if read_launch_env().restarted else 0.0
        try:
            decision = held.enter_context(
                open_run_dir(run_path, resume=resume, auto_resume=auto_resume,
                             overwrite=overwrite, wait_s=wait)
            )  # fmt: skip
            outcome = (decision.action, "")
        except StageTrainError as exc:
            if info.world_size == 1:
                raise
            error, outcome = exc, ("error", str(exc))
    outcome = eng.gather(outcome)[0]
    if outcome[0] == "error":
        if error is not None:
            raise error
        raise StageTrainError(f"rank 0 could not open {run_path}: {outcome[1]}")
    return outcome[0]


def _finished(run_path: Path) -> FitResult:
    summary = rundir.read_summary(run_path) or {}
    state = TrainState.from_dict(summary.get("state", {}))
    return FitResult(state, dict(summary.get("metrics", {})), run_path)


def _starting_point(
    resume: bool,
    store: RunStore,
    curriculum: Curriculum,
    model: torch.nn.Module,
    eng: Engine,
    on_change: OnChange,
) -> _Start:
    """A fresh start, or the checkpoint's state restored (after every check passed)."""
    if not resume:
        torch.manual_seed(curriculum.config.seed)
        return _Start(TrainState())
    payload, entry = store.load_latest()
    resuming.check_payload(payload, str(store.directory / str(getattr(entry, "file", ""))))
    state = resuming.check_resume(payload, curriculum, on_change)
    builder = resuming.optimizer_builder(curriculum, state)
    opt_cfg = curriculum.stages[builder].config.optimizer
    assert opt_cfg is not None
    if "model" in payload:  # a single-file checkpoint (a sharded one is checked as it loads)
        # Before anything is loaded or written: does it fit this model and optimizer?
        ensure_compatible(
            model,
            lambda m: build_optimizer(m.named_parameters(), opt_cfg),
            payload,
            context=f"resuming {store.directory.parent}"
            + (f" with --on-change {on_change}" if on_change != "refuse" else ""),
        )
    optimizer = resuming.restore(payload, curriculum, model, state, eng)
    return _Start(
        state, optimizer, int(payload["log_lines"]), payload.get("scaler"), payload.get("sampler"),
        payload.get("meter"),
    )  # fmt: skip


def summary_of(run_dir: Path) -> dict[str, Any] | None:
    """The ``summary.json`` of a completed run, if any."""
    path = Path(run_dir) / rundir.SUMMARY
    return json.loads(path.read_text()) if path.exists() else None

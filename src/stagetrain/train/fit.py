"""``fit()``: a curriculum from start (or checkpoint) to end, in one call.

This module decides *what* runs — a fresh run, a resume, or nothing (a finished run)
— checks everything before step 0 (:mod:`~stagetrain.train.preflight`) and hands the
rest to the :class:`~stagetrain.train.runner.Runner`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from stagetrain.checkpoint import atomic_write_text
from stagetrain.config import CurriculumConfig, ParallelConfig, load_config
from stagetrain.curriculum import Curriculum
from stagetrain.errors import CheckpointError, ConfigError
from stagetrain.handoff import trainable_flags
from stagetrain.logs import RunLogger
from stagetrain.state import TrainState
from stagetrain.train import resume as resuming
from stagetrain.train import rundir
from stagetrain.train.engine import AccelerateEngine, Engine, TorchEngine
from stagetrain.train.preflight import preflight
from stagetrain.train.progress import Reporter
from stagetrain.train.runner import Runner
from stagetrain.train.stores import open_store

OnChange = resuming.OnChange


@dataclass
class FitResult:
    """Outcome of :func:`fit`: final counters, last metrics per evaluation, run directory."""

    state: TrainState
    metrics: dict[str, dict[str, float]]
    run_dir: Path
    completed: bool = True
    """False when the run stopped early (a stop request or a signal)."""


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
    datasets: Mapping[str, Any] | None = None,
    teacher: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    tensorboard: bool = True,
    engine: Literal["torch", "accelerate"] | Engine = "torch",
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
    if resume and not run_path.is_dir():
        raise CheckpointError(f"{run_path}: no such run directory to resume")
    if info.is_main and not resume:
        rundir.check_fresh(run_path, overwrite=overwrite)
    if info.is_main:
        rundir.check_writable(
            run_path, rundir.checkpoint_bytes_estimate(model, config.checkpoint.keep)
        )
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
    state = TrainState()
    optimizer = None
    resume_lines: int | None = None
    scaler_state = None
    if resume:
        payload, entry = store.load_latest()
        resuming.check_payload(payload, str(run_path / "checkpoints" / entry.file))
        state = resuming.check_resume(payload, curriculum, on_change)
        finished = rundir.read_summary(run_path)
        if finished is not None and state.stage_index >= len(curriculum.stages):
            # Resuming a finished run changes nothing: its summary stays as it is.
            return FitResult(
                TrainState.from_dict(finished.get("state", {})),
                dict(finished.get("metrics", {})),
                run_path,
            )
        optimizer = resuming.restore(payload, curriculum, model, state, eng)
        resume_lines = int(payload["log_lines"])
        scaler_state = payload.get("scaler")
    else:
        torch.manual_seed(config.seed)
    eval_sets = preflight(
        curriculum,
        model,
        teacher,
        device=eng.device,
        rank=info.rank,
        world_size=info.world_size,
    )
    if info.is_main:
        atomic_write_text(
            run_path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False)
        )
        (run_path / "summary.json").unlink(missing_ok=True)
    logger = RunLogger(
        run_path,
        enabled=info.is_main,
        resume_lines=resume_lines,
        tensorboard=tensorboard,
        purge_step=state.step if resume else None,
    )
    # The first optimizer built in a process imports torch._dynamo (about a second on a
    # small CPU). Pay it before the run clock starts so wall-clock curves measure training.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    runner = Runner(
        curriculum=curriculum,
        model=model,
        engine=eng,
        store=store,
        logger=logger,
        state=state,
        optimizer=optimizer,
        teacher=teacher,
        callbacks=list(callbacks),
        run_dir=run_path,
        reporter=Reporter(
            enabled=info.is_main,
            progress=progress,
            total=curriculum.total_steps,
            initial=state.step,
        ),
        trainable=trainable,
        eval_sets=eval_sets,
        scaler_state=scaler_state,
    )
    try:
        completed = runner.run()
    finally:
        logger.close()
    return FitResult(runner.state, runner.last_metrics, run_path, completed)


def summary_of(run_dir: Path) -> dict[str, Any] | None:
    """The ``summary.json`` of a completed run, if any."""
    path = Path(run_dir) / rundir.SUMMARY
    return json.loads(path.read_text()) if path.exists() else None

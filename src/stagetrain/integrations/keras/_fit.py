"""``fit_keras``: a Keras model trained through every stage of a curriculum.

One ``model.fit`` per stage (resumed stages start past step 0), over the stage's
:class:`StageDataset`. A callback owns everything per step, in the order of
stagetrain's own loop: the LR before the batch; after it the counters, the ``train``
record, evaluations, the advance rule and checkpoints. Between stages the run
(``_run.py``) applies the hand-off, the freeze patterns and the stage's loss, and recompiles.

Run directory (the same layout as :func:`stagetrain.fit`)::

    config.yaml  metrics.jsonl  summary.json  checkpoints/{ckpt-XXXXXXXX.pt, manifest.json}
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from stagetrain.config import CurriculumConfig, load_config
from stagetrain.curriculum import Curriculum
from stagetrain.errors import CheckpointError, ConfigError
from stagetrain.evaluation import build_eval
from stagetrain.integrations.keras._losses import stage_losses
from stagetrain.integrations.keras._optim import check_keras_optimizer
from stagetrain.integrations.keras._run import _Run
from stagetrain.logs import METRICS_FILE, read_records
from stagetrain.rundir import RunDirLock
from stagetrain.state import TrainState
from stagetrain.train.resume import OnChange


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
    if resume and not Path(run_dir).is_dir():  # checked before the lock creates it
        raise CheckpointError(f"{run_dir}: no such run directory to resume")
    # One process per run directory, as with fit: the lock is held for the whole run.
    with RunDirLock(Path(run_dir)):
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

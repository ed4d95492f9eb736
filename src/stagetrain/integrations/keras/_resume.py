"""Checkpoint and resume glue of ``fit_keras``: the payload it saves, and restoring one."""

from __future__ import annotations

import json
from typing import Any

import keras

from stagetrain.checkpoint import rng_state, set_rng_state
from stagetrain.curriculum import Curriculum
from stagetrain.errors import CheckpointError
from stagetrain.integrations.keras._optim import build_keras_optimizer
from stagetrain.integrations.keras._state import capture_variables, restore_variables
from stagetrain.state import TrainState
from stagetrain.train import resume as resuming
from stagetrain.train.resume import OnChange

FRAMEWORK = "keras"


def checkpoint_payload(
    model: Any,
    optimizer: Any,
    state: TrainState,
    curriculum: Curriculum,
    *,
    last_metrics: dict[str, dict[str, float]],
    last_eval_step: dict[str, int],
    log_lines: int,
) -> dict[str, Any]:
    """What a ``fit_keras`` checkpoint holds: variables, counters, RNG, the curriculum's
    fingerprint, the newest metrics and how many log lines belong to the run."""
    config = curriculum.config
    return {
        "framework": FRAMEWORK,
        "backend": keras.backend.backend(),
        "keras": {
            "model": capture_variables(model.variables),
            "optimizer": capture_variables(optimizer.variables),
        },
        "state": state.to_dict(),
        "rng": rng_state(),
        "fingerprint": config.fingerprint(),
        "config": json.dumps(config.fingerprint_dict()),
        "score_digests": dict(curriculum.score_digests),
        "metrics": json.dumps(last_metrics),
        "last_eval_step": dict(last_eval_step),
        "log_lines": log_lines,
    }


def restore_checkpoint(
    payload: dict[str, Any],
    where: str,
    model: Any,
    curriculum: Curriculum,
    trainable: list[Any],
    on_change: OnChange,
) -> tuple[TrainState, Any]:
    """Check a payload against this process and curriculum, then restore the model's
    variables and the RNG; the resumed state and the rebuilt optimizer."""
    if payload.get("framework") != FRAMEWORK:
        raise CheckpointError(f"{where}: written by stagetrain.fit, not fit_keras")
    if payload["backend"] != keras.backend.backend():
        raise CheckpointError(
            f"{where}: written on the Keras {payload['backend']} backend; this process "
            f"runs {keras.backend.backend()}"
        )
    # stagetrain's own rules: a changed curriculum is refused unless on_change says how.
    state = resuming.check_resume(payload, curriculum, on_change)
    saved = payload["keras"]
    restore_variables(model.variables, saved["model"], what="model")
    # The optimizer as the stage that built it (the first or a 'reset' stage) made it.
    builder = curriculum.stages[resuming.optimizer_builder(curriculum, state)]
    assert builder.config.optimizer is not None
    optimizer = build_keras_optimizer(builder.config.optimizer, trainable)
    restore_variables(optimizer.variables, saved["optimizer"], what="optimizer")
    set_rng_state(payload["rng"])
    return state, optimizer

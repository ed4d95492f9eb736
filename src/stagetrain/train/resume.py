"""What a checkpoint holds, and how a run continues from one.

A checkpoint payload (:func:`capture`) holds model, optimizer, counters, the RNG of
every rank, the fp16 scaler, the curriculum's fingerprint, the digests of the
difficulty scores it trained on, the number of log lines and every rank's partial
logging interval (``meter``: so the first record after a resume averages its whole
interval, as the uninterrupted run's does). :func:`check_resume`
decides where to continue (refusing a changed curriculum unless told how);
:func:`restore` loads the state back, rebuilding the optimizer with the param-group
layout of the stage that built it (a later ``reset`` stage may lay them out
differently: its hand-off builds its own when it starts).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from stagetrain.checkpoint import rng_state, set_rng_state
from stagetrain.config import config_diff
from stagetrain.curriculum import Curriculum
from stagetrain.errors import CheckpointError
from stagetrain.handoff import builds_optimizer
from stagetrain.optim import build_optimizer
from stagetrain.state import TrainState
from stagetrain.train.engine import Engine
from stagetrain.train.meter import IntervalMeter, partials

OnChange = Literal["refuse", "keep-position", "restart-stage"]

REQUIRED = ("model", "optimizer", "state", "rng", "fingerprint", "config", "log_lines")


def capture(
    *,
    curriculum: Curriculum,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    rngs: list[Any],
    log_lines: int,
    world_size: int,
    scaler: Any,
) -> dict[str, Any]:
    """The payload of a checkpoint (plain tensors and containers: weights-only loadable)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        **capture_meta(
            curriculum=curriculum, state=state, rngs=rngs, log_lines=log_lines,
            world_size=world_size, scaler=scaler,
        ),
    }  # fmt: skip


def capture_meta(
    *,
    curriculum: Curriculum,
    state: TrainState,
    rngs: list[Any],
    log_lines: int,
    world_size: int,
    scaler: Any,
    meter: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything of a checkpoint but the model and optimizer (plain data, from rank 0);
    ``meter``: every rank's :meth:`IntervalMeter.partial` (see :func:`gather_ranks`)."""
    config = curriculum.config
    return {
        "state": state.to_dict(),
        "rng": rngs,
        "fingerprint": config.fingerprint(),
        "config": json.dumps(config.fingerprint_dict()),
        "score_digests": dict(curriculum.score_digests),
        "log_lines": log_lines,
        "world_size": world_size,
        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        **({"meter": partials(state.step, meter)} if meter is not None else {}),
    }


def local_rng() -> dict[str, Any]:
    """This process's RNG states (gathered from every rank into the payload)."""
    return rng_state()


def gather_ranks(engine: Engine, meter: IntervalMeter) -> tuple[list[Any], list[dict[str, Any]]]:
    """Every rank's RNG states and partial logging interval, in rank order (one
    collective: every rank joins, at a checkpoint)."""
    parts = engine.gather((local_rng(), meter.partial()))
    return [rng for rng, _ in parts], [partial for _, partial in parts]


def check_payload(payload: dict[str, Any], where: str) -> None:
    """A checkpoint has every part resume needs."""
    # A sharded checkpoint's model and optimizer are in its shards (see restore).
    tensors = ("model", "optimizer") if "sharded" in payload else ()
    missing = [k for k in REQUIRED if k not in payload and k not in tensors]
    if missing:
        raise CheckpointError(f"{where}: not a complete stagetrain checkpoint (missing {missing})")


def check_resume(
    payload: dict[str, Any], curriculum: Curriculum, on_change: OnChange
) -> TrainState:
    """The state to continue from, after checking the curriculum did not change."""
    state = TrainState.from_dict(payload["state"])
    changes: list[str] = []
    if payload["fingerprint"] != curriculum.config.fingerprint():
        changes = config_diff(json.loads(payload["config"]), curriculum.config.fingerprint_dict())
        changes = changes or ["the configuration (fingerprint differs)"]
    saved_scores = payload.get("score_digests", {})
    for field, digest in curriculum.score_digests.items():
        if field in saved_scores and saved_scores[field] != digest:
            changes.append(
                f"{field}.difficulty: the difficulty scores changed since the checkpoint"
            )
    if not changes:
        return state
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
        return restart_stage(state)
    if state.stage_step >= curriculum.stages[state.stage_index].steps:
        raise CheckpointError(
            f"the checkpoint is at step {state.stage_step} of stage "
            f"{curriculum.stages[state.stage_index].name!r}, past its new length"
        )
    return state


def restart_stage(state: TrainState) -> TrainState:
    """Counters rewound to the start of the current stage (``--on-change restart-stage``)."""
    start = state.stage_start
    return dataclasses.replace(
        state,
        step=start.get("step", state.step - state.stage_step),
        samples=start.get("samples", state.samples),
        tokens=start.get("tokens", state.tokens),
        real_tokens=start.get("real_tokens", state.real_tokens),
        stage_step=0,
        plateau_best=None,
        plateau_waits=0,
    )


def optimizer_builder(curriculum: Curriculum, state: TrainState) -> int:
    """Index of the stage whose config laid out the checkpoint's optimizer."""
    if 0 <= state.optimizer_stage < len(curriculum.stages):
        return state.optimizer_stage
    current = min(state.stage_index, len(curriculum.stages) - 1)
    return max(i for i in range(current + 1) if builds_optimizer(curriculum.stages[i].config, i))


def _check_optimizer(saved: dict[str, Any], optimizer: torch.optim.Optimizer, where: str) -> None:
    """The saved optimizer state fits ``optimizer`` (type of hyperparameters, groups, sizes)."""
    groups = saved.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{where}: the checkpoint's optimizer has {len(groups)} param groups, this "
            f"curriculum's {len(optimizer.param_groups)} (different lr_multipliers or no_decay)"
        )
    for i, (old, new) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        if len(old["params"]) != len(new["params"]):
            raise CheckpointError(
                f"{where}: param group {i} holds {len(old['params'])} parameters in the "
                f"checkpoint and {len(new['params'])} now"
            )
        missing = sorted(set(new) - set(old) - {"params", "initial_lr"})
        if missing:
            raise CheckpointError(
                f"{where}: the checkpoint's optimizer lacks {missing} (another optimizer type "
                f"than {type(optimizer).__name__}?); resume with the optimizer it was saved with"
            )


def restore(
    payload: dict[str, Any],
    curriculum: Curriculum,
    model: torch.nn.Module,
    state: TrainState,
    engine: Engine,
) -> torch.optim.Optimizer:
    """Load model, optimizer and RNG from a checkpoint; returns the optimizer for ``state``.

    The data order depends only on the global step, so any world size continues it
    exactly. Per-rank random streams (dropout) continue exactly only with the world
    size the checkpoint was written with; otherwise each rank's stream is re-seeded
    from (seed, step, rank), and a warning says so.
    """
    sharded = payload.get("sharded")
    try:
        if sharded is None:
            model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"the checkpoint's weights do not fit this model ({first}); resume with the "
            "architecture it was saved with"
        ) from None
    builder = optimizer_builder(curriculum, state)
    opt_cfg = curriculum.stages[builder].config.optimizer
    assert opt_cfg is not None
    optimizer = build_optimizer(
        model.named_parameters(), opt_cfg, field=f"stages[{builder}].optimizer"
    )
    if sharded is not None:  # every rank reads the slices of its own shards
        from stagetrain.train.dcp import load_sharded

        load_sharded(
            Path(sharded), model, optimizer, group=getattr(engine, "checkpoint_group", None),
            where=f"stages[{builder}].optimizer",
        )  # fmt: skip
    else:
        _check_optimizer(payload["optimizer"], optimizer, f"stages[{builder}].optimizer")
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"stages[{builder}].optimizer: the checkpoint's optimizer state does not fit "
                f"({str(exc).splitlines()[0]})"
            ) from None
    state.optimizer_stage = builder
    rngs = payload["rng"]
    info = engine.info
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

"""Stage hand-off: what crosses from one stage into the next — the one owner of its rules.

``carry``  keep the optimizer and its state (moments, step counts); no warmup.
``rewarm`` keep the optimizer state; the stage's warmup restarts from zero.
``reset``  a fresh optimizer (state cleared); the stage's warmup applies.

The warmup part is in the stage's LR shape (see :class:`stagetrain.curriculum.Stage`);
this module owns the optimizer side and the frozen parameters. :func:`enter_stage` is
what every driver calls at a stage's first step: the built-in loop, ``StepInfo`` in a
user's own loop, and the framework adapters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch

from stagetrain.config import StageConfig
from stagetrain.errors import ConfigError
from stagetrain.optim import build_optimizer, update_hyperparameters


def builds_optimizer(stage: StageConfig, index: int) -> bool:
    """Whether entering ``stage`` builds a new optimizer (the first stage, or ``reset``)."""
    return index == 0 or stage.handoff == "reset"


def apply_handoff(
    optimizer: torch.optim.Optimizer | None,
    model: torch.nn.Module,
    stage: StageConfig,
    *,
    first_stage: bool,
    field: str = "optimizer",
) -> torch.optim.Optimizer:
    """The optimizer to use in ``stage``: a new one for the first stage or ``reset``."""
    assert stage.optimizer is not None
    if optimizer is None or first_stage or stage.handoff == "reset":
        return build_optimizer(model.named_parameters(), stage.optimizer, field=field)
    update_hyperparameters(optimizer, stage.optimizer)
    return optimizer


def check_patterns(names: list[str], patterns: list[str], *, field: str) -> None:
    """Every glob in ``patterns`` must match one of ``names`` (a typo would silently train
    everything)."""
    for i, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(
                f"{field}[{i}]: pattern {pattern!r} matches no parameter; names look like "
                f"{names[:3]}"
            )


def apply_freeze(
    model: torch.nn.Module,
    patterns: list[str],
    trainable_at_start: Mapping[str, bool],
    *,
    field: str = "freeze",
) -> list[str]:
    """Freeze the parameters matching any glob in ``patterns``; unfreeze the others.

    Parameters the user had frozen before training stay frozen. Returns the names
    frozen by the patterns.

    Raises:
        ConfigError: when a pattern matches no parameter.
    """
    names = [name for name, _ in model.named_parameters()]
    check_patterns(names, patterns, field=field)
    frozen = []
    for name, param in model.named_parameters():
        is_frozen = any(fnmatch.fnmatchcase(name, p) for p in patterns)
        param.requires_grad_(trainable_at_start.get(name, True) and not is_frozen)
        if is_frozen:
            frozen.append(name)
    return frozen


def enter_stage(
    stage: StageConfig,
    index: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainable_at_start: Mapping[str, bool],
) -> torch.optim.Optimizer:
    """Apply ``stage``'s hand-off and freezing at its first step; returns its optimizer."""
    apply_freeze(model, stage.freeze, trainable_at_start, field=f"stages[{index}].freeze")
    return apply_handoff(
        optimizer, model, stage, first_stage=index == 0, field=f"stages[{index}].optimizer"
    )


def trainable_flags(model: torch.nn.Module) -> dict[str, bool]:
    """Which parameters the user left trainable (freezing never unfreezes the others)."""
    return {name: p.requires_grad for name, p in model.named_parameters()}


def reset_optimizer_state(optimizer: Any) -> None:
    """Clear a framework-built optimizer's state (the adapters' ``reset`` hand-off)."""
    optimizer.state.clear()

"""Stage hand-off: what crosses from one stage into the next.

``carry``  keep the optimizer and its state (moments, step counts); no warmup.
``rewarm`` keep the optimizer state; the stage's warmup restarts from zero.
``reset``  a fresh optimizer (state cleared); the stage's warmup applies.

The warmup part is in the stage's LR multiplier (see :class:`stagetrain.curriculum.Stage`);
this module owns the optimizer side and the frozen parameters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch

from stagetrain.config import OptimizerConfig, StageConfig
from stagetrain.errors import ConfigError


def build_optimizer(
    params: Iterable[tuple[str, torch.nn.Parameter]] | Iterable[torch.nn.Parameter],
    cfg: OptimizerConfig,
) -> torch.optim.Optimizer:
    """A torch optimizer for ``cfg`` over ``params`` (LR is set per step by the loop).

    ``params`` are ``(name, parameter)`` pairs (``model.named_parameters()``) or bare
    parameters; ``cfg.lr_multipliers`` needs names. Each param group carries its
    ``lr_multiplier``, which the loop applies on top of the scheduled learning rate.
    """
    groups = _param_groups(list(params), cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    optimizer_class = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer_class(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def _param_groups(params: list[Any], cfg: OptimizerConfig) -> list[dict[str, Any]]:
    named = [p for p in params if isinstance(p, tuple)]
    if not named:
        if cfg.lr_multipliers:
            raise ConfigError("optimizer.lr_multipliers: needs named parameters")
        return [{"params": params, "lr_multiplier": 1.0}]
    patterns = list(cfg.lr_multipliers)
    members: dict[str | None, list[torch.nn.Parameter]] = {p: [] for p in [None, *patterns]}
    for name, param in named:
        match = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        members[match].append(param)
    unused = [p for p in patterns if not members[p]]
    if unused:
        raise ConfigError(
            f"optimizer.lr_multipliers: pattern(s) {unused} match no parameter name "
            f"(names look like {named[0][0]!r})"
        )
    return [
        {
            "params": group,
            "lr_multiplier": 1.0 if pattern is None else cfg.lr_multipliers[pattern],
            "pattern": pattern,
        }
        for pattern, group in members.items()
        if group or pattern is None
    ]


def update_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> None:
    """Apply a stage's optimizer settings to a kept optimizer (its state is untouched)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay
        if cfg.name == "sgd":
            group["momentum"] = cfg.momentum
        else:
            group["betas"] = cfg.betas
            group["eps"] = cfg.eps


def apply_handoff(
    optimizer: torch.optim.Optimizer | None,
    model: torch.nn.Module,
    stage: StageConfig,
    *,
    first_stage: bool,
) -> torch.optim.Optimizer:
    """The optimizer to use in ``stage``: a new one for the first stage or ``reset``."""
    assert stage.optimizer is not None
    if optimizer is None or first_stage or stage.handoff == "reset":
        return build_optimizer(model.named_parameters(), stage.optimizer)
    update_hyperparameters(optimizer, stage.optimizer)
    return optimizer


def apply_freeze(
    model: torch.nn.Module,
    patterns: list[str],
    trainable_at_start: dict[str, bool],
    *,
    field: str = "freeze",
) -> list[str]:
    """Freeze the parameters matching any glob in ``patterns``; unfreeze the others.

    Parameters the user had frozen before training stay frozen. Returns the names
    frozen by the patterns.

    Raises:
        ConfigError: when a pattern matches no parameter (a typo would otherwise
            silently train everything).
    """
    names = [name for name, _ in model.named_parameters()]
    for i, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(
                f"{field}[{i}]: pattern {pattern!r} matches no parameter; names look like "
                f"{names[:3]}"
            )
    frozen = []
    for name, param in model.named_parameters():
        is_frozen = any(fnmatch.fnmatchcase(name, p) for p in patterns)
        param.requires_grad_(trainable_at_start.get(name, True) and not is_frozen)
        if is_frozen:
            frozen.append(name)
    return frozen

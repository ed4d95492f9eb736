"""Optimizers from a stage's config, and the one function that sets their learning rate.

Param groups: each parameter falls into one group per (``lr_multipliers`` pattern,
decays-or-not). A group carries

* ``lr_factor`` — its factor on the stage's scheduled learning rate (from
  ``optimizer.lr_multipliers``; 1.0 otherwise), and
* ``decay`` — whether weight decay applies (``optimizer.no_decay``),

so :func:`apply_lr` is the only place that turns the curriculum's learning rate into
each group's ``lr``. Our loop, ``StepInfo.set_lr`` in a user's loop and the framework
adapters all call it.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from stagetrain.config import OptimizerConfig
from stagetrain.errors import ConfigError
from stagetrain.registry import import_path


def optimizer_factory(cfg: OptimizerConfig, *, field: str = "optimizer") -> Callable[..., Any]:
    """The optimizer class (or factory) a config names."""
    name = cfg.name
    if callable(name):
        return name
    if ":" in name:
        target = import_path(name, field=f"{field}.name")
        if not callable(target):
            raise ConfigError(f"{field}.name: {name!r} is not callable")
        return target
    by_lower = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}
    return by_lower[name.lower()]


def _accepted(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments ``factory`` takes (None: anything, it has ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def optimizer_kwargs(cfg: OptimizerConfig, factory: Callable[..., Any]) -> dict[str, Any]:
    """Keyword arguments for ``factory``: the config's fields it accepts, then ``kwargs``."""
    accepted = _accepted(factory)
    wanted: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    # Hyperparameters of the common optimizers, passed only to classes that take them.
    wanted.update(betas=cfg.betas, eps=cfg.eps, momentum=cfg.momentum)
    if accepted is None:  # a factory taking **kwargs: only what every optimizer understands
        out = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    else:
        out = {k: v for k, v in wanted.items() if k in accepted}
    out.update(cfg.kwargs)
    return out


def _decays(name: str, param: torch.nn.Parameter, cfg: OptimizerConfig) -> bool:
    if cfg.weight_decay == 0:
        return True  # nothing to exempt: keep one group
    if cfg.no_decay is None:
        return param.dim() >= 2  # biases and norm weights do not decay
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.no_decay)


def param_groups(
    named: list[tuple[str, torch.nn.Parameter]], cfg: OptimizerConfig, *, field: str
) -> list[dict[str, Any]]:
    """The param groups of ``cfg`` over ``named`` parameters (see the module docstring)."""
    patterns = list(cfg.lr_multipliers)
    members: dict[tuple[str | None, bool], list[torch.nn.Parameter]] = {}
    matched: set[str] = set()
    for name, param in named:
        pattern = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            matched.add(pattern)
        members.setdefault((pattern, _decays(name, param, cfg)), []).append(param)
    unused = [p for p in patterns if p not in matched]
    if unused:
        raise ConfigError(
            f"{field}.lr_multipliers: pattern(s) {unused} match no parameter name "
            f"(names look like {[n for n, _ in named[:3]]})"
        )
    groups = []
    for (pattern, decay), params in members.items():
        group: dict[str, Any] = {
            "params": params,
            "lr_factor": 1.0 if pattern is None else cfg.lr_multipliers[pattern],
            "pattern": pattern,
            "decay": decay,
        }
        if not decay:
            group["weight_decay"] = 0.0
        groups.append(group)
    return groups


def build_optimizer(
    params: Iterable[tuple[str, torch.nn.Parameter]] | Iterable[torch.nn.Parameter],
    cfg: OptimizerConfig,
    *,
    field: str = "optimizer",
) -> torch.optim.Optimizer:
    """A torch optimizer for ``cfg`` over ``params`` (the LR is set per step by :func:`apply_lr`).

    ``params`` are ``(name, parameter)`` pairs (``model.named_parameters()``), needed for
    ``lr_multipliers`` and ``no_decay`` patterns, or bare parameters.
    """
    items = list(params)
    named = [p if isinstance(p, tuple) else (f"param{i}", p) for i, p in enumerate(items)]
    if cfg.lr_multipliers and not all(isinstance(p, tuple) for p in items):
        raise ConfigError(f"{field}.lr_multipliers: needs named parameters")
    factory = optimizer_factory(cfg, field=field)
    groups = param_groups(named, cfg, field=field)
    try:
        optimizer = factory(groups, **optimizer_kwargs(cfg, factory))
    except TypeError as exc:
        raise ConfigError(f"{field}: cannot build {cfg.label} ({exc})") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"{field}.name: {cfg.label} did not return a torch.optim.Optimizer")
    return optimizer


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate to ``lr`` times its ``lr_factor``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)


def update_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> None:
    """Apply a stage's optimizer settings to a kept optimizer (its state is untouched)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay if group.get("decay", True) else 0.0
        for key in ("betas", "eps", "momentum"):
            if key in group:
                group[key] = getattr(cfg, key)
        for key, value in cfg.kwargs.items():
            if key in group:
                group[key] = value

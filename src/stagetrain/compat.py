"""Can a checkpoint be loaded into this model and optimizer? Checked before anything is.

``--on-change keep-position`` continues a run whose curriculum changed at the same stage
and step. When the change touched the model (a resized layer) or the optimizer (adam
became sgd), loading would fail half-way (``size mismatch`` in ``load_state_dict``) or
later still (``KeyError: 'momentum'`` inside ``optimizer.step``), after ``config.yaml``
was already rewritten. :func:`ensure_compatible` finds every such mismatch first:

* model: parameter and buffer names, and their shapes;
* optimizer: the number of parameter groups and of parameters in each, the shapes of
  the per-parameter state tensors, and whether the new optimizer's ``step`` works with
  the saved settings and state — tried on a one-element stand-in parameter per group,
  so nothing of the real model or optimizer is touched and no large tensor is copied.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from stagetrain.errors import CheckpointError

OptimizerOrFactory = torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer]


def check_compatible(
    model: nn.Module,
    optimizer: OptimizerOrFactory | None,
    payload: Mapping[str, Any],
    *,
    max_problems: int = 20,
) -> list[str]:
    """Every way the checkpoint ``payload`` does not fit ``model`` and ``optimizer``.

    Args:
        model: the model the run will continue with (unwrapped: not DDP / compiled).
        optimizer: its new optimizer, a factory ``model -> optimizer`` (called here; it
            must not have side effects), or ``None`` to check only the model.
        payload: the checkpoint (``payload["model"]``, ``payload["optimizer"]``).
        max_problems: report at most this many (then "... and N more").

    Returns:
        One line per mismatch, ``"model: ..."`` or ``"optimizer: ..."``; empty when the
        checkpoint fits.
    """
    problems = _model_problems(model, payload.get("model"))
    if optimizer is not None:
        built = optimizer(model) if callable(optimizer) else optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        problems += _optimizer_problems(built, payload.get("optimizer"), names)
    if len(problems) > max_problems:
        problems = [*problems[:max_problems], f"... and {len(problems) - max_problems} more"]
    return problems


def ensure_compatible(
    model: nn.Module,
    optimizer: OptimizerOrFactory | None,
    payload: Mapping[str, Any],
    *,
    context: str = "--on-change keep-position",
) -> None:
    """Raise one :class:`CheckpointError` line listing every mismatch (see
    :func:`check_compatible`); call it before writing anything."""
    problems = check_compatible(model, optimizer, payload)
    if problems:
        raise CheckpointError(
            f"{context}: the checkpoint does not fit the new model or optimizer: "
            + "; ".join(problems)
            + ". Use --on-change restart-stage with a compatible model, or start a new run"
        )


def _model_problems(model: nn.Module, saved: Any) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"model: the checkpoint holds no state_dict ({type(saved).__name__})"]
    current = model.state_dict()
    problems = []
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        problems.append(f"model: {', '.join(missing)}: in the model but not in the checkpoint")
    if unexpected:
        problems.append(f"model: {', '.join(unexpected)}: in the checkpoint but not in the model")
    for name, tensor in current.items():
        old = saved.get(name)
        if isinstance(old, torch.Tensor) and old.shape != tensor.shape:
            problems.append(
                f"model: {name}: shape {list(old.shape)} in the checkpoint, "
                f"{list(tensor.shape)} in the model"
            )
    return problems


def _optimizer_problems(
    optimizer: torch.optim.Optimizer, saved: Any, names: dict[int, str]
) -> list[str]:
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list):
        return [f"optimizer: the checkpoint holds no optimizer state_dict ({type(saved).__name__})"]
    groups: list[dict[str, Any]] = saved["param_groups"]
    state: Mapping[Any, Any] = saved.get("state") or {}
    new_groups = optimizer.param_groups
    if len(groups) != len(new_groups):
        return [
            f"optimizer: {_count(len(groups), 'parameter group')} in the checkpoint, "
            f"{len(new_groups)} in the new optimizer"
        ]
    problems = []
    for g, (old, new) in enumerate(zip(groups, new_groups, strict=True)):
        old_ids, params = list(old.get("params", [])), new["params"]
        if len(old_ids) != len(params):
            problems.append(
                f"optimizer: group {g}: {_count(len(old_ids), 'parameter')} in the "
                f"checkpoint, {len(params)} in the new optimizer"
            )
            continue
        for index, param in zip(old_ids, params, strict=True):
            for key, value in (state.get(index) or {}).items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.dim() > 0
                    and value.shape != param.shape
                ):
                    label = names.get(id(param), "?")
                    problems.append(
                        f"optimizer: state of parameter {index} ({label}): {key} has shape "
                        f"{list(value.shape)} in the checkpoint, the parameter {list(param.shape)}"
                    )
        problems += _probe_step(optimizer, g, old, [state.get(i) for i in old_ids], params)
    return problems


def _probe_step(
    optimizer: torch.optim.Optimizer,
    g: int,
    saved_group: dict[str, Any],
    saved_states: list[Any],
    params: list[torch.Tensor],
) -> list[str]:
    """Load the group's saved settings and state into a one-element copy of the new
    optimizer and take a step: what would fail inside the real ``step`` fails here."""
    if not params:
        return []
    template = params[0]
    probe = torch.zeros(1, dtype=template.dtype, device=template.device, requires_grad=True)
    settings = {k: v for k, v in optimizer.param_groups[g].items() if k != "params"}
    saved_state = next((s for s in saved_states if s), None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls: Any = type(optimizer)  # a concrete optimizer: its defaults are keyword arguments
            stand_in = cls([{"params": [probe], **settings}])
    except Exception:  # an optimizer that cannot be rebuilt this way: no probe
        return []
    # The saved per-parameter state, each tensor cut down to the stand-in's one element.
    shrunk = {}
    if isinstance(saved_state, Mapping):
        shrunk = {
            k: (
                torch.zeros(1, dtype=v.dtype, device=probe.device)
                if isinstance(v, torch.Tensor) and v.dim() > 0
                else v.clone()
                if isinstance(v, torch.Tensor)
                else v
            )
            for k, v in saved_state.items()
        }
    group = {k: v for k, v in saved_group.items() if k != "params"}
    try:
        stand_in.load_state_dict(
            {"state": {0: shrunk} if shrunk else {}, "param_groups": [{**group, "params": [0]}]}
        )
        probe.grad = torch.zeros_like(probe)
        stand_in.step()
    except Exception as exc:
        detail = f"{type(exc).__name__} {exc}" if str(exc) else type(exc).__name__
        return [
            f"optimizer: group {g}: {type(optimizer).__name__} cannot use the checkpoint's "
            f"optimizer state ({detail.splitlines()[0]}); it was saved by "
            f"{_guess(saved_group, saved_state)}"
        ]
    return []


def _guess(group: Mapping[str, Any], state: Any) -> str:
    keys = set(group) | (set(state) if isinstance(state, Mapping) else set())
    if {"betas", "exp_avg"} & keys:
        return "an Adam-like optimizer (betas, exp_avg)"
    if {"momentum", "momentum_buffer"} & keys:
        return "an SGD-like optimizer (momentum)"
    shown = ", ".join(sorted(k for k in group if k != "params")[:6])
    return f"another optimizer (settings: {shown})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")

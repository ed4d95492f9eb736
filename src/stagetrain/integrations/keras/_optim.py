"""Optimizers, the learning rate and frozen variables of a stage, on Keras.

The hand-off follows :mod:`stagetrain.handoff`: the first stage and ``reset`` build a
fresh optimizer from the stage's ``optimizer`` config; ``carry`` and ``rewarm`` keep the
optimizer (its moments and step count) and only apply the stage's hyperparameters.
The warmup that ``rewarm`` restarts is part of :meth:`Stage.lr`, set every step.

Keras optimizers are used as Keras defines them. Against torch they differ in two
documented ways: Adam's ``epsilon`` is added to ``sqrt(v)`` before the bias correction
(the Adam paper's "epsilon hat"), and SGD keeps ``-lr * grad`` in its momentum buffer
(the same as torch's while the LR is constant). Weight decay is decoupled in Keras for
every optimizer, so it is accepted for ``adamw`` only (torch's Adam and SGD add it to
the gradient instead). ``no_decay`` (default: variables of fewer than two dimensions)
is honoured through ``exclude_from_weight_decay``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import keras

from stagetrain.config import OptimizerConfig
from stagetrain.curriculum import Stage
from stagetrain.errors import ConfigError

KERAS_OPTIMIZERS = ("adam", "adamw", "sgd")
_KWARGS = {"adam": frozenset(), "adamw": frozenset(), "sgd": frozenset({"nesterov"})}


def check_keras_optimizer(cfg: OptimizerConfig, *, field: str = "optimizer") -> None:
    """Refuse optimizer settings the Keras optimizers cannot honour as stagetrain defines them."""
    name = cfg.label
    if name not in KERAS_OPTIMIZERS:
        raise ConfigError(
            f"{field}.name: {name!r} is not supported by the Keras adapter "
            f"(one of {list(KERAS_OPTIMIZERS)})"
        )
    unknown = sorted(set(cfg.kwargs) - _KWARGS[name])
    if unknown:
        raise ConfigError(
            f"{field}.kwargs: {unknown} not supported for Keras {name} "
            f"(accepted: {sorted(_KWARGS[name])})"
        )
    if cfg.lr_multipliers:
        raise ConfigError(
            f"{field}.lr_multipliers: per-parameter LR multipliers are not supported by the "
            "Keras adapter (Keras optimizers have one learning rate)"
        )
    if cfg.weight_decay > 0 and name != "adamw":
        raise ConfigError(
            f"{field}.weight_decay: {name} adds weight decay to the gradient (L2) in "
            "stagetrain, Keras decays decoupled; use name: adamw for decoupled decay"
        )


def decays(variable: Any, cfg: OptimizerConfig) -> bool:
    """Whether weight decay applies to ``variable`` (``no_decay``, as in stagetrain).

    By default, with ``weight_decay > 0``, variables with fewer than two dimensions
    (biases, norm scales) do not decay; ``no_decay`` globs replace that rule.
    """
    if cfg.weight_decay == 0:
        return True  # nothing to exempt (a later stage's decay then applies to all)
    if cfg.no_decay is None:
        return len(variable.shape) >= 2
    return not any(_matches(variable.path, pattern) for pattern in cfg.no_decay)


def build_keras_optimizer(
    cfg: OptimizerConfig, variables: Sequence[Any] | None = None, *, field: str = "optimizer"
) -> Any:
    """A fresh Keras optimizer for ``cfg``, built over ``variables`` when given.

    Build it over every variable any stage may train: a Keras optimizer refuses variables
    it was not built with, and a later stage may unfreeze some. Which variables decay is
    fixed here (``no_decay``), as in stagetrain's param groups.

    ``grad_clip`` becomes ``global_clipnorm`` (clipping by the norm over all gradients,
    as ``torch.nn.utils.clip_grad_norm_``).
    """
    check_keras_optimizer(cfg, field=field)
    common: dict[str, Any] = {"learning_rate": cfg.lr, "global_clipnorm": cfg.grad_clip}
    optimizer: Any
    if cfg.label == "sgd":
        optimizer = keras.optimizers.SGD(momentum=cfg.momentum, **cfg.kwargs, **common)
    elif cfg.label == "adamw":
        optimizer = keras.optimizers.AdamW(
            weight_decay=cfg.weight_decay,
            beta_1=cfg.betas[0],
            beta_2=cfg.betas[1],
            epsilon=cfg.eps,
            **common,
        )
    else:
        optimizer = keras.optimizers.Adam(
            beta_1=cfg.betas[0], beta_2=cfg.betas[1], epsilon=cfg.eps, **common
        )
    if variables is not None:
        variables = list(variables)
        if cfg.label == "adamw":
            exempt = [v for v in variables if not decays(v, cfg)]
            if exempt:
                optimizer.exclude_from_weight_decay(var_list=exempt)
        optimizer.build(variables)
    return optimizer


def update_keras_optimizer(optimizer: Any, cfg: OptimizerConfig, *, field: str) -> None:
    """Apply a stage's hyperparameters to a kept optimizer (its variables are untouched).

    The model must be compiled afterwards: compiled train functions (TensorFlow, JAX)
    read these values when they are traced.
    """
    check_keras_optimizer(cfg, field=field)
    optimizer.global_clipnorm = cfg.grad_clip
    if cfg.label == "sgd":
        if cfg.momentum > 0 and not optimizer.momentums:
            raise ConfigError(
                f"{field}.momentum: the kept Keras SGD was built without momentum and has no "
                "momentum buffers; use handoff: reset to start one with momentum"
            )
        optimizer.momentum = cfg.momentum
        optimizer.nesterov = cfg.kwargs.get("nesterov", False)
        return
    optimizer.beta_1, optimizer.beta_2 = cfg.betas
    optimizer.epsilon = cfg.eps
    if cfg.label == "adamw":
        optimizer.weight_decay = cfg.weight_decay


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Write ``lr`` into the optimizer's learning-rate variable (read by compiled steps)."""
    optimizer.learning_rate = lr


def learning_rate(optimizer: Any) -> float:
    """The learning rate the optimizer's next update uses."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class CurriculumLR(keras.callbacks.Callback):
    """Sets the stage's learning rate before every training batch of a ``model.fit``.

    For your own ``model.fit(StageDataset(stage, start), shuffle=False, ...)``:
    before batch ``i`` it sets ``stage.lr(start + i, step + i)``, the curriculum's LR of
    that stage step (warmup, schedule, or the run-wide ``global_lr`` at global ``step``).

    Args:
        stage: the stage being trained.
        start: the stage step of the first batch.
        step: the global step of the first batch (matters only with ``global_lr``;
            default: the stage's planned start plus ``start``).
    """

    def __init__(self, stage: Stage, start: int = 0, step: int | None = None) -> None:
        super().__init__()
        self.stage = stage
        self.start = start
        self.step = stage.planned_start + start if step is None else step

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        lr = self.stage.lr(self.start + batch, self.step + batch)
        set_learning_rate(self.model.optimizer, lr)


def variable_names(model: Any) -> list[str]:
    """The Keras paths of ``model``'s weights (``"sequential/dense/kernel"``)."""
    return [v.path for v in model.weights]


def _matches(path: str, pattern: str) -> bool:
    # Patterns may use Keras' '/' paths or stagetrain's dotted parameter names.
    dotted = path.replace("/", ".")
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(dotted, pattern)


def apply_keras_freeze(
    trainable: Sequence[Any], patterns: Sequence[str], *, field: str = "freeze"
) -> list[str]:
    """Freeze the variables among ``trainable`` whose path matches a glob; unfreeze the rest.

    ``trainable`` are the variables that were trainable when training started (those the
    user froze stay frozen). A pattern matches a Keras variable path
    (``"sequential/dense/kernel"``) or its dotted form (``"sequential.dense.kernel"``), so
    ``"*dense/*"`` and ``"*.dense.*"`` both freeze that layer. Returns the frozen paths.

    Raises:
        ConfigError: when a pattern matches no variable (a typo would otherwise silently
            train everything).
    """
    paths = [v.path for v in trainable]
    for i, pattern in enumerate(patterns):
        if not any(_matches(p, pattern) for p in paths):
            raise ConfigError(
                f"{field}[{i}]: pattern {pattern!r} matches no trainable Keras variable; paths "
                f"look like {paths[:3]}"
            )
    frozen = []
    for variable in trainable:
        is_frozen = any(_matches(variable.path, p) for p in patterns)
        variable.trainable = not is_frozen
        if is_frozen:
            frozen.append(variable.path)
    return frozen

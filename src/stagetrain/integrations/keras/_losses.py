"""Stage losses as Keras losses, with the semantics of stagetrain's built-in loss names.

Each built-in of :mod:`stagetrain.losses` is written here in ``keras.ops`` to the same
definition (so it runs on every backend), with the same arguments:

* ``cross_entropy`` (``ignore_index=-100``, ``label_smoothing=0``): logits ``[..., C]``
  against integer classes ``[...]``, a mean over the non-ignored positions;
* ``bce_with_logits`` (``ignore_index``): one logit per target (a trailing 1 squeezed);
* ``hinge`` (``margin=1``, ``ignore_index``): binary with 0/1 or -1/+1 targets, or the
  multi-class margin loss of ``torch.nn.functional.multi_margin_loss`` for ``C > 1``;
* ``nll`` (``ignore_index``): on log-probabilities;
* ``mse``, ``l1``, ``smooth_l1`` (``beta=1``): the target cast and reshaped to the output.

Keras' own loss classes differ in exactly these details (no label smoothing for sparse
targets, no ignored entries in ``BinaryCrossentropy`` or ``Hinge``, no multi-class
hinge), hence the ``keras.ops`` versions. A stage's terms are summed with their weights.
``kl_distill``, ``model``, import paths and callables are torch code and are refused:
pass a Keras loss for the stage instead (``fit_keras(losses=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
from keras import ops

from stagetrain.curriculum import Stage
from stagetrain.errors import ConfigError
from stagetrain.losses import BUILTIN_LOSS_FNS


def _masked_mean(values: Any, keep: Any) -> Any:
    keep = ops.cast(keep, values.dtype)
    return ops.sum(values * keep) / ops.maximum(ops.sum(keep), 1.0)


def _flat(output: Any, target: Any) -> tuple[Any, Any]:
    return ops.reshape(output, (-1, output.shape[-1])), ops.reshape(target, (-1,))


def _picked(log_probs: Any, labels: Any, keep: Any) -> Any:
    """``log_probs[i, labels[i]]`` (ignored rows read class 0 and are masked later)."""
    safe = ops.where(keep, ops.cast(labels, "int32"), 0)
    return ops.take_along_axis(log_probs, ops.expand_dims(safe, -1), axis=-1)[:, 0]


def cross_entropy(
    target: Any, output: Any, *, ignore_index: int = -100, label_smoothing: float = 0.0
) -> Any:
    if output.shape[-1] == 1 and len(output.shape) == len(target.shape) + 1:
        raise ConfigError(
            "cross_entropy: the model outputs one logit per sample (a binary classifier); "
            "use the loss 'bce_with_logits' or 'hinge'"
        )
    logits, labels = _flat(output, target)
    keep = ops.not_equal(labels, ignore_index)
    log_probs = ops.log_softmax(logits, axis=-1)
    losses = -_picked(log_probs, labels, keep)
    if label_smoothing:
        smooth = -ops.mean(log_probs, axis=-1)
        losses = (1.0 - label_smoothing) * losses + label_smoothing * smooth
    # torch divides by the number of kept positions (NaN when there are none).
    keep_f = ops.cast(keep, losses.dtype)
    return ops.sum(losses * keep_f) / ops.sum(keep_f)


def nll(target: Any, output: Any, *, ignore_index: int = -100) -> Any:
    log_probs, labels = _flat(output, target)
    keep = ops.not_equal(labels, ignore_index)
    keep_f = ops.cast(keep, log_probs.dtype)
    return ops.sum(-_picked(log_probs, labels, keep) * keep_f) / ops.sum(keep_f)


def _binary_view(output: Any, target: Any) -> Any:
    if len(output.shape) == len(target.shape) + 1 and output.shape[-1] == 1:
        output = ops.squeeze(output, -1)
    if tuple(output.shape) != tuple(target.shape):
        raise ConfigError(
            f"binary loss: output shape {tuple(output.shape)} does not match target shape "
            f"{tuple(target.shape)}"
        )
    return output


def bce_with_logits(target: Any, output: Any, *, ignore_index: int = -100) -> Any:
    logits = _binary_view(output, target)
    keep = ops.not_equal(target, ignore_index)
    labels = ops.clip(ops.cast(target, logits.dtype), 0.0, 1.0)
    return _masked_mean(ops.binary_crossentropy(labels, logits, from_logits=True), keep)


def hinge(target: Any, output: Any, *, margin: float = 1.0, ignore_index: int = -100) -> Any:
    if len(output.shape) == len(target.shape) + 1 and output.shape[-1] > 1:
        logits, labels = _flat(output, target)
        keep = ops.not_equal(labels, ignore_index)
        true = ops.expand_dims(_picked(logits, labels, keep), -1)
        classes = logits.shape[-1]
        others = 1.0 - ops.one_hot(ops.where(keep, ops.cast(labels, "int32"), 0), classes)
        per_sample = ops.sum(ops.relu(margin - true + logits) * others, axis=-1) / classes
        keep_f = ops.cast(keep, per_sample.dtype)
        return ops.sum(per_sample * keep_f) / ops.sum(keep_f)
    logits = _binary_view(output, target)
    keep = ops.not_equal(target, ignore_index)
    signs = ops.where(ops.cast(target, logits.dtype) > 0, 1.0, -1.0)
    return _masked_mean(ops.relu(margin - signs * logits), keep)


def _like(target: Any, output: Any) -> Any:
    return ops.reshape(ops.cast(target, output.dtype), ops.shape(output))


def mse(target: Any, output: Any) -> Any:
    return ops.mean(ops.square(output - _like(target, output)))


def l1(target: Any, output: Any) -> Any:
    return ops.mean(ops.abs(output - _like(target, output)))


def smooth_l1(target: Any, output: Any, *, beta: float = 1.0) -> Any:
    diff = ops.abs(output - _like(target, output))
    if beta == 0:
        return ops.mean(diff)
    return ops.mean(ops.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta))


KERAS_LOSSES: dict[str, tuple[Callable[..., Any], frozenset[str]]] = {
    "cross_entropy": (cross_entropy, frozenset({"ignore_index", "label_smoothing"})),
    "bce_with_logits": (bce_with_logits, frozenset({"ignore_index"})),
    "hinge": (hinge, frozenset({"margin", "ignore_index"})),
    "nll": (nll, frozenset({"ignore_index"})),
    "mse": (mse, frozenset()),
    "l1": (l1, frozenset()),
    "smooth_l1": (smooth_l1, frozenset({"beta"})),
}
"""Built-in loss name -> (its ``keras.ops`` version ``(y_true, y_pred, **args)``, the
arguments it takes)."""


class StageKerasLoss(keras.losses.Loss):
    """The weighted sum of a stage's built-in loss terms, as one Keras loss.

    Args:
        terms: ``(name, weight, args)``; every name a key of :data:`KERAS_LOSSES`.
    """

    def __init__(
        self, terms: list[tuple[str, float, dict[str, Any]]], name: str = "stage_loss"
    ) -> None:
        super().__init__(name=name)
        self.terms = [(KERAS_LOSSES[term][0], weight, dict(args)) for term, weight, args in terms]

    def call(self, y_true: Any, y_pred: Any) -> Any:
        # Each term reduces itself (a scalar), so the base class's reduction is a no-op.
        total = None
        for fn, weight, args in self.terms:
            value = fn(y_true, y_pred, **args)
            value = value if weight == 1.0 else value * weight
            total = value if total is None else total + value
        return total


_NAMES = {fn: name for name, fn in BUILTIN_LOSS_FNS.items()}


def keras_stage_loss(stage: Stage, override: Any = None) -> Any:
    """The Keras loss of ``stage``: ``override`` if given, else its terms mapped.

    Raises:
        ConfigError: for a term without a Keras counterpart or an argument the Keras
            version does not take (named in the message), or when ``override`` is not a
            ``keras.losses.Loss``.
    """
    field = f"stages[{stage.index}].loss"
    if override is not None:
        if not isinstance(override, keras.losses.Loss):
            raise ConfigError(
                f"fit_keras(losses={{{stage.name!r}: ...}}): expected a keras.losses.Loss "
                f"instance, got {type(override).__name__}"
            )
        return override
    hint = f"pass fit_keras(losses={{{stage.name!r}: <a keras.losses.Loss>}})"
    terms = []
    for k, term in enumerate(stage.loss.terms):
        name = _NAMES.get(term.fn)
        if name not in KERAS_LOSSES:
            raise ConfigError(
                f"{field}[{k}].name: {term.name!r} has no Keras version in the Keras adapter "
                f"(built-ins with one: {sorted(KERAS_LOSSES)}); {hint}"
            )
        unknown = sorted(set(term.args) - KERAS_LOSSES[name][1])
        if unknown:
            raise ConfigError(
                f"{field}[{k}].args: {unknown} not supported by the Keras version of {name} "
                f"(it takes {sorted(KERAS_LOSSES[name][1])}); {hint}"
            )
        terms.append((name, term.weight, dict(term.args)))
    return StageKerasLoss(terms)


def stage_losses(stages: list[Stage], overrides: Mapping[str, Any] | None) -> list[Any]:
    """:func:`keras_stage_loss` of every stage; an override for an unknown stage is an error."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {s.name for s in stages})
    if unknown:
        raise ConfigError(
            f"fit_keras(losses=...): no stage named {unknown}; stages: {[s.name for s in stages]}"
        )
    return [keras_stage_loss(s, overrides.get(s.name)) for s in stages]


class BatchLoss(keras.metrics.Metric):
    """The stage loss of the last training batch (not Keras' running mean over the epoch).

    Compiled as a metric, it recomputes ``loss`` on the same predictions the update used,
    so stagetrain's ``train`` records carry the loss of the step they name.
    """

    def __init__(self, loss: Any, name: str = "stagetrain_loss") -> None:
        super().__init__(name=name)
        self._loss = loss
        self.value = self.add_variable(shape=(), initializer="zeros", name="value")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        self.value.assign(ops.cast(self._loss(y_true, y_pred), self.value.dtype))

    def result(self) -> Any:
        # A tensor, not the variable: JAX's stateless metric tracing cannot take a variable.
        return ops.convert_to_tensor(self.value)

    def reset_state(self) -> None:
        self.value.assign(0.0)

"""Stage losses as Keras losses, with the semantics of stagetrain's built-in loss names.

* ``cross_entropy``: ``SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)``
  on integer classes ``[...]`` and logits ``[..., C]``; -100 is ignored, as in torch.
* ``mse``: ``MeanSquaredError()``, the target cast and reshaped to the output's shape.
* ``bce_with_logits``: ``BinaryCrossentropy(from_logits=True)``, target cast and reshaped.
* ``hinge``: ``Hinge()``, target cast and reshaped; 0/1 labels become -1/+1.

Every one is a mean over all elements (over the non-ignored positions for
``cross_entropy``), as ``torch.nn.functional`` computes it. A stage's terms are summed
with their weights. ``kl_distill``, import paths and term ``args`` have no Keras
counterpart here and are refused; pass a Keras loss for the stage instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
from keras import ops

from stagetrain.curriculum import Stage
from stagetrain.errors import ConfigError

IGNORE_INDEX = -100
"""Targets equal to this are ignored by ``cross_entropy`` (torch's default ``ignore_index``)."""

# name -> (Keras loss factory, whether the target is cast and reshaped to the output)
KERAS_LOSSES: dict[str, tuple[Callable[[], Any], bool]] = {
    "cross_entropy": (
        lambda: keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=IGNORE_INDEX
        ),
        False,
    ),
    "mse": (keras.losses.MeanSquaredError, True),
    "bce_with_logits": (lambda: keras.losses.BinaryCrossentropy(from_logits=True), True),
    "hinge": (keras.losses.Hinge, True),
}


class StageKerasLoss(keras.losses.Loss):
    """The weighted sum of a stage's built-in loss terms, as one Keras loss.

    Args:
        terms: ``(name, weight)`` pairs; every name must be a key of :data:`KERAS_LOSSES`.
    """

    def __init__(self, terms: list[tuple[str, float]], name: str = "stage_loss") -> None:
        super().__init__(name=name)
        self.term_names = [term for term, _ in terms]
        self.term_weights = [weight for _, weight in terms]
        self._fns = [(KERAS_LOSSES[term][0](), KERAS_LOSSES[term][1]) for term, _ in terms]

    def call(self, y_true: Any, y_pred: Any) -> Any:
        # Each term reduces itself (a scalar), so the base class's reduction is a no-op.
        total = None
        for weight, (fn, target_like_output) in zip(self.term_weights, self._fns, strict=True):
            target = y_true
            if target_like_output:
                target = ops.reshape(ops.cast(y_true, y_pred.dtype), ops.shape(y_pred))
            value = fn(target, y_pred)
            value = value if weight == 1.0 else value * weight
            total = value if total is None else total + value
        return total


def keras_stage_loss(stage: Stage, override: Any = None) -> Any:
    """The Keras loss of ``stage``: ``override`` if given, else its terms mapped.

    Raises:
        ConfigError: for a term without a Keras counterpart (named in the message), for
            term ``args``, or when ``override`` is not a ``keras.losses.Loss``.
    """
    field = f"stages[{stage.index}].loss"
    if override is not None:
        if not isinstance(override, keras.losses.Loss):
            raise ConfigError(
                f"fit_keras(losses={{{stage.name!r}: ...}}): expected a keras.losses.Loss "
                f"instance, got {type(override).__name__}"
            )
        return override
    terms = []
    for k, term in enumerate(stage.config.loss):
        if term.name not in KERAS_LOSSES:
            raise ConfigError(
                f"{field}[{k}].name: {term.name!r} has no Keras equivalent in the Keras adapter "
                f"(supported: {sorted(KERAS_LOSSES)}); pass "
                f"fit_keras(losses={{{stage.name!r}: <a keras.losses.Loss>}})"
            )
        if term.args:
            raise ConfigError(
                f"{field}[{k}].args: loss arguments are not mapped to Keras "
                f"(got {sorted(term.args)}); pass fit_keras(losses={{{stage.name!r}: ...}})"
            )
        terms.append((term.name, term.weight))
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

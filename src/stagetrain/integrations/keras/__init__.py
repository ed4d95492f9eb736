"""Keras 3 with a stagetrain curriculum, on any Keras backend (torch, tensorflow, jax).

Install ``stagetrain[keras]`` and choose the backend as Keras does (``KERAS_BACKEND``).

* :func:`fit_keras` trains a ``keras.Model`` through every stage: the stage's batches,
  loss, LR per step, hand-off, ``freeze``, evaluations, advance rules, JSONL logs and
  checkpoints with exact resume.
* The building blocks, for your own ``model.fit`` per stage: :class:`StageDataset` (a
  stage's batches as a ``keras.utils.PyDataset``), :class:`CurriculumLR` (the stage's LR
  before every batch), :func:`keras_stage_loss`, :func:`build_keras_optimizer` /
  :func:`update_keras_optimizer` (the hand-off) and :func:`apply_keras_freeze`.

Refused, each with an error naming the field: ``teacher`` / ``kl_distill``, ``model``
losses, loss import paths, callables and arguments without a Keras version (pass
``fit_keras(losses=...)``), optimizers other than adam / adamw / sgd, ``lr_multipliers``,
weight decay on ``adam``/``sgd`` (Keras decays decoupled: use ``adamw``), ``grad_accum``
> 1, ``data_workers`` > 0, ``precision`` other than fp32, ``compile``, ``batch.forward``,
batches other than ``(inputs, targets)`` pairs, ``nonfinite.policy`` other than
``raise``, multi-process runs.
"""

from __future__ import annotations

try:
    import keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "stagetrain.integrations.keras needs Keras 3: pip install 'stagetrain[keras]'"
    ) from exc

if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"stagetrain.integrations.keras needs Keras 3, found {keras.__version__}: "
        "pip install 'stagetrain[keras]'"
    )

from stagetrain.integrations.keras._data import StageDataset, batch_to_numpy, to_numpy
from stagetrain.integrations.keras._fit import (
    KerasFitResult,
    StageSpan,
    check_supported,
    fit_keras,
    timeline,
)
from stagetrain.integrations.keras._losses import (
    KERAS_LOSSES,
    BatchLoss,
    StageKerasLoss,
    keras_stage_loss,
)
from stagetrain.integrations.keras._optim import (
    CurriculumLR,
    apply_keras_freeze,
    build_keras_optimizer,
    learning_rate,
    set_learning_rate,
    update_keras_optimizer,
    variable_names,
)

__all__ = [
    "KERAS_LOSSES",
    "BatchLoss",
    "CurriculumLR",
    "KerasFitResult",
    "StageDataset",
    "StageKerasLoss",
    "StageSpan",
    "apply_keras_freeze",
    "batch_to_numpy",
    "build_keras_optimizer",
    "check_supported",
    "fit_keras",
    "keras_stage_loss",
    "learning_rate",
    "set_learning_rate",
    "timeline",
    "to_numpy",
    "update_keras_optimizer",
    "variable_names",
]

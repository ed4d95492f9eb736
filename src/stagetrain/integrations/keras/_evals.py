"""The curriculum's evaluations of a Keras model, computed by stagetrain's own code."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stagetrain.config import EvalConfig
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.evaluation import build_eval, evaluate_sums, finalize
from stagetrain.integrations.keras._data import to_numpy


class _KerasAsModule(torch.nn.Module):
    """A Keras model seen as a torch module, for stagetrain's own evaluation code."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        # Not an attribute torch would register: a torch-backend Keras model is itself
        # an nn.Module, and .eval() here must not reach into it.
        self._keras = (model,)

    def forward(self, inputs: Any) -> torch.Tensor:
        output = self._keras[0].predict_on_batch(to_numpy(inputs))
        return torch.from_numpy(np.array(output))


def evaluate(
    model: Any,
    curriculum: Curriculum,
    stage: Stage,
    ev: EvalConfig,
    cache: dict[tuple[str, int], tuple[Any, Any]],
) -> dict[str, float]:
    """The metrics of ``ev`` in ``stage`` (its eval set and dataset built once, in ``cache``)."""
    # Computed by stagetrain's own evaluation code on the Keras model's outputs, so
    # every metric means what it means in stagetrain.fit.
    key = (ev.name, stage.index)
    if key not in cache:
        cache[key] = (
            build_eval(curriculum, ev),
            curriculum.eval_dataset(ev, stage),
        )
    eval_set, dataset = cache[key]
    sums = evaluate_sums(
        _KerasAsModule(model),
        dataset,
        eval_set,
        seq_len=curriculum.eval_seq_len(ev, stage),
    )
    return finalize(eval_set, sums)

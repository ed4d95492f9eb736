"""Keras variables in a stagetrain checkpoint: raw bytes, checked on the way back in.

Each variable is stored as its bytes (a ``uint8`` tensor), dtype name and shape, in the
order of ``model.variables`` (weights and random-seed states) and
``optimizer.variables`` (step count, LR, moments). Bytes round-trip every dtype exactly,
bfloat16 included, and load with ``torch.load(weights_only=True)`` like any stagetrain
checkpoint. The order is the model's own, so any process that builds the same model
restores it; paths are kept to explain a mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import torch

from stagetrain.errors import CheckpointError


def capture_variables(variables: Sequence[Any]) -> dict[str, Any]:
    """The values of ``variables`` as weights-only-loadable data."""
    data, dtypes, shapes, paths = [], [], [], []
    for variable in variables:
        value = keras.ops.convert_to_numpy(variable.value)
        flat = np.ascontiguousarray(value).reshape(-1)
        data.append(torch.from_numpy(flat.view(np.uint8).copy()))
        dtypes.append(str(value.dtype))
        shapes.append(list(value.shape))
        paths.append(variable.path)
    return {"data": data, "dtypes": dtypes, "shapes": shapes, "paths": paths}


def restore_variables(variables: Sequence[Any], saved: dict[str, Any], *, what: str) -> None:
    """Assign what :func:`capture_variables` stored back to ``variables``.

    Raises:
        CheckpointError: when the number, shapes or dtypes differ (a different model or
            optimizer than the checkpoint's).
    """
    variables = list(variables)
    if len(variables) != len(saved["data"]):
        raise CheckpointError(
            f"checkpoint {what}: {len(saved['data'])} variables saved, this {what} has "
            f"{len(variables)} (saved paths start {saved['paths'][:3]})"
        )
    values = []
    for variable, data, dtype, shape, path in zip(
        variables, saved["data"], saved["dtypes"], saved["shapes"], saved["paths"], strict=True
    ):
        current = keras.ops.convert_to_numpy(variable.value)
        if str(current.dtype) != dtype or list(current.shape) != list(shape):
            raise CheckpointError(
                f"checkpoint {what}: variable {path!r} was saved as {dtype}{list(shape)}, "
                f"{variable.path!r} here is {current.dtype}{list(current.shape)}"
            )
        values.append(np.frombuffer(data.numpy().tobytes(), dtype=current.dtype).reshape(shape))
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)

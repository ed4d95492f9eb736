"""Any dataset's token ids checked against a model's vocabulary, before training."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stagetrain.errors import DataError


def check_token_ids(
    dataset: Any, vocab_size: int, *, field: str = "data", sample: int = 256
) -> None:
    """Pre-flight check that ``dataset``'s token ids fit a model with ``vocab_size`` ids.

    Token sources check their files (every id of small files, spread chunks of large
    ones); any other dataset has ``sample`` items spread over it fetched and their token
    tensors checked: integer inputs, targets of the same shape as the inputs (next-token
    targets, not class labels), or the ``input_ids`` / ``labels`` of dict batches
    (``-100``, the ignore index, is skipped).

    Raises:
        DataError: naming ``field`` when an id is negative or >= ``vocab_size``.
    """
    check = getattr(dataset, "check_vocab", None)
    if callable(check):
        check(vocab_size, field=field)
        return
    from stagetrain.data import fetch

    n = len(dataset)
    indices = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
    batch: Any = fetch(dataset, indices)
    named: list[tuple[str, Any]]
    if isinstance(batch, dict):
        named = [(k, batch[k]) for k in ("input_ids", "labels") if k in batch]
    else:
        inputs, targets = batch
        named = [("inputs", inputs)]
        if isinstance(targets, torch.Tensor) and targets.shape == inputs.shape:
            named.append(("targets", targets))
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor) or torch.is_floating_point(tensor):
            continue
        values = tensor[tensor != -100]
        if values.numel() == 0:
            continue
        low, high = int(values.min()), int(values.max())
        if high >= vocab_size or low < 0:
            bad = high if high >= vocab_size else low
            raise DataError(
                f"{field}: {name} of sampled items hold token id {bad}, outside the model's "
                f"vocabulary of {vocab_size} ids (0..{vocab_size - 1})"
            )

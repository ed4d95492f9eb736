"""Evaluation of a model on a named set: loss and accuracy, computed batched under no_grad."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stagetrain.data import fetch, truncate
from stagetrain.losses import BUILTIN_LOSS_FNS


def accuracy_counts(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Number of correct predictions (argmax of logits ``[..., C]``) and of predictions."""
    predicted = output.argmax(dim=-1)
    return (predicted == target).sum(), target.numel()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    *,
    metrics: list[str],
    loss_name: str = "cross_entropy",
    batch_size: int = 1024,
    max_samples: int | None = None,
    seq_len: int | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, torch.Tensor]:
    """Sums needed for ``metrics`` over this rank's share of ``dataset``.

    Returns unnormalised sums (``loss_sum``, ``correct``, ``count``, ``samples``) as tensors
    so that a distributed run can all-reduce them before :func:`finalize_metrics`.
    """
    was_training = model.training
    model.eval()
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    indices = np.arange(rank, n, world_size)
    loss_fn = BUILTIN_LOSS_FNS[loss_name]
    sums = {
        "loss_sum": torch.zeros((), dtype=torch.float64),
        "correct": torch.zeros((), dtype=torch.float64),
        "count": torch.zeros((), dtype=torch.float64),
        "samples": torch.zeros((), dtype=torch.float64),
        "exact": torch.zeros((), dtype=torch.float64),
    }
    for start in range(0, len(indices), batch_size):
        inputs, targets = truncate(fetch(dataset, indices[start : start + batch_size]), seq_len)
        if device is not None:
            inputs, targets = inputs.to(device), targets.to(device)
        output = model(inputs)
        if "loss" in metrics:
            sums["loss_sum"] += loss_fn(output, targets).double().cpu() * len(targets)
        if "accuracy" in metrics:
            correct, count = accuracy_counts(output, targets)
            sums["correct"] += correct.double().cpu()
            sums["count"] += count
        if "exact_match" in metrics:
            # A sample counts only when every position of it is right (a whole sum, say).
            hits = (output.argmax(-1) == targets).reshape(len(targets), -1).all(dim=1)
            sums["exact"] += hits.sum().double().cpu()
        sums["samples"] += len(targets)
    model.train(was_training)
    return sums


def finalize_metrics(sums: dict[str, torch.Tensor], metrics: list[str]) -> dict[str, float]:
    """Turn (possibly all-reduced) sums into metric values."""
    out: dict[str, float] = {}
    if "loss" in metrics:
        out["loss"] = float(sums["loss_sum"] / sums["samples"].clamp(min=1))
    if "accuracy" in metrics:
        out["accuracy"] = float(sums["correct"] / sums["count"].clamp(min=1))
    if "exact_match" in metrics:
        out["exact_match"] = float(sums["exact"] / sums["samples"].clamp(min=1))
    return out

"""Evaluation on a named set: metrics over this rank's share, summed on the model's device.

:func:`evaluate_sums` returns unnormalised sums as tensors on the device the model
computes on (an evaluation never waits on the host between batches, and a
distributed run all-reduces the sums with the engine's device-aware collective);
:func:`finalize` turns the reduced sums into values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stagetrain.batch import Batch, fit_length, to_device
from stagetrain.config import EvalConfig
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.data import fetch
from stagetrain.errors import ConfigError
from stagetrain.losses import StageLoss
from stagetrain.metrics import Metric, Sums, build_metrics, compute_all
from stagetrain.modelio import ModelIO, Prediction


@dataclass
class EvalSet:
    """An evaluation, built: its config, config path, calling convention and metrics."""

    config: EvalConfig
    field: str
    io: ModelIO
    metrics: list[Metric]

    @property
    def name(self) -> str:
        return self.config.name


def build_eval(curriculum: Curriculum, ev: EvalConfig) -> EvalSet:
    """Resolve an evaluation's loss and metrics (errors name ``evals[i]``)."""
    field = curriculum.eval_field(ev)
    loss = StageLoss.build([ev.loss], field=f"{field}.loss", has_teacher=curriculum.has_teacher)
    if loss.needs_teacher:
        raise ConfigError(f"{field}.loss: an evaluation's loss cannot need a teacher")

    def loss_value(pred: Prediction) -> torch.Tensor:
        return loss(pred)[0]

    metrics = build_metrics(
        ev.metrics,
        loss_fn=loss_value,
        ignore_index=curriculum.fmt.ignore_index,
        field=f"{field}.metrics",
    )
    return EvalSet(ev, field, curriculum.model_io(loss), metrics)


def eval_batches(
    dataset: Any,
    *,
    eval_set: EvalSet,
    batch_size: int,
    max_samples: int | None,
    seq_len: int | None,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
) -> Iterator[Batch]:
    """This rank's batches of an evaluation set (every ``world_size``-th sample)."""
    for batch, _counted in _eval_batches(
        dataset, eval_set=eval_set, batch_size=batch_size, max_samples=max_samples,
        seq_len=seq_len, rank=rank, world_size=world_size, limit=limit, equal_batches=False,
    ):  # fmt: skip
        yield batch


def _eval_batches(
    dataset: Any,
    *,
    eval_set: EvalSet,
    batch_size: int,
    max_samples: int | None,
    seq_len: int | None,
    rank: int,
    world_size: int,
    limit: int | None,
    equal_batches: bool,
) -> Iterator[tuple[Batch, bool]]:
    """``(batch, counted)`` pairs of this rank's share. With ``equal_batches`` every rank
    yields as many batches as the rank with the most samples; the extra ones repeat a
    sample and are not counted (sharded models run every forward pass on all ranks)."""
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    indices = np.arange(rank, n, world_size)
    fmt = eval_set.io.fmt
    most = -(-n // world_size)  # rank 0 holds ceil(n / world_size) samples
    total = -(-(most if equal_batches else len(indices)) // batch_size)
    if limit is not None:
        total = min(total, limit)
    for count in range(total):
        chunk = indices[count * batch_size : (count + 1) * batch_size]
        counted = len(chunk) > 0
        if not counted:
            chunk = np.arange(min(1, n))  # a filler forward on sample 0; never counted
        batch = fetch(dataset, chunk, fmt)
        yield fit_length(batch, seq_len, fmt=fmt, pad=False), counted


@torch.no_grad()
def evaluate_sums(
    model: torch.nn.Module,
    dataset: Any,
    eval_set: EvalSet,
    *,
    seq_len: int | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    equal_batches: bool = False,
) -> Sums:
    """Metric sums of ``model`` over this rank's share of ``dataset``, on the model's device.

    ``limit``: at most this many batches (the preflight runs one). ``equal_batches``:
    every rank runs the same number of forward passes (a sharded model's forward is a
    collective), the surplus ones on a repeated sample that is not counted.
    """
    was_training = model.training
    model.eval()
    sums: Sums = {}
    try:
        for batch, counted in _eval_batches(
            dataset,
            eval_set=eval_set,
            batch_size=eval_set.config.batch_size,
            max_samples=eval_set.config.max_samples,
            seq_len=seq_len,
            rank=rank,
            world_size=world_size,
            limit=limit,
            equal_batches=equal_batches,
        ):
            if device is not None:
                batch = to_device(batch, device)
            pred = eval_set.io.predict(model, batch)
            if not counted:
                continue
            for metric in eval_set.metrics:
                metric.update(pred, sums)
    finally:
        model.train(was_training)
    return sums


def finalize(eval_set: EvalSet, sums: Sums) -> dict[str, float]:
    """Metric values from (all-reduced) sums."""
    return compute_all(eval_set.metrics, sums)


def evaluate(
    model: torch.nn.Module,
    curriculum: Curriculum,
    ev: EvalConfig,
    *,
    stage: Stage | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """One process's evaluation of ``model`` on ``ev`` (a convenience for own loops)."""
    eval_set = build_eval(curriculum, ev)
    dataset = curriculum.eval_dataset(ev, stage)
    sums = evaluate_sums(
        model, dataset, eval_set, seq_len=curriculum.eval_seq_len(ev, stage), device=device
    )
    return finalize(eval_set, sums)

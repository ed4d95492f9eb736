"""Evaluation metrics: built-in, pad-aware, accumulated on the model's device.

A metric adds to named running sums (tensors on the device of the model's output, so
an evaluation never waits on the host between batches) and turns the sums, once
all-reduced across ranks, into values. Built-ins skip targets equal to
``ignore_index`` and read a one-logit output as a binary classifier (``logit > 0``):

================== ====================================================================
name               value
================== ====================================================================
loss               the evaluation's loss, averaged over samples
accuracy           share of correct predictions (per token for sequences)
error              1 - accuracy
top_k_accuracy     share of targets among the ``k`` largest logits (key ``top{k}_accuracy``)
perplexity         exp of the mean per-token cross-entropy
token_accuracy     share of correct tokens (sequence targets)
exact_match        share of samples with every (non-ignored) position right
================== ====================================================================

Custom metrics: an import path or callable ``(outputs, batch) -> {key: value}`` (values
averaged over samples), or a ``torchmetrics.Metric`` (updated with logits and targets;
it synchronises across ranks itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from stagetrain.batch import batch_size
from stagetrain.config import BUILTIN_METRICS, MetricSpec
from stagetrain.errors import ConfigError
from stagetrain.modelio import Prediction
from stagetrain.registry import import_path

Sums = dict[str, torch.Tensor]


def _add(sums: Sums, key: str, value: torch.Tensor | float, device: torch.device) -> None:
    """``sums[key] += value``, the sum kept in float64 on ``device`` (no host sync)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to(device=device, dtype=torch.float64)
    else:
        tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    sums[key] = sums[key] + tensor if key in sums else tensor.clone()


def _hits(pred: Prediction, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element correctness and the mask of counted elements (same shape as targets)."""
    logits, target = pred.logits, pred.target
    assert target is not None
    if logits.dim() == target.dim() + 1 and logits.shape[-1] > 1:
        predicted = logits.argmax(dim=-1)
        correct = predicted == target
    else:  # one logit per sample or per label: a binary classifier
        values = logits.squeeze(-1) if logits.dim() == target.dim() + 1 else logits
        positive = target > 0
        correct = (values > 0) == positive
    mask = target != ignore_index
    return correct & mask, mask


@dataclass(frozen=True)
class BuiltinMetric:
    """One of the built-in metrics (see the module docstring)."""

    name: str
    args: dict[str, Any]
    ignore_index: int = -100
    loss_fn: Callable[..., torch.Tensor] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        if self.name == "top_k_accuracy":
            return (f"top{self.args.get('k', 5)}_accuracy",)
        return (self.name,)

    def update(self, pred: Prediction, sums: Sums) -> None:
        if pred.target is None and self.name != "loss":
            raise ConfigError(f"metric {self.name!r} needs targets in the evaluation's batches")
        n = batch_size(pred.batch)
        dev = pred.logits.device
        if self.name == "loss":
            assert self.loss_fn is not None
            _add(sums, "loss_sum", self.loss_fn(pred) * n, dev)
            _add(sums, "loss_samples", float(n), dev)
        elif self.name in ("accuracy", "error", "token_accuracy"):
            correct, mask = _hits(pred, self.ignore_index)
            _add(sums, "correct", correct.sum(), dev)
            _add(sums, "counted", mask.sum(), dev)
        elif self.name == "exact_match":
            correct, mask = _hits(pred, self.ignore_index)
            per_sample = (correct | ~mask).reshape(n, -1).all(dim=1)
            _add(sums, "exact", per_sample.sum(), dev)
            _add(sums, "exact_samples", float(n), dev)
        elif self.name == "top_k_accuracy":
            k = int(self.args.get("k", 5))
            assert pred.target is not None
            logits = pred.logits.reshape(-1, pred.logits.shape[-1])
            target = pred.target.reshape(-1)
            mask = target != self.ignore_index
            top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
            hit = (top == target.clamp(min=0)[:, None]).any(dim=-1) & mask
            _add(sums, f"top{k}_hits", hit.sum(), dev)
            _add(sums, f"top{k}_counted", mask.sum(), dev)
        elif self.name == "perplexity":
            assert pred.target is not None
            logits = pred.logits.reshape(-1, pred.logits.shape[-1]).float()
            target = pred.target.reshape(-1).long()
            total = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
            _add(sums, "token_nll", total, dev)
            _add(sums, "tokens", (target != self.ignore_index).sum(), dev)

    def compute(self, sums: Sums) -> dict[str, float]:
        def ratio(a: str, b: str) -> float:
            return float(sums[a] / sums[b].clamp(min=1))

        if self.name == "loss":
            return {"loss": ratio("loss_sum", "loss_samples")}
        if self.name in ("accuracy", "token_accuracy"):
            return {self.name: ratio("correct", "counted")}
        if self.name == "error":
            return {"error": 1.0 - ratio("correct", "counted")}
        if self.name == "exact_match":
            return {"exact_match": ratio("exact", "exact_samples")}
        if self.name == "top_k_accuracy":
            k = int(self.args.get("k", 5))
            return {f"top{k}_accuracy": ratio(f"top{k}_hits", f"top{k}_counted")}
        mean_nll = ratio("token_nll", "tokens")
        return {"perplexity": math.exp(min(mean_nll, 700.0))}


@dataclass(frozen=True)
class CallableMetric:
    """A user function ``(outputs, batch) -> {key: value}``; values averaged over samples."""

    name: str
    fn: Callable[..., Any]
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        return ()  # known after the first batch

    def update(self, pred: Prediction, sums: Sums) -> None:
        values = self.fn(pred.outputs, pred.batch, **self.args)
        if not isinstance(values, dict):
            raise ConfigError(
                f"metric {self.name!r}: must return a dict of values, got {type(values).__name__}"
            )
        n = batch_size(pred.batch)
        dev = pred.logits.device
        for key, value in values.items():
            _add(sums, f"custom:{self.name}:{key}", torch.as_tensor(value).detach() * n, dev)
        _add(sums, f"custom:{self.name}:#", float(n), dev)

    def compute(self, sums: Sums) -> dict[str, float]:
        prefix = f"custom:{self.name}:"
        n = sums[prefix + "#"].clamp(min=1)
        return {
            k[len(prefix) :]: float(v / n)
            for k, v in sums.items()
            if k.startswith(prefix) and k != prefix + "#"
        }


@dataclass
class TorchMetric:
    """A ``torchmetrics.Metric`` fed with (logits, targets); it syncs across ranks itself."""

    name: str
    metric: Any

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.name,)

    def update(self, pred: Prediction, sums: Sums) -> None:
        if pred.target is None:
            raise ConfigError(f"metric {self.name!r} needs targets in the evaluation's batches")
        self.metric.to(pred.logits.device)
        self.metric.update(pred.logits, pred.target)

    def compute(self, sums: Sums) -> dict[str, float]:
        value = self.metric.compute()
        self.metric.reset()
        return {self.name: float(value)}


Metric = BuiltinMetric | CallableMetric | TorchMetric


def _is_torchmetric(obj: Any) -> bool:
    return any(c.__module__.startswith("torchmetrics") for c in type(obj).__mro__)


def build_metrics(
    specs: Sequence[MetricSpec],
    *,
    loss_fn: Callable[[Prediction], torch.Tensor] | None,
    ignore_index: int,
    field: str,
) -> list[Metric]:
    """Metric objects for an evaluation's ``metrics`` list; ``field`` names it in errors."""
    out: list[Metric] = []
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        name = spec.name
        if not isinstance(name, str):
            if _is_torchmetric(name):
                out.append(TorchMetric(spec.key or type(name).__name__.lower(), name))
            elif callable(name):
                label = spec.key or str(getattr(name, "__name__", f"metric{i}"))
                out.append(CallableMetric(label, name, dict(spec.args)))
            else:
                raise ConfigError(
                    f"{where}: expected a metric name, callable or torchmetrics Metric"
                )
            continue
        if name in BUILTIN_METRICS:
            if name == "loss" and loss_fn is None:
                raise ConfigError(f"{where}: metric 'loss' needs the evaluation's loss")
            out.append(
                BuiltinMetric(
                    name, dict(spec.args), ignore_index, loss_fn if name == "loss" else None
                )
            )
            continue
        target = import_path(name, field=f"{where}.name")
        if isinstance(target, type) and _is_torchmetric_class(target):
            out.append(TorchMetric(spec.key or target.__name__.lower(), target(**spec.args)))
        elif _is_torchmetric(target):
            out.append(TorchMetric(spec.key or type(target).__name__.lower(), target))
        elif callable(target):
            out.append(CallableMetric(spec.key or name.rpartition(":")[2], target, dict(spec.args)))
        else:
            raise ConfigError(
                f"{where}.name: {name!r} is neither callable nor a torchmetrics Metric"
            )
    return out


def _is_torchmetric_class(cls: type) -> bool:
    return any(c.__module__.startswith("torchmetrics") for c in cls.__mro__)


def compute_all(metrics: Sequence[Metric], sums: Sums) -> dict[str, float]:
    """Every metric's values from the (all-reduced) sums."""
    out: dict[str, float] = {}
    for metric in metrics:
        out.update(metric.compute(sums))
    return out

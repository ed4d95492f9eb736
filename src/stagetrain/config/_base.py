"""Shared pieces of the config models: the base class, name rules, known names."""

from __future__ import annotations

import re
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
)

from stagetrain.time import Duration

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
BUILTIN_LOSSES = (
    "cross_entropy",
    "bce_with_logits",
    "hinge",
    "nll",
    "mse",
    "l1",
    "smooth_l1",
    "kl_distill",
    "model",
)
"""Loss names known without an import path (see :mod:`stagetrain.losses`)."""
BUILTIN_METRICS = (
    "loss",
    "accuracy",
    "error",
    "top_k_accuracy",
    "perplexity",
    "token_accuracy",
    "exact_match",
)
"""Metric names known without an import path (see :mod:`stagetrain.metrics`)."""


def callable_name(fn: Any) -> str:
    """``"module:qualname"`` of a Python callable, as configs and fingerprints show it."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{name}"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def _check_duration(value: str | None) -> str | None:
    """Field validator body: the field name is added by pydantic's error location."""
    if value is not None:
        Duration.parse(value, field="")
    return value


def check_name(value: str) -> str:
    """Field validator body for stage and evaluation names (they appear in logs and paths)."""
    if not _NAME_RE.match(value):
        raise ValueError(f"names use letters, digits, '_', '.', '-'; got {value!r}")
    return value

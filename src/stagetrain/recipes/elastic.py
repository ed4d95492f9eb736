"""Nemotron Elastic in miniature: the elastic parent built from a trained teacher.

The teacher is a plain :class:`~stagetrain.elastic.model.ElasticGPT` trained on the
stdlib text (``examples/elastic_teacher.yaml``). :func:`elastic_parent` loads it, ranks
its channels, heads, neurons and layers on calibration windows of the training split,
permutes it so every budget is a prefix, and attaches the budget router. At the full
budget the parent computes exactly what the teacher computes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stagetrain.elastic.importance import rank_and_permute
from stagetrain.elastic.model import ElasticGPT
from stagetrain.errors import ConfigError
from stagetrain.recipes.pystdlib import stdlib_text
from stagetrain.registry import load_weights


def calibration_batches(
    *, batches: int = 8, batch_size: int = 16, seq_len: int = 256, seed: int = 0
) -> list[torch.Tensor]:
    """Token windows of the training split for importance ranking (fixed by ``seed``)."""
    data = stdlib_text(split="train", context=seq_len)
    rng = np.random.default_rng([seed, 20251120])
    picks = rng.choice(len(data), size=(batches, batch_size), replace=False)
    return [data.get_batch(p)[0] for p in picks]


def ranked_teacher(
    teacher: dict[str, Any], weights: str | None, calibration: dict[str, Any] | None
) -> ElasticGPT:
    """The teacher with its trained weights, ranked and permuted (every prefix nested)."""
    plain = ElasticGPT(**teacher)
    if weights is not None:
        plain.load_state_dict(load_weights(weights, field="model.args.weights"))
    rank_and_permute(plain, calibration_batches(**(calibration or {})))
    return plain


def elastic_parent(
    *,
    teacher: dict[str, Any],
    weights: str | None,
    budgets: list[dict[str, Any]],
    choices: dict[str, list[int]],
    router: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> ElasticGPT:
    """The elastic parent: the teacher's weights, ranked and permuted, plus a router.

    Args:
        teacher: the teacher's :class:`ElasticGPT` architecture arguments.
        weights: the teacher's trained weights (file or run directory); ``None`` ranks a
            freshly initialised model (for tests only).
        budgets, choices, router: as in :class:`ElasticGPT`.
        calibration: arguments of :func:`calibration_batches`.
    """
    plain = ranked_teacher(teacher, weights, calibration)
    parent = ElasticGPT(**teacher, budgets=budgets, choices=choices, router=router)
    missing, unexpected = parent.load_state_dict(plain.state_dict(), strict=False)
    if unexpected or any(not key.startswith("router.") for key in missing):
        raise ConfigError(f"elastic_parent: teacher weights do not fit ({missing}, {unexpected})")
    return parent


def pruned_teacher(
    *,
    teacher: dict[str, Any],
    weights: str | None,
    sizes: dict[str, int],
    calibration: dict[str, Any] | None = None,
) -> ElasticGPT:
    """The teacher pruned once to fixed ``sizes`` (``width``, ``heads``, ``ffn``, ``depth``)
    by the same importance ranking: the starting point of distilling one budget on its
    own (Minitron-style), the control for training all budgets nested at once."""
    from stagetrain.elastic.extract import slice_model

    plain = ranked_teacher(teacher, weights, calibration)
    missing = {"width", "heads", "ffn", "depth"} - set(sizes)
    if missing:
        raise ConfigError(f"pruned_teacher: sizes needs {sorted(missing)}")
    return slice_model(plain, sizes)[0]

"""Nemotron Elastic recipes: elastic parents built from trained teachers.

Two parents, one machinery (:mod:`stagetrain.elastic`):

- :func:`elastic_parent`: the built-in :class:`~stagetrain.elastic.model.ElasticGPT`
  teacher (``examples/elastic_teacher.yaml``), ranked and given a router
  (``examples/elastic.yaml``);
- :func:`elastic_hf`: a Hugging Face model (a small ``LlamaConfig`` in
  ``examples/elastic_llama*.yaml``) wrapped in
  :class:`~stagetrain.elastic.hf.ElasticModel`, ranked and given a router.

Both rank channels, heads, neurons and layers on calibration windows of the stdlib
training split and permute the weights so every budget is a prefix; at the full budget
the parent computes exactly what the teacher computes.

:func:`validation_loss` scores a parent at one budget (or any causal LM, such as an
extraction loaded back with ``transformers``) on the stdlib validation split. Training
is ``stagetrain run examples/elastic*.yaml`` (or :func:`stagetrain.fit`): ``elastic_text``
dict items carry each sample's budget beside its tokens.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from stagetrain.elastic.extract import slice_model
from stagetrain.elastic.hf import ElasticModel, hf_model, load_into
from stagetrain.elastic.importance import rank_and_permute
from stagetrain.elastic.model import ElasticGPT
from stagetrain.errors import ConfigError
from stagetrain.modelio import logits_of
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
    teacher: dict[str, Any],
    weights: str | None,
    calibration: dict[str, Any] | None,
    importance: dict[str, Any] | None = None,
) -> ElasticGPT:
    """The teacher with its trained weights, ranked and permuted (every prefix nested)."""
    plain = ElasticGPT(**teacher)
    if weights is not None:
        plain.load_state_dict(load_weights(weights, field="model.args.weights"))
    rank_and_permute(plain, calibration_batches(**(calibration or {})), **(importance or {}))
    return plain


def elastic_parent(
    *,
    teacher: dict[str, Any],
    weights: str | None,
    budgets: list[dict[str, Any]],
    choices: dict[str, list[int]],
    router: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    importance: dict[str, Any] | None = None,
    heterogeneous: bool = False,
) -> ElasticGPT:
    """The elastic ElasticGPT parent: the teacher's weights, ranked and permuted, plus
    a router.

    Args:
        teacher: the teacher's :class:`ElasticGPT` architecture arguments.
        weights: the teacher's trained weights (file or run directory); ``None`` ranks a
            freshly initialised model (for tests only).
        budgets, choices, router, heterogeneous: as in :class:`ElasticGPT`.
        calibration: arguments of :func:`calibration_batches`.
        importance: ``depth`` (``iterative`` or ``one-shot``) and ``neurons``
            (``pre-activation`` or ``post-activation``) of the ranking.
    """
    plain = ranked_teacher(teacher, weights, calibration, importance)
    parent = ElasticGPT(
        **teacher, budgets=budgets, choices=choices, router=router, heterogeneous=heterogeneous
    )
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
) -> torch.nn.Module:
    """The teacher pruned once to fixed ``sizes`` (``width``, ``heads``, ``ffn``, ``depth``)
    by the same importance ranking: the starting point of distilling one budget on its
    own (Minitron-style), the control for training all budgets nested at once."""
    plain = ranked_teacher(teacher, weights, calibration)
    missing = {"width", "heads", "ffn", "depth"} - set(sizes)
    if missing:
        raise ConfigError(f"pruned_teacher: sizes needs {sorted(missing)}")
    return slice_model(plain, sizes).model


def elastic_hf(
    *,
    budgets: list[dict[str, Any]],
    choices: dict[str, list[int]],
    config: dict[str, Any] | None = None,
    pretrained: str | None = None,
    weights: str | None = None,
    router: dict[str, Any] | None = None,
    heterogeneous: bool = False,
    calibration: dict[str, Any] | None = None,
    importance: dict[str, Any] | None = None,
    output: str = "model",
    tokenizer: str | None = None,
) -> ElasticModel:
    """An elastic Hugging Face parent for configs (``model: {builtin: elastic_hf, ...}``).

    Args:
        budgets, choices, router, heterogeneous, output: as in
            :class:`~stagetrain.elastic.hf.ElasticModel`.
        config: the model's config fields (with ``model_type``, e.g. ``llama``), for a
            model built from scratch; or
        pretrained: a local Hugging Face directory.
        weights: trained weights to load (file or run directory, e.g. the teacher run of
            a :func:`~stagetrain.elastic.hf.hf_causal_lm` model).
        calibration: arguments of :func:`calibration_batches` (stdlib text windows).
        importance: ``depth`` / ``neurons`` methods of the ranking.
        tokenizer: a directory of tokenizer files, or ``"bytes"`` (the stdlib byte
            tokenizer), copied by ``stagetrain extract --format hf``; not used here.
    """
    del tokenizer  # read from the run's config by stagetrain extract
    model = hf_model(config, pretrained)
    if weights is not None:
        load_into(model, weights, field="model.args.weights")
    elastic = ElasticModel(
        model, budgets=budgets, choices=choices, router=router, heterogeneous=heterogeneous,
        output=output,  # type: ignore[arg-type]
    )  # fmt: skip
    rank_and_permute(elastic, calibration_batches(**(calibration or {})), **(importance or {}))
    return elastic


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    *,
    budget: Any = None,
    context: int = 256,
    samples: int = 64,
    batch_size: int = 16,
) -> float:
    """Mean next-byte cross-entropy on the first ``samples`` windows of the stdlib
    validation split, at ``budget`` (``None``: a plain model's forward). Runs in
    evaluation mode (a router then neither samples nor advances its anneal)."""
    data = stdlib_text(split="val", context=context)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, min(samples, len(data)), batch_size):
            inputs, targets = data.get_batch(np.arange(start, min(start + batch_size, samples)))
            kwargs = {} if budget is None else {"budget": budget}
            logits = logits_of(model(input_ids=inputs, **kwargs))
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += targets.numel()
    finally:
        model.train(was_training)
    value = total / count
    if not math.isfinite(value):
        raise ConfigError(f"validation_loss: non-finite loss at budget {budget!r}")
    return value

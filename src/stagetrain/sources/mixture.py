"""Mixtures by tokens: token shares turned into sample shares, and tokens per source.

A stage's sampler apportions every batch in *samples*. When a mixture is declared in
*tokens* ("70 % of stage 2's tokens from the domain set"), and the sources' samples hold
different numbers of tokens (padded documents next to packed windows, say), the sample
weight of source ``k`` must be its token share divided by its tokens per sample::

    w_k = (s_k / t_k) / sum_j (s_j / t_j)

so that ``w_k * t_k / sum_j (w_j * t_j) = s_k``. With every ``t_k`` equal (windows of
the same ``seq_len``) the two shares coincide. Schedules convert pointwise.

:func:`tokens_by_source` counts, for one batch, the tokens each source contributed
(from the batch's indices into the stage's concatenated sources), so a run can log
that stage 2 really saw 70 % / 30 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stagetrain.errors import ConfigError
from stagetrain.schedules import Schedule


def sample_shares_from_token_shares(
    token_shares: Sequence[float], tokens_per_sample: Sequence[float]
) -> np.ndarray:
    """Per-step sample shares (summing to 1) that give each source its token share.

    Args:
        token_shares: wanted share of the stage's tokens per source (any positive scale).
        tokens_per_sample: mean tokens in one sample of each source at the stage's seq_len.

    Raises:
        ConfigError: on mismatched lengths, negative shares, or non-positive token counts.

    Example:
        >>> sample_shares_from_token_shares([0.7, 0.3], [256, 128]).round(4).tolist()
        [0.5385, 0.4615]
    """
    shares = np.asarray(token_shares, dtype=np.float64)
    tokens = np.asarray(tokens_per_sample, dtype=np.float64)
    if shares.shape != tokens.shape or shares.ndim != 1 or len(shares) == 0:
        raise ConfigError(
            f"token weights: {len(shares)} shares for {len(tokens)} sources; give one per source"
        )
    if (shares < 0).any() or not shares.sum() > 0:
        raise ConfigError(
            f"token weights: shares must be >= 0 and not all 0, got {shares.tolist()}"
        )
    if not (tokens > 0).all():
        raise ConfigError(f"token weights: tokens per sample must be > 0, got {tokens.tolist()}")
    per_sample = shares / tokens
    return per_sample / per_sample.sum()


def token_weight_schedules(
    weights: Sequence[Schedule], tokens_per_sample: Sequence[float]
) -> list[Schedule]:
    """Token-share schedules turned into sample-weight schedules for the stage sampler.

    The sampler normalises weights at every step, so dividing each source's weight by
    its tokens per sample is the whole conversion (see the module docstring).
    """
    if len(weights) != len(tokens_per_sample):
        raise ConfigError(
            f"token weights: {len(weights)} schedules for {len(tokens_per_sample)} sources"
        )
    sample_shares_from_token_shares([1.0] * len(weights), tokens_per_sample)  # validates
    out: list[Schedule] = []
    for weight, tokens in zip(weights, tokens_per_sample, strict=True):

        def per_sample(step: float, weight: Schedule = weight, tokens: float = tokens) -> float:
            return weight(step) / tokens

        out.append(per_sample)
    return out


def row_tokens(batch: Any, seq_len: int | None = None) -> np.ndarray:
    """Tokens in each sample of ``batch``: the ``attention_mask`` sum of dict batches, else
    the length of integer sequence inputs (capped at ``seq_len``), else 1 per sample."""
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return mask.reshape(len(mask), -1).sum(dim=1).numpy().astype(np.int64)
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return np.full(len(ids), ids.shape[-1] if ids.dim() >= 2 else 1, dtype=np.int64)
        first = next(iter(batch.values()))
        return np.ones(len(first), dtype=np.int64)
    inputs = batch[0]
    if inputs.dim() >= 2 and not torch.is_floating_point(inputs):
        length = int(inputs.shape[-1]) if seq_len is None else min(seq_len, int(inputs.shape[-1]))
        return np.full(len(inputs), length, dtype=np.int64)
    return np.ones(len(inputs), dtype=np.int64)


def mean_tokens_per_sample(dataset: Any, seq_len: int | None = None, *, sample: int = 64) -> float:
    """Mean tokens of one sample of ``dataset`` at ``seq_len`` (for token weights).

    A dataset may answer itself through ``tokens_per_sample(seq_len)`` (token windows:
    exactly ``seq_len``; padded documents: their mean unpadded length); otherwise
    ``sample`` items spread over it are fetched and counted with :func:`row_tokens`.
    """
    own = getattr(dataset, "tokens_per_sample", None)
    if callable(own):
        return float(own(seq_len))
    from stagetrain.data import fetch

    n = len(dataset)
    indices = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
    return float(row_tokens(fetch(dataset, indices), seq_len).mean())


def source_of(indices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Source number of each index into concatenated sources starting at ``offsets``."""
    return np.searchsorted(np.asarray(offsets), np.asarray(indices), side="right") - 1


def tokens_by_source(
    indices: np.ndarray,
    offsets: np.ndarray,
    tokens_per_row: int | np.ndarray,
    *,
    n_sources: int | None = None,
) -> np.ndarray:
    """Tokens each source contributed to a batch (int64, one entry per source).

    Args:
        indices: the batch's sample indices into the stage's concatenated sources (what
            ``Stage.indices`` returns), in batch order.
        offsets: first index of each source (``ConcatSources.offsets``).
        tokens_per_row: tokens of every sample (a number, or one per row as from
            :func:`row_tokens`).
        n_sources: length of the result (default ``len(offsets)``).

    Example:
        >>> tokens_by_source(np.array([0, 5, 6, 1]), np.array([0, 4]), 64).tolist()
        [128, 128]
    """
    which = source_of(indices, offsets)
    per_row = np.broadcast_to(np.asarray(tokens_per_row, dtype=np.int64), which.shape)
    size = len(offsets) if n_sources is None else n_sources
    return np.bincount(which, weights=per_row, minlength=size).astype(np.int64)


class SourceTokenCounter:
    """Running tokens per source over a stage, for logs (``tokens_by_source`` records).

    Args:
        labels: the stage's source labels, in the order of its concatenated sources.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.totals = np.zeros(len(self.labels), dtype=np.int64)

    def add(
        self, indices: np.ndarray, offsets: np.ndarray, tokens_per_row: int | np.ndarray
    ) -> np.ndarray:
        """Count one batch; returns its per-source tokens."""
        counts = tokens_by_source(indices, offsets, tokens_per_row, n_sources=len(self.labels))
        self.totals += counts
        return counts

    def record(self) -> dict[str, int]:
        """``{label: tokens so far}``."""
        return {label: int(n) for label, n in zip(self.labels, self.totals, strict=True)}

    def shares(self) -> dict[str, float]:
        """``{label: share of the tokens so far}`` (zeros before the first batch)."""
        total = int(self.totals.sum())
        return {
            label: (int(n) / total if total else 0.0)
            for label, n in zip(self.labels, self.totals, strict=True)
        }

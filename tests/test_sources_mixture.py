"""Mixtures by tokens: token shares -> sample shares, and tokens per source of a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stagetrain.data import ConcatSources, TensorPairDataset
from stagetrain.errors import ConfigError
from stagetrain.sampler import StageSampler
from stagetrain.schedules import constant, linear
from stagetrain.sources.mixture import (
    SourceTokenCounter,
    mean_tokens_per_sample,
    row_tokens,
    sample_shares_from_token_shares,
    source_of,
    token_weight_schedules,
    tokens_by_source,
)


@pytest.mark.parametrize(
    ("token_shares", "per_sample", "expected"),
    [
        ([0.7, 0.3], [64, 64], [0.7, 0.3]),  # equal sample sizes: the shares coincide
        ([0.5, 0.5], [100, 300], [0.75, 0.25]),  # short samples are drawn 3x as often
        ([7, 3], [256, 128], [7 / 256 / (7 / 256 + 3 / 128), 3 / 128 / (7 / 256 + 3 / 128)]),
        ([1, 0, 1], [10, 10, 40], [0.8, 0.0, 0.2]),
    ],
)
def test_sample_shares_give_the_token_shares(
    token_shares: list[float], per_sample: list[float], expected: list[float]
) -> None:
    shares = sample_shares_from_token_shares(token_shares, per_sample)
    assert shares.tolist() == pytest.approx(expected)
    tokens = shares * np.asarray(per_sample)
    assert (tokens / tokens.sum()).tolist() == pytest.approx(
        (np.asarray(token_shares) / np.sum(token_shares)).tolist()
    )


def test_bad_token_shares() -> None:
    with pytest.raises(ConfigError, match="2 shares for 3 sources"):
        sample_shares_from_token_shares([1, 1], [1, 2, 3])
    with pytest.raises(ConfigError, match="shares must be >= 0 and not all 0"):
        sample_shares_from_token_shares([0, 0], [1, 2])
    with pytest.raises(ConfigError, match="tokens per sample must be > 0"):
        sample_shares_from_token_shares([1, 1], [0, 2])


def test_schedules_through_the_sampler_hit_the_token_shares() -> None:
    per_sample = [256.0, 64.0]
    weights = token_weight_schedules([constant(0.7), constant(0.3)], per_sample)
    sampler = StageSampler([1000, 1000], weights, batch_size=40, steps=200, seed=0, stage_index=1)
    samples = sampler.counts.sum(axis=0)
    tokens = samples * np.asarray(per_sample)
    assert tokens[0] / tokens.sum() == pytest.approx(0.7, abs=1e-3)
    moving = token_weight_schedules([linear(1.0, 0.0, 10), constant(1.0)], [10.0, 20.0])
    assert [moving[0](t) for t in (0, 5, 10)] == pytest.approx([0.1, 0.05, 0.0])
    assert moving[1](3) == pytest.approx(0.05)


def test_tokens_by_source_from_the_batch_indices() -> None:
    concat = ConcatSources([TensorPairDataset(torch.zeros(5, 8), torch.zeros(5)),
                            TensorPairDataset(torch.zeros(3, 8), torch.zeros(3))])  # fmt: skip
    indices = np.array([0, 6, 4, 5, 7, 1])
    assert source_of(indices, concat.offsets).tolist() == [0, 1, 0, 1, 1, 0]
    assert tokens_by_source(indices, concat.offsets, 64).tolist() == [192, 192]
    per_row = np.array([10, 1, 10, 2, 3, 10])  # e.g. unpadded lengths from attention masks
    assert tokens_by_source(indices, concat.offsets, per_row).tolist() == [30, 6]
    counter = SourceTokenCounter(["general", "domain"])
    counter.add(indices, concat.offsets, 64)
    counter.add(np.array([0, 1]), concat.offsets, 64)
    assert counter.record() == {"general": 320, "domain": 192}
    assert counter.shares() == pytest.approx({"general": 0.625, "domain": 0.375})


def test_row_tokens_and_mean_tokens_per_sample() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert row_tokens({"input_ids": torch.zeros(2, 3), "attention_mask": mask}).tolist() == [2, 1]
    assert row_tokens((torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16)), 8).tolist() == [
        8,
        8,
    ]
    assert row_tokens((torch.zeros(2, 16), torch.zeros(2))).tolist() == [1, 1]  # not tokens
    data = TensorPairDataset(
        torch.zeros(10, 32, dtype=torch.long), torch.zeros(10, 32, dtype=torch.long)
    )
    assert mean_tokens_per_sample(data) == 32 and mean_tokens_per_sample(data, 16) == 16

    class Own:
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> None:
            raise AssertionError("not fetched")

        def tokens_per_sample(self, seq_len: int | None) -> float:
            return 12.5

    assert mean_tokens_per_sample(Own(), 64) == 12.5

"""The deterministic sampler: a pure function of (seed, stage, step, rank, world)."""

import numpy as np
import pytest

from stagetrain.sampler import StageSampler, apportion
from stagetrain.schedules import constant, linear


def make(
    seed: int = 0, sizes: tuple[int, ...] = (100,), weights=None, batch: int = 8, steps: int = 50
) -> StageSampler:
    weights = weights or [constant(1.0)] * len(sizes)
    return StageSampler(sizes, weights, batch, steps, seed, stage_index=1)


def test_same_inputs_same_batches_in_any_order() -> None:
    a, b = make(), make()
    forward = [a.global_batch(t).tolist() for t in range(50)]
    backward = [b.global_batch(t).tolist() for t in reversed(range(50))][::-1]
    assert forward == backward  # no hidden state: querying out of order changes nothing


def test_seed_and_stage_change_the_order() -> None:
    assert make(seed=0).global_batch(0).tolist() != make(seed=1).global_batch(0).tolist()
    other_stage = StageSampler([100], [constant(1.0)], 8, 50, 0, stage_index=2)
    assert make().global_batch(0).tolist() != other_stage.global_batch(0).tolist()


def test_each_epoch_is_a_permutation() -> None:
    s = make(sizes=(40,), batch=8, steps=10)  # 80 samples = 2 epochs of 40
    drawn = np.concatenate([s.global_batch(t) for t in range(10)])
    assert sorted(drawn[:40].tolist()) == list(range(40))
    assert sorted(drawn[40:].tolist()) == list(range(40))
    assert drawn[:40].tolist() != drawn[40:].tolist()  # a fresh order each epoch


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shards_partition_the_global_batch(world: int) -> None:
    s = make(batch=8)
    for t in range(5):
        shards = [s.rank_batch(t, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(shards), s.global_batch(t))


def test_batch_not_divisible_by_world_is_refused() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        make(batch=6).rank_batch(0, 0, 4)


def test_mixture_counts_match_weights() -> None:
    counts = apportion([constant(3.0), constant(1.0)], batch_size=10, steps=1000)
    assert (counts.sum(axis=1) == 10).all()
    assert counts[:, 0].sum() == 7500  # exactly 3/4 over the run
    # running totals never drift more than one sample from the exact share
    running = np.cumsum(counts[:, 0]) - 7.5 * np.arange(1, 1001)
    assert np.abs(running).max() <= 1.0


def test_mixture_weight_schedule() -> None:
    counts = apportion([linear(1.0, 0.0, 100), linear(0.0, 1.0, 100)], batch_size=10, steps=101)
    assert counts[0].tolist() == [10, 0]
    assert counts[100].tolist() == [0, 10]
    assert counts[50].tolist() == [5, 5]


def test_mixture_indices_fall_in_their_sources() -> None:
    s = make(sizes=(30, 70), weights=[constant(1.0), constant(1.0)], batch=10, steps=20)
    for t in range(20):
        batch = s.global_batch(t)
        assert (batch < 30).sum() == 5 and (batch >= 30).sum() == 5
        assert batch.max() < 100


def test_step_outside_stage() -> None:
    with pytest.raises(IndexError):
        make(steps=5).global_batch(5)

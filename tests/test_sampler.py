"""The deterministic sampler: a pure function of (seed, stage, step, rank, world)."""

import numpy as np
import pytest

from stagetrain.pacing import PacedSampler
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


# --- closed-form apportionment: any step in O(1), whatever the stage's length ------------

import time  # noqa: E402
import tracemalloc  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stagetrain.sampler import Apportionment  # noqa: E402
from stagetrain.schedules import cosine, piecewise_constant  # noqa: E402


def ideal(weights: list[float], batch: int, t: int) -> np.ndarray:
    w = np.maximum(np.asarray(weights, dtype=float), 0.0)
    share = w / w.sum() if w.sum() > 0 else np.full(len(w), 1 / len(w))
    return batch * t * share


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    weights=st.lists(st.floats(0.001, 1000.0), min_size=1, max_size=6),
    batch=st.integers(1, 64),
    probes=st.lists(st.integers(0, 10**12 - 1), min_size=1, max_size=5),
)
def test_constant_mixture_any_step_properties(
    weights: list[float], batch: int, probes: list[int]
) -> None:
    split = Apportionment([constant(w) for w in weights], batch, steps=10**12)
    # at most two sources below one sample per step: the closed form, within one sample
    tiny = sum(batch * w / sum(weights) < 1 for w in weights)
    for t in [*probes, 0, 10**12 - 1]:
        counts = split.counts(t)
        assert counts.sum() == batch and (counts >= 0).all()
        assert np.array_equal(split.cumulative(t + 1), split.cumulative(t) + counts)
        drift = np.abs(split.cumulative(t) - ideal(weights, batch, t)).max()
        assert drift <= (1.0 if tiny <= 2 else split.drift_bound) + 1e-6
        assert split.drift_bound <= 1.5


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    weights=st.lists(st.floats(0.001, 100.0), min_size=2, max_size=6),
    batch=st.integers(1, 16),
    steps=st.integers(1, 300),
)
def test_cumulative_is_the_running_sum_of_counts(
    weights: list[float], batch: int, steps: int
) -> None:
    split = Apportionment([constant(w) for w in weights], batch, steps)
    rows = np.array([split.counts(t) for t in range(steps)])
    assert (rows >= 0).all() and (rows.sum(axis=1) == batch).all()
    running = np.vstack([np.zeros((1, len(weights)), np.int64), np.cumsum(rows, axis=0)])
    assert np.array_equal(running, np.array([split.cumulative(t) for t in range(steps + 1)]))
    assert np.array_equal(apportion([constant(w) for w in weights], batch, steps), rows)
    drift = np.abs(running - np.array([ideal(weights, batch, t) for t in range(steps + 1)]))
    assert drift.max() <= 2.0 + 1e-9


def test_many_sources_below_one_sample_per_step_stay_exact() -> None:
    # Four sources get 0.08 samples per step each: the repaired path keeps every property.
    weights = [1.0, 1.0, 1.0, 1.0, 96.0]
    split = Apportionment([constant(w) for w in weights], 8, 5000)
    rows = np.array([split.counts(t) for t in range(5000)])
    assert (rows >= 0).all() and (rows.sum(axis=1) == 8).all()
    running = np.cumsum(rows, axis=0)
    exact = 8 * np.arange(1, 5001)[:, None] * np.array(weights) / 100
    assert np.abs(running - exact).max() <= 2.0
    assert running[-1].tolist() == [400, 400, 400, 400, 38400]


@pytest.mark.parametrize(
    "weights",
    [
        [linear(1.0, 0.0, 7000), linear(0.0, 1.0, 7000)],
        [cosine(3.0, 0.5, 9000), constant(1.0), piecewise_constant([5000], [0.0, 2.0])],
        [linear(0.0, 1.0, 9000), constant(0.05), constant(0.05), linear(1.0, 0.0, 9000)],
    ],
)
def test_scheduled_mixture_properties_and_order_independence(weights: list) -> None:
    steps, batch = 9000, 16
    split = Apportionment(weights, batch, steps, chunk=1000)
    rows = np.array([split.counts(t) for t in range(steps)])
    assert (rows >= 0).all() and (rows.sum(axis=1) == batch).all()
    shares = np.array([[max(f(t), 0.0) for f in weights] for t in range(steps)])
    shares /= shares.sum(axis=1, keepdims=True)
    exact = np.cumsum(batch * shares, axis=0)
    assert np.abs(np.cumsum(rows, axis=0) - exact).max() <= 2.0
    # A fresh sampler asked for a late step first (a resume) sees the same cursor.
    fresh = Apportionment(weights, batch, steps, chunk=1000)
    for t in (8999, 4321, 0, 1000, 999):
        assert np.array_equal(fresh.cumulative(t), rows[:t].sum(axis=0))
        assert np.array_equal(fresh.counts(t), rows[t])


def test_shares_and_passes_without_per_step_arrays() -> None:
    s = StageSampler([1000, 3000], [constant(3.0), constant(1.0)], 10, 10**9, 0, 0)
    assert s.source_totals().tolist() == [7_500_000_000, 2_500_000_000]
    assert s.source_repeats() == pytest.approx([7_500_000, 2_500_000 / 3])
    ramp = StageSampler([100, 100], [linear(1.0, 0.0, 10**9), constant(0.0)], 8, 10**9, 0, 0)
    # a linear ramp to 0 against nothing: the share is 1 until the very last step
    assert ramp.source_shares() == pytest.approx([1.0, 0.0], abs=1e-6)
    half = StageSampler(
        [10, 10], [linear(1.0, 0.0, 10**9), linear(0.0, 1.0, 10**9)], 8, 10**9, 0, 0
    )
    assert half.source_shares() == pytest.approx([0.5, 0.5], abs=1e-4)


def test_construction_and_late_steps_are_constant_time_and_memory() -> None:
    tracemalloc.start()
    start = time.perf_counter()
    s = StageSampler([1000, 5000], [constant(1.0), constant(2.0)], 1024, 10**12, 0, 0)
    batch = s.global_batch(10**12 - 1)
    p = PacedSampler(np.arange(1000), constant(0.5), 64, 10**12, 0, 0)
    p.global_batch(10**12 - 1)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(batch) == 1024 and ((batch < 1000).sum() in (341, 342))
    assert seconds < 1.0 and peak < 50 * 2**20, (seconds, peak)


def test_a_resume_state_skips_the_blocks_before_it() -> None:
    import json

    calls = {"n": 0}

    def counted(t: float) -> float:
        calls["n"] += 1
        return 1.0 - t / 50_000

    weights = [counted, constant(0.5), linear(0.0, 2.0, 50_000)]
    first = Apportionment(weights, 16, 50_000, chunk=1000)
    expected = [first.counts(t) for t in range(43_000, 43_200)]
    state = json.loads(json.dumps(first.resume_state(43_050)))  # through a checkpoint
    assert state["block"] == 43 and len(state["cursor"]) == 3
    calls["n"] = 0
    resumed = Apportionment(weights, 16, 50_000, chunk=1000)
    resumed.restore(state)
    again = [resumed.counts(t) for t in range(43_000, 43_200)]
    assert all(np.array_equal(a, b) for a, b in zip(again, expected, strict=True))
    assert calls["n"] <= 2 * 1000 + 300  # two blocks and the probe, not 43 blocks
    constant_mix = Apportionment([constant(1.0), constant(2.0)], 8, 10**9)
    assert constant_mix.resume_state(10**8) is None  # nothing to store: closed form


def test_non_finite_constant_weights() -> None:
    inf, nan = float("inf"), float("nan")
    assert Apportionment([constant(inf), constant(1.0)], 8, 10).totals().tolist() == [80, 0]
    assert Apportionment([constant(nan), constant(1.0)], 8, 10).totals().tolist() == [0, 80]
    assert Apportionment([0.0, 0.0, 0.0], 9, 10).totals().tolist() == [30, 30, 30]

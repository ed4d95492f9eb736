"""Pacing functions against hand-computed values, orderings, the paced sampler, class balance."""

import numpy as np
import pytest
from pydantic import ValidationError

from stagetrain.config import PacingConfig
from stagetrain.pacing import PacedSampler, ordering, pacing_function

# stage of T = 100 steps, a = 0.5 (all data visible from step 50), b = 0.2
CASES = [
    ("step", [(0, 0.2), (49, 0.2), (50, 1.0), (99, 1.0)]),
    ("linear", [(0, 0.2), (25, 0.6), (50, 1.0), (80, 1.0)]),
    ("root", [(0, 0.2), (12.5, 0.6), (50, 1.0)]),  # p = 2: 0.2 + 0.8 * sqrt(0.25)
    ("exp", [(0, 0.2), (25, 0.2053542807394279), (50, 1.0)]),  # 0.2 + 0.8 (e^5 - 1)/(e^10 - 1)
    ("log", [(0, 0.2), (25, 0.9445554892142018), (50, 1.0)]),  # 0.2 + 0.8 (1 + 0.1 ln(0.5 + e^-10))
    ("competence_linear", [(0, 0.2), (25, 0.6), (50, 1.0)]),
    ("competence_sqrt", [(0, 0.2), (25, 0.7211102550927979), (50, 1.0)]),  # sqrt(0.5 * 0.96 + 0.04)
]


@pytest.mark.parametrize(("kind", "table"), CASES)
def test_pacing_values(kind: str, table: list[tuple[float, float]]) -> None:
    g = pacing_function(PacingConfig(kind=kind, a=0.5, b=0.2, p=2.0), stage_steps=100)
    for step, value in table:
        assert g(step) == pytest.approx(value, abs=1e-9), (kind, step)


@pytest.mark.parametrize(
    ("field", "value"),
    [("a", 0.0), ("a", 1.5), ("b", 0.0), ("b", 1.2), ("p", -1.0), ("kind", "cubic")],
)
def test_pacing_parameters_out_of_range(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        PacingConfig.model_validate({"kind": "linear", field: value})


def test_orderings() -> None:
    scores = np.array([0.5, 0.1, 0.9, 0.3])
    assert ordering(scores, "curriculum", 0, 0).tolist() == [1, 3, 0, 2]
    assert ordering(scores, "anti", 0, 0).tolist() == [2, 0, 3, 1]
    random_order = ordering(scores, "random", 0, 0)
    assert sorted(random_order.tolist()) == [0, 1, 2, 3]
    assert random_order.tolist() == ordering(scores, "random", 0, 0).tolist()  # seeded
    many = np.arange(1000, dtype=float)
    assert ordering(many, "random", 0, 0).tolist() != ordering(many, "random", 1, 0).tolist()


def test_paced_sampler_draws_only_visible_samples() -> None:
    order = np.arange(1000)[::-1].copy()  # visibility order: 999, 998, ...
    g = pacing_function(PacingConfig(kind="step", a=0.5, b=0.1), stage_steps=20)
    sampler = PacedSampler(order, g, batch_size=64, steps=20, seed=0, stage_index=0)
    early = np.concatenate([sampler.global_batch(t) for t in range(10)])
    assert early.min() >= 900  # only the first 10 % of the order is visible
    late = np.concatenate([sampler.global_batch(t) for t in range(10, 20)])
    assert late.min() < 900
    assert np.array_equal(sampler.global_batch(3), sampler.global_batch(3))
    shards = np.concatenate([sampler.rank_batch(3, r, 4) for r in range(4)])
    assert np.array_equal(shards, sampler.global_batch(3))


def test_class_balanced_draws() -> None:
    labels = np.array([0] * 900 + [1] * 100)  # 90 % / 10 % imbalance
    order = np.arange(1000)
    g = pacing_function(PacingConfig(kind="linear", a=1.0, b=1.0), stage_steps=10)
    sampler = PacedSampler(order, g, batch_size=100, steps=10, seed=0, stage_index=0, labels=labels)
    drawn = np.concatenate([sampler.global_batch(t) for t in range(10)])
    assert (labels[drawn] == 1).sum() == 500  # exactly half, against 10 % without balancing
    plain = PacedSampler(order, g, batch_size=100, steps=10, seed=0, stage_index=0)
    assert (labels[np.concatenate([plain.global_batch(t) for t in range(10)])] == 1).sum() < 200


def test_class_balance_only_over_visible_classes() -> None:
    labels = np.array([0] * 50 + [1] * 50)
    g = pacing_function(PacingConfig(kind="step", a=0.5, b=0.3), stage_steps=10)
    sampler = PacedSampler(
        np.arange(100), g, batch_size=10, steps=10, seed=0, stage_index=0, labels=labels
    )
    assert set(labels[sampler.global_batch(0)].tolist()) == {0}  # class 1 not visible yet
    assert set(labels[sampler.global_batch(9)].tolist()) == {0, 1}

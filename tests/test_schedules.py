"""Boundary tables: the value at each step on both sides of every boundary."""

import math

import pytest

from stagetrain.schedules import (
    CosineSchedule,
    JoinSchedule,
    StepSchedule,
    WSDSchedule,
    constant,
    cosine,
    join,
    linear,
    piecewise_constant,
    warmup_stable_decay,
)
from stagetrain.time import TimeContext


def test_constant() -> None:
    assert [constant(0.5)(t) for t in (0, 10, 1e9)] == [0.5, 0.5, 0.5]


def test_linear_boundaries() -> None:
    f = linear(0.0, 1.0, 10)
    # (step, value): before start, start, middle, last-before-end, end, after end
    table = [(-1, 0.0), (0, 0.0), (5, 0.5), (9, 0.9), (10, 1.0), (11, 1.0)]
    for step, value in table:
        assert f(step) == pytest.approx(value), step


def test_cosine_boundaries() -> None:
    f = cosine(1.0, 0.0, 100)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)
    assert f(200) == pytest.approx(0.0)  # held after the end
    assert f(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_join_gives_stage_local_time() -> None:
    # stage 1: linear 0 -> 1 over 10 steps; stage 2 (from step 10): linear 1 -> 0 over 20
    f = join([linear(0.0, 1.0, 10), linear(1.0, 0.0, 20)], [10])
    table = [
        (0, 0.0),
        (9, 0.9),  # last step of stage 1
        (10, 1.0),  # boundary: stage 2 at its local step 0
        (11, 0.95),  # stage 2 local step 1
        (29, 0.05),
        (30, 0.0),
    ]
    for step, value in table:
        assert f(step) == pytest.approx(value), step


def test_join_three_pieces() -> None:
    f = join([constant(1.0), constant(2.0), linear(3.0, 4.0, 10)], [5, 8])
    assert [f(t) for t in (4, 5, 7, 8, 13, 18)] == pytest.approx([1, 2, 2, 3.0, 3.5, 4.0])


def test_piecewise_constant() -> None:
    f = piecewise_constant([10, 20], [1.0, 0.1, 0.01])
    assert [f(t) for t in (0, 9, 10, 19, 20, 100)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def test_wsd_boundaries() -> None:
    f = warmup_stable_decay(peak=1.0, warmup=10, stable=80, decay=10, end=0.0)
    table = [(0, 0.0), (5, 0.5), (9, 0.9), (10, 1.0), (89, 1.0), (90, 1.0), (95, 0.5), (100, 0.0)]
    for step, value in table:
        assert f(step) == pytest.approx(value), step


def test_configs_build_the_same_functions() -> None:
    ctx = TimeContext(batch_size=4)
    wsd = WSDSchedule(warmup="10ba", decay="0.1dur").build(100, ctx)
    assert [wsd(t) for t in (0, 10, 89, 95, 100)] == pytest.approx([0.0, 1.0, 1.0, 0.5, 0.0])
    cos = CosineSchedule(start=1.0, end=0.1).build(100, ctx)
    assert cos(100) == pytest.approx(0.1)
    step = StepSchedule(boundaries=["0.5dur"], values=[1.0, 0.1]).build(100, ctx)
    assert (step(49), step(50)) == (1.0, 0.1)
    joined = JoinSchedule.model_validate(
        {
            "parts": [
                {"schedule": {"kind": "linear", "start": 0, "end": 1}, "length": "10ba"},
                {"schedule": {"kind": "constant", "value": 0.5}},
            ]
        }
    ).build(100, ctx)
    assert [joined(t) for t in (0, 5, 9, 10, 99)] == pytest.approx([0.0, 0.5, 0.9, 0.5, 0.5])

"""Advance rules: threshold, plateau, maximum and minimum duration, resume after a transition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_for_tests import StopAt

from stagetrain import ConfigError, Curriculum, TrainState, fit, make_plan, parse_config
from stagetrain.advance import check_advance
from stagetrain.config import AdvanceConfig
from stagetrain.logs import read_records


def decide(rule: AdvanceConfig, values: list[float], min_steps: int = 0) -> list[bool]:
    state = TrainState()
    out = []
    for i, value in enumerate(values):
        state.stage_step = 10 * (i + 1)
        out.append(check_advance(rule, value, state, min_steps).advance)
    return out


def test_threshold_fires_at_first_evaluation_reaching_it() -> None:
    rule = AdvanceConfig(metric="val.accuracy", threshold=0.9)
    assert decide(rule, [0.5, 0.89, 0.9, 0.95]) == [False, False, True, True]
    loss_rule = AdvanceConfig(metric="val.loss", threshold=0.3)  # minimised
    assert decide(loss_rule, [0.9, 0.31, 0.29]) == [False, False, True]


def test_min_duration_holds_the_stage() -> None:
    rule = AdvanceConfig(metric="val.accuracy", threshold=0.9)
    assert decide(rule, [0.95, 0.95, 0.95], min_steps=25) == [False, False, True]


def test_plateau() -> None:
    rule = AdvanceConfig(metric="val.accuracy", patience=2, delta=0.01)
    # best 0.5 -> 0.6 (improves) -> 0.605 (< delta) -> 0.603 -> fires at 2 non-improvements
    assert decide(rule, [0.5, 0.6, 0.605, 0.603, 0.7]) == [False, False, False, True, False]
    exact = AdvanceConfig(metric="val.loss", patience=1)  # delta 0: any strict gain counts
    assert decide(exact, [1.0, 0.9, 0.9]) == [False, False, True]


def test_rule_needs_threshold_or_patience() -> None:
    with pytest.raises(ValueError, match="exactly one of 'threshold' or 'patience'"):
        AdvanceConfig(metric="val.accuracy")


def test_metric_no_evaluation_produces(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["advance"] = {"metric": "val.accuracy", "threshold": 0.9}
    with pytest.raises(
        ConfigError,
        match=r"stages\[0\]\.advance\.metric: no evaluation of this stage produces 'val.accuracy'; available: \['test.loss', 'test.accuracy'\]",
    ):
        parse_config(tiny_config)


def run(config: dict[str, Any], run_dir: Path, **kwargs: Any):
    curriculum = Curriculum(parse_config(config))
    model = curriculum.build_model()
    result = fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False, **kwargs)
    return model, result, read_records(run_dir / "metrics.jsonl")


def test_transition_at_first_qualifying_evaluation(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    tiny_config["eval_every"] = "10ba"
    tiny_config["stages"][0]["advance"] = {"metric": "test.accuracy", "threshold": 0.0}
    _, result, records = run(tiny_config, tmp_path / "r")
    end = next(r for r in records if r["type"] == "stage_end" and r["stage"] == "easy")
    assert (end["step"], end["reason"]) == (10, "threshold")
    assert "test.accuracy" in end["detail"] and ">= 0" in end["detail"]
    start = next(r for r in records if r["type"] == "stage_start" and r["stage"] == "target")
    assert start["step"] == 10
    assert result.state.step == 10 + 40
    assert make_plan(Curriculum(parse_config(tiny_config))).stages[0].up_to


def test_transition_at_maximum_duration_otherwise(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    tiny_config["stages"][0]["advance"] = {"metric": "test.accuracy", "threshold": 1.01}
    _, _, records = run(tiny_config, tmp_path / "r")
    end = next(r for r in records if r["type"] == "stage_end" and r["stage"] == "easy")
    assert (end["step"], end["reason"]) == (30, "duration")


def test_resume_after_metric_transition_is_exact(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    tiny_config["eval_every"] = "10ba"
    tiny_config["checkpoint"] = {"every": "5ba", "keep": 3}
    tiny_config["stages"][0]["advance"] = {"metric": "test.loss", "patience": 1, "delta": 10.0}
    full_model, _, full_records = run(tiny_config, tmp_path / "full")
    switch = next(r["step"] for r in full_records if r["type"] == "stage_end")
    assert switch == 20  # the second evaluation cannot improve by 10: plateau after one
    run(tiny_config, tmp_path / "cut", callbacks=[StopAt(switch + 7)])
    resumed_model, result, cut_records = run(tiny_config, tmp_path / "cut", resume=True)
    assert result.state.step == switch + 40
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    timing = {"time", "samples_per_s", "step_time", "tokens_per_s", "padded_tokens_per_s"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(cut_records) == strip(full_records)


def test_resume_mid_plateau_keeps_the_counters(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["eval_every"] = "5ba"
    tiny_config["checkpoint"] = {"every": "5ba", "keep": 2}
    tiny_config["stages"][0]["advance"] = {"metric": "test.accuracy", "patience": 3, "delta": 0.5}
    _, _, full_records = run(tiny_config, tmp_path / "full")
    run(
        tiny_config, tmp_path / "cut", callbacks=[StopAt(12)]
    )  # checkpoint at 10: one non-improvement counted
    _, _, cut_records = run(tiny_config, tmp_path / "cut", resume=True)
    switch = next(r["step"] for r in full_records if r["type"] == "stage_end")
    assert switch == 20  # evals at 5 (best), 10, 15, 20 -> 3 without improvement
    assert next(r["step"] for r in cut_records if r["type"] == "stage_end") == switch


def test_paced_stage_trains(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][1]["data"]["difficulty"] = {
        "scorer": "callable",
        "fn": "helpers_for_tests:by_first_feature",
    }
    tiny_config["stages"][1]["pacing"] = {
        "kind": "linear",
        "a": 0.5,
        "b": 0.2,
        "class_balanced": True,
    }
    _, result, records = run(tiny_config, tmp_path / "r")
    assert result.state.step == 70
    assert any(r["type"] == "train" and r["stage"] == "target" for r in records)

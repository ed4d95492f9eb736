"""Defects of the first training loop (issue 15), each reproduced by a test.

Every test here failed on the loop before its rebuild into ``stagetrain.train``; they
pin the behaviour of the single stage exit, the engine's collectives, resume at stage
boundaries, the preflight, the run-directory policy and the smaller fixes.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helpers_for_tests
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config_dict
from helpers_for_tests import StopAt

from stagetrain import (
    CheckpointError,
    ConfigError,
    Curriculum,
    StageTrainError,
    TensorPairDataset,
    TrainingError,
    fit,
    parse_config,
)
from stagetrain.checkpoint import CheckpointStore
from stagetrain.logs import read_records

NAN_LOSS = "helpers_for_tests:cross_entropy_with_nans"


def run(config: dict[str, Any], run_dir: Path, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    curriculum = Curriculum(parse_config(config), progress=False)
    model = curriculum.build_model()
    result = fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False, **kwargs)
    return model, result


def records(run_dir: Path) -> list[dict[str, Any]]:
    return read_records(run_dir / "metrics.jsonl")


# --- 1. a NaN never passes a stage end, whatever ends the stage ---------------------------


def _advancing_nan_config() -> dict[str, Any]:
    config = tiny_config_dict(eval_every="10ba", log_every=1000)
    config["checkpoint"] = {"every": None, "keep": 3}
    for stage in config["stages"]:
        stage["loss"] = NAN_LOSS
    # The threshold is met at the first evaluation (step 10): the stage ends by its rule.
    config["stages"][0]["advance"] = {"metric": "test.accuracy", "threshold": 0.0}
    return config


def test_nan_before_an_advance_rule_ends_the_stage_is_raised(tmp_path: Path) -> None:
    helpers_for_tests.inject_nans(steps={4})
    with pytest.raises(
        TrainingError, match=r"non-finite loss at step 4 in stage 'easy' \(stage step 4\)"
    ):
        run(_advancing_nan_config(), tmp_path / "r")
    assert not (tmp_path / "r" / "summary.json").exists()
    assert CheckpointStore(tmp_path / "r" / "checkpoints").entries() == []


def test_nan_in_the_final_stage_ended_by_its_rule_is_not_completed(tmp_path: Path) -> None:
    config = _advancing_nan_config()
    config["stages"][0].pop("advance")
    config["stages"][1]["advance"] = {"metric": "test.accuracy", "threshold": 0.0}
    helpers_for_tests.inject_nans(steps={33})
    with pytest.raises(TrainingError, match=r"step 33 in stage 'target' \(stage step 3\)"):
        run(config, tmp_path / "r")
    assert not (tmp_path / "r" / "summary.json").exists()
    assert [e.step for e in CheckpointStore(tmp_path / "r" / "checkpoints").entries()] == [30]


# --- 3. resume and rollback from a stage-boundary checkpoint into a 'reset' stage ---------


def _reset_with_other_groups() -> dict[str, Any]:
    config = tiny_config_dict()
    config["checkpoint"] = {"every": None, "keep": 3}  # only the stage-end checkpoint
    config["stages"][1]["handoff"] = "reset"
    config["stages"][1]["optimizer"] = {
        "name": "adamw",
        "lr": 0.01,
        "lr_multipliers": {"3.*": 2.0},  # another param-group layout than stage 1's
    }
    return config


def test_resume_at_a_boundary_into_a_reset_stage_with_other_param_groups(
    tmp_path: Path,
) -> None:
    config = _reset_with_other_groups()
    full, _ = run(config, tmp_path / "full")
    run(config, tmp_path / "cut", callbacks=[StopAt(35)])  # newest checkpoint: step 30
    resumed, result = run(config, tmp_path / "cut", resume=True)
    assert result.state.step == 70
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_rollback_to_a_boundary_into_a_reset_stage_with_other_param_groups(
    tmp_path: Path,
) -> None:
    config = _reset_with_other_groups()
    for stage in config["stages"]:
        stage["loss"] = NAN_LOSS
    config["nonfinite"] = {"policy": "rollback"}
    helpers_for_tests.inject_nans(steps={36})
    _, result = run(config, tmp_path / "r")
    assert result.state.step == 70 and result.state.rollbacks == 1


# --- 4. everything is validated before step 0 ---------------------------------------------


def _assert_nothing_trained(run_dir: Path) -> None:
    log = run_dir / "metrics.jsonl"
    assert not log.exists() or not [r for r in records(run_dir) if r["type"] == "train"]


def test_freeze_pattern_of_a_later_stage_fails_before_step_0(tmp_path: Path) -> None:
    config = tiny_config_dict()
    config["stages"][1]["freeze"] = ["encoder.*"]
    with pytest.raises(ConfigError, match=r"stages\[1\]\.freeze\[0\]: pattern 'encoder\.\*'"):
        run(config, tmp_path / "r")
    _assert_nothing_trained(tmp_path / "r")


def test_lr_multiplier_pattern_of_a_later_stage_fails_before_step_0(tmp_path: Path) -> None:
    config = tiny_config_dict()
    config["stages"][1]["handoff"] = "reset"
    config["stages"][1]["optimizer"] = {"name": "adamw", "lr_multipliers": {"router.*": 10}}
    with pytest.raises(ConfigError, match=r"stages\[1\]\.optimizer\.lr_multipliers: .*router"):
        run(config, tmp_path / "r")
    _assert_nothing_trained(tmp_path / "r")


def test_evaluation_loss_is_validated_before_step_0(tmp_path: Path) -> None:
    config = tiny_config_dict()
    config["evals"][0]["loss"] = "no_such_module:loss"
    with pytest.raises(ConfigError, match=r"evals\[0\]\.loss"):
        run(config, tmp_path / "r")
    _assert_nothing_trained(tmp_path / "r")


def test_evaluation_that_cannot_run_fails_before_step_0(tmp_path: Path) -> None:
    config = tiny_config_dict()
    # 9 input bits for a model that takes 8: the evaluation cannot run on one batch.
    config["evals"][0]["data"]["args"]["n_bits"] = 9
    with pytest.raises(StageTrainError, match=r"evals\[0\]"):
        run(config, tmp_path / "r")
    _assert_nothing_trained(tmp_path / "r")


# --- 5. a fresh run never mixes with an earlier run's files --------------------------------


def test_fresh_run_into_a_used_directory_is_refused(tmp_path: Path) -> None:
    config = tiny_config_dict()
    run(config, tmp_path / "r")
    with pytest.raises(StageTrainError, match=r"not empty \(holds"):
        run(config, tmp_path / "r")
    assert (tmp_path / "r" / "summary.json").exists()  # the first run's results are kept
    assert [r for r in records(tmp_path / "r") if r["type"] == "train"]


def test_resume_of_a_finished_run_keeps_its_summary(tmp_path: Path) -> None:
    config = tiny_config_dict()
    run(config, tmp_path / "r")
    before = json.loads((tmp_path / "r" / "summary.json").read_text())
    _, result = run(config, tmp_path / "r", resume=True)
    after = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert after == before and after["metrics"]["test"]
    assert result.state.step == 70 and result.metrics == before["metrics"]


# --- 6. difficulty-score cache keys cover every input ---------------------------------------


def _scored_config(scorer: dict[str, Any]) -> dict[str, Any]:
    config = tiny_config_dict()
    config["stages"][0]["data"]["difficulty"] = scorer
    config["stages"][0]["data"]["select"] = {"easiest": 0.5}
    return config


def test_reference_model_by_name_is_keyed_by_its_weights() -> None:
    config = parse_config(_scored_config({"scorer": "loss", "model": "@ref"}))
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
    first = Curriculum(config, models={"ref": ref}, progress=False)
    with torch.no_grad():
        ref[1].weight.mul_(-1.0)  # another reference model under the same name
    second = Curriculum(config, models={"ref": ref}, progress=False)
    assert second.scorer.computed == 1  # recomputed, not read from the first run's cache
    a = first.stages[0].data.datasets[0].indices
    b = second.stages[0].data.datasets[0].indices
    assert not np.array_equal(a, b)


def test_callable_scorer_is_keyed_by_its_code(tmp_path: Path, monkeypatch: Any) -> None:
    module = tmp_path / "user_scores.py"
    module.write_text("def score(x, y):\n    return x[:, 0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config(_scored_config({"scorer": "callable", "fn": "user_scores:score"}))
    Curriculum(config, progress=False)
    module.write_text("def score(x, y):\n    return -x[:, 0]\n")
    sys.modules.pop("user_scores", None)
    again = Curriculum(config, progress=False)
    assert again.scorer.computed == 1


def test_seed_is_part_of_the_score_key() -> None:
    scorer = {"scorer": "loss", "model": {"builtin": "mlp", "args": {"in_features": 8}}}
    Curriculum(parse_config({**_scored_config(scorer), "seed": 1}), progress=False)
    again = Curriculum(parse_config({**_scored_config(scorer), "seed": 2}), progress=False)
    assert again.scorer.computed == 1  # the reference model's weights follow the seed


@pytest.mark.parametrize("poison", ["nan", "2d", "ints"])
def test_poisoned_cache_entries_are_recomputed(poison: str) -> None:
    config = parse_config(
        _scored_config({"scorer": "callable", "fn": "helpers_for_tests:by_first_feature"})
    )
    first = Curriculum(config, progress=False)
    entries = list(first.scorer.cache.directory.glob("*.npy"))
    assert len(entries) == 1
    good = np.load(entries[0])
    bad = {
        "nan": np.full_like(good, np.nan),
        "2d": np.stack([good, good], axis=1),
        "ints": good.astype(np.int64) * 0,
    }[poison]
    np.save(entries[0], bad)
    again = Curriculum(config, progress=False)
    assert again.scorer.computed == 1
    assert np.array_equal(np.load(entries[0]), good)


def test_changed_scores_are_detected_on_resume(tmp_path: Path) -> None:
    config = _scored_config({"scorer": "callable", "fn": "helpers_for_tests:by_first_feature"})
    run(config, tmp_path / "r", callbacks=[StopAt(15)])
    entries = list(Path(helpers_for_tests.cache_dir()).glob("*.npy"))
    scores = np.load(entries[0])
    np.save(entries[0], scores[::-1].copy())  # another ranking, same shape and values
    with pytest.raises(CheckpointError, match="the difficulty scores changed since the checkpoint"):
        run(config, tmp_path / "r", resume=True)


# --- 7. the smaller ones ---------------------------------------------------------------------


def test_tokens_per_sample_covers_every_source_of_a_mixture() -> None:
    short = TensorPairDataset(torch.zeros(64, 4, dtype=torch.long), torch.zeros(64, 4).long())
    long = TensorPairDataset(torch.zeros(64, 12, dtype=torch.long), torch.zeros(64, 12).long())
    config = {
        "batch_size": 8,
        "stages": [
            {
                "name": "mix",
                "duration": "800tok",
                "data": {"sources": ["@short", "@long"]},
            }
        ],
    }
    curriculum = Curriculum(parse_config(config), datasets={"short": short, "long": long})
    stage = curriculum.stages[0]
    assert stage.context.tokens_per_sample == 8  # half of each: (4 + 12) / 2
    assert stage.steps == 13  # ceil(800 / (8 * 8))


def test_nan_metric_does_not_advance_a_plateau_rule(tmp_path: Path) -> None:
    config = tiny_config_dict(eval_every="5ba")
    config["evals"][0]["loss"] = "helpers_for_tests:nan_after_first_eval"
    config["evals"][0]["metrics"] = ["loss"]
    config["stages"][0]["advance"] = {"metric": "test.loss", "patience": 1}
    helpers_for_tests.reset_eval_calls()
    with pytest.raises(TrainingError, match=r"test\.loss is nan"):
        run(config, tmp_path / "r")


def test_rollback_truncates_the_log(tmp_path: Path) -> None:
    config = tiny_config_dict(log_every=1)
    for stage in config["stages"]:
        stage["loss"] = NAN_LOSS
    config["nonfinite"] = {"policy": "rollback"}
    helpers_for_tests.inject_nans(steps={44})
    run(config, tmp_path / "r")
    steps = [r["step"] for r in records(tmp_path / "r") if r["type"] == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_restart_stage_rewinds_the_global_counters(tmp_path: Path) -> None:
    config = tiny_config_dict()
    run(config, tmp_path / "r", callbacks=[StopAt(55)])  # checkpoint at 50 (stage step 20)
    config["stages"][1]["duration"] = "30ba"
    _, result = run(config, tmp_path / "r", resume=True, on_change="restart-stage")
    assert result.state.step == 30 + 30  # stage 2 started over at global step 30
    assert result.state.samples == 60 * 16
    target = [r for r in records(tmp_path / "r") if r["stage"] == "target" and "step" in r]
    assert min(r["step"] for r in target) == 30


def test_fit_with_a_built_curriculum_refuses_datasets(tmp_path: Path) -> None:
    curriculum = Curriculum(parse_config(tiny_config_dict()), progress=False)
    with pytest.raises(ConfigError, match="datasets"):
        fit(
            curriculum.build_model(),
            curriculum,
            run_dir=tmp_path / "r",
            datasets={"x": TensorPairDataset(torch.zeros(2, 8), torch.zeros(2).long())},
            progress=False,
        )


def test_fit_with_a_built_curriculum_needs_its_teacher(tmp_path: Path) -> None:
    config = tiny_config_dict()
    config["stages"][1]["loss"] = [{"name": "cross_entropy"}, {"name": "kl_distill"}]
    curriculum = Curriculum(parse_config(config), has_teacher=True, progress=False)
    with pytest.raises(ConfigError, match="teacher"):
        fit(curriculum.build_model(), curriculum, run_dir=tmp_path / "r", progress=False)


def test_scoring_keeps_the_reference_model_in_training_mode() -> None:
    from stagetrain.difficulty import score_with_model

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = TensorPairDataset(torch.randn(10, 4), torch.zeros(10).long())
    score_with_model(model, data, progress=False)
    assert model.training


def test_stop_after_is_not_in_the_public_signature() -> None:
    assert "stop_after" not in inspect.signature(fit).parameters


def test_own_loop_gets_handoffs_freezing_and_advance_rules() -> None:
    config = tiny_config_dict()
    config["stages"][1]["handoff"] = "reset"
    config["stages"][1]["freeze"] = ["1.*"]
    config["stages"][0]["advance"] = {"metric": "test.accuracy", "threshold": 0.0}
    curriculum = Curriculum(parse_config(config), progress=False)
    model = curriculum.build_model()
    optimizer = None
    seen: list[tuple[int, str, int]] = []
    for step in curriculum.steps():
        if step.is_stage_start:
            optimizer = step.enter_stage(model, optimizer)
            seen.append((step.step, step.stage.name, len(optimizer.state)))
        inputs, targets = step.batch()
        loss = step.loss(model(inputs), targets)
        step.set_lr(optimizer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step.stage_step == 9:
            step.report({"test.accuracy": 0.5})  # the threshold 0.0 is met: advance now
    assert seen == [(0, "easy", 0), (10, "target", 0)]  # early switch; fresh optimizer
    assert not model[1].weight.requires_grad and model[3].weight.requires_grad


# --- 8. packaging ----------------------------------------------------------------------------


def test_every_imported_third_party_package_is_declared() -> None:
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    for package in ("safetensors", "matplotlib>=3.9"):
        assert f'"{package}' in text, package


def test_setup_script_fails_when_an_extra_cannot_be_installed() -> None:
    script = (Path(__file__).parent.parent / "scripts" / "setup.sh").read_text()
    assert "|| true" not in script


def test_cli_refuses_a_used_run_directory_in_one_line(tmp_path: Path) -> None:
    config = tiny_config_dict()
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "stagetrain.cli", "run", str(config_path)]
    command += ["--run-dir", str(tmp_path / "r"), "--no-progress"]
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert second.stderr.strip().count("\n") == 0 and "not empty (holds" in second.stderr

"""compare: arm derivation, statistics, report files, resume of an interrupted comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagetrain import ConfigError, Curriculum, parse_config
from stagetrain.arms import derive_arm
from stagetrain.compare import analyze, compare, markdown_table
from stagetrain.report import write_report
from stagetrain.stats import paired_difference, summarize


def lr_trajectory(config) -> list[float]:
    curriculum = Curriculum(config)
    return [step.lr for step in curriculum.steps()]


@pytest.fixture
def two_lr_config(tiny_config: dict[str, Any]) -> dict[str, Any]:
    # stage 2 resets with its own peak LR, warmup and cosine decay: the hardest case to match
    tiny_config["stages"][1]["handoff"] = "reset"
    tiny_config["stages"][1]["optimizer"] = {
        "name": "adamw", "lr": 0.003, "warmup": "4ba", "schedule": {"kind": "cosine", "end": 0.1}
    }  # fmt: skip
    return tiny_config


@pytest.mark.parametrize("arm", ["baseline", "union", "anti", "easy-only"])
def test_arms_share_budget_and_lr(two_lr_config: dict[str, Any], arm: str) -> None:
    config = parse_config(two_lr_config)
    curriculum = Curriculum(config)
    derived = derive_arm(curriculum, arm)
    derived_curriculum = Curriculum(derived)
    assert derived_curriculum.total_steps == curriculum.total_steps == 70
    assert lr_trajectory(derived) == pytest.approx(lr_trajectory(config), rel=1e-12, abs=1e-15)
    samples = [s.batch_size * s.steps for s in derived_curriculum.stages]
    assert sum(samples) == 70 * 16


def test_arm_data(tiny_config: dict[str, Any]) -> None:
    curriculum = Curriculum(parse_config(tiny_config))
    baseline = derive_arm(curriculum, "baseline")
    assert [s.label for s in baseline.stages[0].data.sources] == ["uniform"]
    easy = derive_arm(curriculum, "easy-only")
    assert [s.label for s in easy.stages[0].data.sources] == ["biased"]
    union = derive_arm(curriculum, "union")
    assert [(s.label, s.weight) for s in union.stages[0].data.sources] == [
        ("biased", 400.0),
        ("uniform", 400.0),
    ]
    anti = derive_arm(curriculum, "anti")
    assert [(s.name, s.duration) for s in anti.stages] == [("target", "40ba"), ("easy", "30ba")]


def test_random_order_arm(tiny_config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="'random-order' needs a stage with pacing"):
        derive_arm(Curriculum(parse_config(tiny_config)), "random-order")
    source = tiny_config["stages"][1]["data"]
    source["difficulty"] = {"scorer": "callable", "fn": "helpers_for_tests:by_first_feature"}
    tiny_config["stages"][1]["pacing"] = {"kind": "step", "a": 0.5, "b": 0.3}
    config = parse_config(tiny_config)
    arm = derive_arm(Curriculum(config), "random-order")
    assert arm.stages[1].pacing is not None and arm.stages[1].pacing.order == "random"
    assert arm.stages[0] == config.stages[0]
    assert lr_trajectory(arm) == lr_trajectory(config)


def test_underivable_and_unknown_arms(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"] = tiny_config["stages"][:1]
    curriculum = Curriculum(parse_config(tiny_config))
    with pytest.raises(ConfigError, match="'anti' needs a curriculum of at least two stages"):
        derive_arm(curriculum, "anti")
    with pytest.raises(ConfigError, match="unknown arm 'antii'"):
        derive_arm(curriculum, "antii")


def test_summary_statistics_by_hand() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.median, s.q25, s.q75, s.mean) == (4, 2.5, 1.75, 3.25, 2.5)
    assert 1.0 <= s.ci_low < 2.5 < s.ci_high <= 4.0


def test_paired_difference_by_hand() -> None:
    d = paired_difference([3, 4, 5, 6, 7, 8], [1, 1, 1, 1, 1, 1])
    assert d.mean == 4.5 and d.wins == 6
    # exact two-sided signed-rank test, all 6 differences positive: 2 / 2**6
    assert d.p_value == pytest.approx(2 / 64)
    assert d.significant()
    assert 2.0 <= d.ci_low < 4.5 < d.ci_high <= 7.0
    same = paired_difference([1, 2, 3], [1, 2, 3])
    assert same.p_value == 1.0 and not same.significant()
    lower_better = paired_difference([0.1, 0.2], [0.5, 0.6], higher_is_better=False)
    assert lower_better.wins == 2


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_bad_compare_input(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    path = write(tmp_path, tiny_config)
    with pytest.raises(ConfigError, match="seeds: need at least one seed"):
        compare(path, tmp_path / "out", seeds=0)
    with pytest.raises(ConfigError, match="unknown arm 'bogus'"):
        compare(path, tmp_path / "out", arms=["bogus"], seeds=1)
    with pytest.raises(ConfigError, match=r"no evaluation produces 'test\.f1'"):
        compare(path, tmp_path / "out", seeds=1, metric="test.f1")


@pytest.mark.slow
def test_compare_report_and_resume(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    path = write(tmp_path, tiny_config)
    out = tmp_path / "cmp"
    lines: list[str] = []
    analysis = compare(
        path, out, arms=["curriculum", "baseline"], seeds=2, jobs=2, echo=lines.append
    )
    assert len(lines) == 4 and all(": ok (" in line for line in lines)
    assert [a.arm for a in analysis.arms] == ["curriculum", "baseline"]
    assert all(len(a.runs) == 2 and not a.failed for a in analysis.arms)

    html_path, table = write_report(out)
    html = html_path.read_text()
    for png in ("curve_steps.png", "curve_time.png", "curve_tokens.png", "final_box.png"):
        assert (out / png).stat().st_size > 1000
    assert html.count("data:image/png;base64,") == 4
    assert "| curriculum | 2/2 |" in table and "<table>" in html

    # Interrupt: one run lost entirely, one cut mid-way (checkpoint, no summary).
    import shutil

    shutil.rmtree(out / "runs" / "baseline" / "seed-4")
    (out / "runs" / "curriculum" / "seed-3" / "summary.json").unlink()
    lines.clear()
    compare(path, out, arms=["curriculum", "baseline"], seeds=2, echo=lines.append)
    done = [line for line in lines if "already done" in line]
    rerun = sorted(
        line.split("]")[1].split(":")[0].strip() for line in lines if "already done" not in line
    )
    assert len(done) == 2
    assert rerun == ["baseline seed 4", "curriculum seed 3"]
    assert (out / "runs" / "curriculum" / "seed-3" / "summary.json").exists()


@pytest.mark.slow
def test_crashed_runs_are_reported_as_failed(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["model"] = {"factory": "no_such_module:make_model"}
    out = tmp_path / "cmp"
    lines: list[str] = []
    analysis = compare(write(tmp_path, tiny_config), out, seeds=1, echo=lines.append)
    assert all("FAILED" in line for line in lines)
    table = markdown_table(analysis)
    assert "| curriculum | 0/1 | failed |" in table
    assert "curriculum seed 3: failed: exit code 2" in table and "no_such_module" in table
    assert json.loads((out / "compare.json").read_text())["arms"] == ["curriculum", "baseline"]
    assert analyze(out).arms[0].failed[0].status == "failed"

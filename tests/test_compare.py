"""compare: in-process runs, data seeds, resume, crash isolation, report files, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import stagetrain
from stagetrain import ConfigError, Curriculum, StageTrainError, parse_config
from stagetrain.cli import build_parser, main
from stagetrain.compare import ArmAnalysis, RunResult, analyze, compare, markdown_table
from stagetrain.data import TensorPairDataset
from stagetrain.recipes.parity import parity_dataset
from stagetrain.report import curve_band, write_report


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def quiet(lines: list[str] | None = None) -> Any:
    return lines.append if lines is not None else (lambda _line: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small finished comparison (2 arms x 2 seeds), shared by the read-only tests."""
    from conftest import tiny_config_dict

    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "cmp"
    compare(write(tmp, tiny_config_dict()), out, seeds=2, jobs=2, threads=1, echo=quiet())
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cmp"
    shutil.copytree(finished, out)
    return out


# --- data seeds --------------------------------------------------------------------------


def test_data_seed_reaches_data_factories(tiny_config: dict[str, Any]) -> None:
    config = parse_config(dict(tiny_config, data_seed=7))
    assert config.data_seed == 7 and "data_seed" in config.fingerprint_dict()
    curriculum = Curriculum(config)
    built = curriculum.stages[1].data.datasets[0]
    expected = parity_dataset(n_bits=8, k=2, size=400, seed=7)
    assert torch.equal(built.inputs, expected.inputs)
    # the model's initialisation still follows 'seed'
    same_init = Curriculum(parse_config(tiny_config)).build_model()
    assert all(
        torch.equal(a, b)
        for a, b in zip(curriculum.build_model().parameters(), same_init.parameters(), strict=True)
    )
    default = Curriculum(parse_config(tiny_config)).stages[1].data.datasets[0]
    assert torch.equal(default.inputs, parity_dataset(n_bits=8, k=2, size=400, seed=3).inputs)


def run_configs(out: Path, arm: str) -> list[tuple[int, int]]:
    """(seed, data_seed) of each run directory of ``arm``, as the runs recorded them."""
    found = []
    for run in sorted((out / "runs" / arm).glob("seed-*/config.yaml")):
        config = yaml.safe_load(run.read_text())
        found.append((config["seed"], config["data_seed"]))
    return found


def test_vary_init_and_data(finished: Path, tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    assert run_configs(finished, "baseline") == [(3, 3), (4, 4)]  # default: both vary
    tiny_config["stages"] = [tiny_config["stages"][1] | {"duration": "5ba"}]
    tiny_config["evals"][0]["data"]["args"]["size"] = 32
    path = write(tmp_path, tiny_config)
    for vary, expected in [("init", [(3, 3), (4, 3)]), ("data", [(3, 3), (3, 4)])]:
        out = tmp_path / vary
        compare(path, out, arms=["curriculum"], seeds=2, vary=vary, threads=1, echo=quiet())
        assert run_configs(out, "curriculum") == expected
        assert json.loads((out / "compare.json").read_text())["vary"] == [vary]


# --- the worker pool ---------------------------------------------------------------------


def test_compare_in_memory_curriculum_in_process(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    # a Curriculum built in Python with datasets that exist only in this process
    generator = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(400, 8, generator=generator) < 0.5, 1.0, -1.0)
    y = (x[:, :2].prod(dim=1) > 0).long()
    tiny_config["stages"][1]["data"] = "@uniform"
    curriculum = Curriculum(
        parse_config(tiny_config), datasets={"uniform": TensorPairDataset(x, y)}
    )
    lines: list[str] = []
    analysis = stagetrain.compare(
        curriculum, tmp_path / "cmp", seeds=2, jobs=2, threads=1, echo=lines.append
    )
    assert sorted(line.split("] ")[1].split(":")[0] for line in lines) == [
        "baseline seed 3", "baseline seed 4", "curriculum seed 3", "curriculum seed 4",
    ]  # fmt: skip
    assert all(": ok (" in line for line in lines)
    assert all(len(a.runs) == 2 and not a.failed for a in analysis.arms)
    for arm in ("curriculum", "baseline"):
        for seed in (3, 4):
            assert (tmp_path / "cmp" / "runs" / arm / f"seed-{seed}" / "summary.json").exists()


def test_interrupted_compare_resumes(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    config = out / "config.yaml"
    shutil.rmtree(out / "runs" / "baseline" / "seed-4")  # lost entirely
    (out / "runs" / "curriculum" / "seed-3" / "summary.json").unlink()  # cut: checkpoints only
    lines: list[str] = []
    compare(config, out, seeds=2, threads=1, echo=lines.append)
    done = [line for line in lines if "already done" in line]
    rerun = sorted(line.split("] ")[1].split(":")[0] for line in lines if line not in done)
    assert len(done) == 2 and rerun == ["baseline seed 4", "curriculum seed 3"]
    assert (out / "runs" / "curriculum" / "seed-3" / "summary.json").exists()
    assert "resuming" in (out / "runs" / "curriculum" / "seed-3.log").read_text()


def test_crashed_worker_is_replaced_and_its_run_failed(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    tiny_config["model"] = {
        "factory": "helpers_for_tests:mlp_exit_on_seed",
        "args": {"exit_on": 4, "in_features": 8, "hidden": [16], "out_features": 2},
    }
    out = tmp_path / "cmp"
    lines: list[str] = []
    analysis = compare(write(tmp_path, tiny_config), out, seeds=3, jobs=2, threads=1,
                       echo=lines.append)  # fmt: skip
    failed = sorted((r.arm, r.seed) for a in analysis.arms for r in a.failed)
    assert failed == [("baseline", 4), ("curriculum", 4)]
    assert sum(": ok (" in line for line in lines) == 4
    for a in analysis.arms:
        (bad,) = a.failed
        assert bad.status == "failed" and bad.error is not None
        assert "worker process died (exit code 3)" in bad.error


def test_exception_in_a_run_is_recorded(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["model"] = {
        "factory": "helpers_for_tests:mlp_raise_on_seed",
        "args": {"raise_on": 3, "in_features": 8, "hidden": [16], "out_features": 2},
    }
    out = tmp_path / "cmp"
    analysis = compare(write(tmp_path, tiny_config), out, arms="curriculum", seeds=2, threads=1,
                       echo=quiet())  # fmt: skip
    (bad,) = analysis.arms[0].failed
    assert bad.seed == 3 and bad.error is not None and "no model for seed 3" in bad.error
    table = markdown_table(analysis)
    assert "| curriculum | 1/2 |" in table and "curriculum seed 3: failed" in table
    assert "Traceback" in (out / "runs" / "curriculum" / "seed-3.log").read_text()


# --- statistics in the table --------------------------------------------------------------


def test_table_reports_censored_time_to_target(finished: Path) -> None:
    analysis = analyze(finished, target=0.5)
    table = markdown_table(analysis)
    header = table.splitlines()[2]
    for column in ("reached target [95% CI]", "median steps to target", "Δ final vs baseline"):
        assert column in header
    for arm in analysis.arms:
        assert arm.time is not None and arm.time.n == 2
        for run in arm.runs:
            hit = run.time_to(0.5, True)
            assert hit is None or hit["step"] in [p["step"] for p in run.curve]


def test_table_says_the_means_intervals_are_rough_with_few_seeds(finished: Path) -> None:
    """A BCa interval of 2 or 3 values is printed like one of 10 (found by a user): the
    table says what it is worth below 8 seeds."""
    analysis = analyze(finished, target=0.5)
    assert len(analysis.seeds) == 2
    caveat = "the BCa intervals of the means are rough"
    assert f"With 2 seeds {caveat}" in markdown_table(analysis)
    many = dataclasses.replace(analysis, seeds=list(range(8)))
    assert caveat not in markdown_table(many)


def test_time_to_target_is_in_tokens_when_arms_take_other_numbers_of_steps() -> None:
    """A short-then-long curriculum and a long-context baseline trained the same tokens in
    80 and 50 steps: "steps to target" compared unequal amounts of training (found by a
    user). Arms ending at one step keep steps."""
    from stagetrain.compare import time_axis

    def run(arm: str, steps: list[int], tokens_per_step: int) -> RunResult:
        curve = [{"step": s, "samples": 16 * s, "tokens": tokens_per_step * s, "time": s / 10,
                  "value": 0.1 * k} for k, s in enumerate(steps, 1)]  # fmt: skip
        return RunResult(arm, 0, "completed", curve=curve)

    same = {"curriculum": [run("curriculum", [40, 80], 2560)], "baseline": [run("baseline", [40, 80], 2560)]}  # fmt: skip
    assert time_axis(same) == "step"
    mixed = {"curriculum": [run("curriculum", [40, 80], 2560)], "baseline": [run("baseline", [25, 50], 4096)]}  # fmt: skip
    assert time_axis(mixed) == "tokens"
    no_tokens = {"curriculum": [run("curriculum", [40, 80], 0)], "baseline": [run("baseline", [25, 50], 0)]}  # fmt: skip
    assert time_axis(no_tokens) == "samples"


def test_the_table_names_its_time_axis(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    analysis = analyze(out, target=0.5)
    assert analysis.time_unit == "step"  # both arms of the tiny curriculum end at step 70
    analysis.time_unit = "tokens"
    header = markdown_table(analysis).splitlines()[2]
    assert "median tokens to target" in header and "tokens to target vs baseline" in header


def test_verdict_follows_the_interval(finished: Path) -> None:
    analysis = analyze(finished)
    curriculum = next(a for a in analysis.arms if a.arm == "curriculum")
    d = curriculum.versus_baseline
    assert d is not None
    row = next(line for line in markdown_table(analysis).splitlines() if "| curriculum |" in line)
    # two seeds: the smallest two-sided p is 0.5, and the interval cannot exclude 0
    assert "no significant difference (p = 0.5" in row or "(p = 1)" in row
    assert d.ci_low <= 0 <= d.ci_high


# --- report ------------------------------------------------------------------------------


def test_report_metric_out_and_target_files(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    default, _ = write_report(out)
    assert default == out / "report.html"
    before = default.read_bytes()
    targeted, table = write_report(out, target=0.6)
    assert targeted != default and "0.6" in targeted.name and default.read_bytes() == before
    assert "threshold 0.6" in table
    other = tmp_path / "elsewhere"
    path, table = write_report(out, metric="test.loss", out=other)
    assert path.parent == other and (other / "curve_steps.png").stat().st_size > 1000
    assert "Target metric: test.loss (lower is better)" in table
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 4
    with pytest.raises(ConfigError, match=r"metric: no evaluation produces 'test\.f1'"):
        write_report(out, metric="test.f1")


def test_report_defaults_to_the_comparisons_own_target(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    spec = json.loads((out / "compare.json").read_text())
    assert spec["target"] is None
    (out / "compare.json").write_text(json.dumps(dict(spec, target=0.7)))  # as compare --target 0.7
    path, table = write_report(out)
    assert path == out / "report.html" and "threshold 0.7;" in table
    assert analyze(out, target=0.6).target == 0.6


def test_curve_band_stops_where_the_first_run_ends() -> None:
    def run(seed: int, end: float, value: float) -> RunResult:
        times = np.linspace(0, end, 5)
        curve = [{"step": i, "samples": i, "tokens": i, "time": float(t), "value": value}
                 for i, t in enumerate(times)]  # fmt: skip
        return RunResult("baseline", seed, "completed", curve)

    arm = ArmAnalysis("baseline", [run(0, 5.0, 0.5), run(1, 10.0, 1.0)], None, None, None, None)
    grid = np.linspace(0, 10, 11)
    band = curve_band(arm, "time", grid)
    assert band is not None
    median, low, high = band
    assert np.allclose(high[:6], 0.875) and np.allclose(low[:6], 0.625)
    assert np.allclose(median[:6], 0.75)  # both runs present: no jump to the survivor
    assert np.isnan(median[6:]).all()


def test_damaged_logs_are_listed_not_counted(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    garbled = out / "runs" / "baseline" / "seed-3" / "metrics.jsonl"
    lines = garbled.read_text().splitlines()
    lines[3] = '{"type": "eval", "step": "x"'
    garbled.write_text("\n".join(lines) + "\n")
    (out / "runs" / "baseline" / "seed-4" / "metrics.jsonl").write_text("")
    torn = out / "runs" / "curriculum" / "seed-3" / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"type": "train", "st')  # a kill mid-line: tolerated
    bad_record = out / "runs" / "curriculum" / "seed-4" / "metrics.jsonl"
    records = bad_record.read_text().splitlines()
    records[2] = json.dumps({"type": "eval", "step": -1, "stage": "easy", "stage_step": 0})
    bad_record.write_text("\n".join(records) + "\n")
    analysis = analyze(out)
    runs = {(r.arm, r.seed): r for a in analysis.arms for r in a.runs}
    assert runs["curriculum", 3].status == "completed"
    for key, where in [(("baseline", 3), "metrics.jsonl line 4"),
                       (("baseline", 4), "metrics.jsonl is empty"),
                       (("curriculum", 4), "metrics.jsonl line 3: step")]:  # fmt: skip
        assert runs[key].status == "damaged" and where in (runs[key].error or ""), runs[key].error
    table = markdown_table(analysis)
    assert "| baseline | 0/2 |" in table and "baseline seed 4: damaged" in table


# --- bad input ---------------------------------------------------------------------------


def test_bad_compare_input(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    path = write(tmp_path, tiny_config)
    out = tmp_path / "out"
    cases = [
        ({"seeds": 0}, "seeds: need at least one seed"),
        ({"arms": ["bogus"]}, "unknown arm 'bogus'"),
        ({"arms": "curriculum,curriculum"}, "arms: 'curriculum' is listed twice"),
        ({"metric": "test.f1"}, r"no evaluation produces 'test\.f1'"),
        ({"jobs": 0}, "jobs: need at least 1, got 0"),
        ({"vary": "init,weights"}, "vary: unknown 'weights'; choose from init, data"),
        ({"target": math.nan}, "target: must be a finite number, got nan"),
        ({"target": math.inf}, "target: must be a finite number, got inf"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            compare(path, out, **{"seeds": 1, **kwargs}, echo=quiet())  # type: ignore[arg-type]
        assert not out.exists(), kwargs
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        compare(path, tmp_path / "file", seeds=1, echo=quiet())


def test_missing_report_extra_fails_before_training(
    tmp_path: Path, tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if scipy were not installed
    with pytest.raises(StageTrainError, match=r"pip install 'stagetrain\[report\]'"):
        compare(write(tmp_path, tiny_config), tmp_path / "out", seeds=1, echo=quiet())
    assert not (tmp_path / "out").exists()


def test_cli_defaults_and_refusals(
    tmp_path: Path, tiny_config: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["compare", "c.yaml"])
    assert args.seeds == 10 and args.vary == "init,data"
    path = str(write(tmp_path, tiny_config))
    (tmp_path / "taken").write_text("x")
    for argv, message in [
        (["compare", path, "--jobs", "0", "--out", str(tmp_path / "o")], "jobs: need at least 1"),
        (["compare", path, "--arms", "curriculum,curriculum", "--out", str(tmp_path / "o")],
         "'curriculum' is listed twice"),
        (["compare", path, "--out", str(tmp_path / "taken")], "is a file, not a directory"),
        (["report", str(tmp_path), "--target", "nan"], "target: must be a finite number"),
        (["report", str(tmp_path)], "not a comparison directory"),
    ]:  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("stagetrain: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_refusals_in_a_subprocess(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    path = str(write(tmp_path, tiny_config))
    command = [sys.executable, "-m", "stagetrain.cli", "compare", path, "--jobs", "0",
               "--out", str(tmp_path / "o")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == "stagetrain: error: jobs: need at least 1, got 0\n"
    assert not (tmp_path / "o").exists()


def test_report_cli_writes_where_asked(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(finished, tmp_path)
    assert main(["report", str(out), "--metric", "test.loss", "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "Target metric: test.loss" in printed and str(tmp_path / "r") in printed
    assert (tmp_path / "r").is_dir() and not (out / "report.html").exists()

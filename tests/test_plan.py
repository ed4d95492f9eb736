import math
import re
from pathlib import Path

from stagetrain import Curriculum, load_config, make_plan
from stagetrain.cli import main

EXAMPLE = Path(__file__).parent.parent / "examples" / "parity_two_stage.yaml"


def test_plan_of_the_example() -> None:
    plan = make_plan(Curriculum(load_config(EXAMPLE)))
    assert [(s.name, s.start_step, s.end_step) for s in plan.stages] == [
        ("easy", 0, 1000),
        ("target", 1000, 4000),
    ]
    assert [(s.start_samples, s.end_samples) for s in plan.stages] == [
        (0, 64_000),
        (64_000, 256_000),
    ]
    assert plan.stages[1].handoff == "carry"
    assert plan.stages[0].lr_start == plan.stages[1].lr_end == 1e-3
    assert plan.stages[0].sources == [("biased", 1.0, 0.64)]
    assert plan.warnings == []


def test_plan_warns_when_a_source_repeats(tiny_config) -> None:
    from stagetrain import parse_config

    plan = make_plan(Curriculum(parse_config(tiny_config)))
    # stage 'target' draws 40 * 16 = 640 samples from a 400-sample source
    assert any("'uniform' (400 samples) repeats 1.60 times" in w for w in plan.warnings)


def test_plan_lr_and_warmup(tiny_config) -> None:
    from stagetrain import parse_config

    tiny_config["stages"][0]["optimizer"]["schedule"] = {"kind": "cosine", "end": 0.1}
    plan = make_plan(Curriculum(parse_config(tiny_config)))
    easy = plan.stages[0]
    assert easy.warmup_steps == 5 and easy.lr_start == 0.0


def test_cli_plan_prints_timeline(capsys) -> None:
    assert main(["plan", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "2 stages, 4,000 steps" in out
    assert "target  1,000–4,000" in out


def test_plan_shows_tokens_only_for_data_that_has_them(tiny_config) -> None:
    """Parity vectors have no tokens: a tokens column equal to the samples one said
    nothing (found by a user); a stage with a sequence length keeps it."""
    from stagetrain import parse_config

    header = make_plan(Curriculum(parse_config(tiny_config))).format().splitlines()[1]
    assert "samples" in header and "tokens" not in header
    tiny_config["stages"][1]["seq_len"] = 8
    text = make_plan(Curriculum(parse_config(tiny_config))).format()
    assert "tokens" in text.splitlines()[1]


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: []\n")
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stagetrain: error: ") and err.count("\n") == 1
    assert "stages: List should have at least 1 item" in err


# --- plan is O(number of stages), whatever the durations ----------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402


def two_source_config(tiny_config, duration: str, weight=1.0) -> dict:
    stage = tiny_config["stages"][1]
    stage["duration"] = duration
    stage["data"] = {
        "sources": [
            stage["data"],
            {**tiny_config["stages"][0]["data"], "weight": weight},
        ]
    }
    return tiny_config


@pytest.mark.parametrize(
    "weight", [3.0, {"kind": "linear", "start": 1.0, "end": 0.0}], ids=["constant", "scheduled"]
)
def test_plan_of_a_billion_step_mixture_is_fast_and_small(tiny_config, weight) -> None:
    from stagetrain import parse_config

    config = parse_config(two_source_config(tiny_config, "1e9ba", weight))
    curriculum = Curriculum(config)
    tracemalloc.start()
    start = time.perf_counter()
    plan = make_plan(curriculum)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 50 * 2**20, (seconds, peak)
    target = plan.stages[1]
    assert target.end_step - target.start_step == 10**9
    (_, share_uniform, passes_uniform), (_, share_biased, _) = target.sources
    # 1 : 3, or 1 : (1 -> 0): the share 1 / (2 - x) over x in [0, 1] integrates to ln 2
    expected = 0.25 if weight == 3.0 else math.log(2)
    assert share_uniform == pytest.approx(expected, abs=1e-3)
    assert share_uniform + share_biased == pytest.approx(1.0)
    assert passes_uniform == pytest.approx(expected * 16 * 10**9 / 400, rel=1e-3)


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stagetrain.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("duration", "message"),
    [
        ("1e15ba", r"stages\[1\]\.duration: '1e15ba' is too long: .* at most 1e\+12 steps"),
        ("1e400ba", r"stages\[1\]\.duration: '1e400ba' is too long"),
    ],
)
def test_cli_plan_refuses_absurd_durations_in_one_line(
    tmp_path, tiny_config, duration, message
) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(two_source_config(tiny_config, duration)))
    proc = run_cli("plan", str(path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


def test_cli_plan_of_the_largest_duration_answers_at_once(tmp_path, tiny_config) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(two_source_config(tiny_config, "1e12ba")))
    proc = run_cli("plan", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "1,000,000,000,030 steps" in proc.stdout


def test_cli_plan_of_a_binary_file_is_one_line(tmp_path) -> None:
    path = tmp_path / "model.yaml"
    path.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xff\xfe\xfd")
    proc = run_cli("plan", str(path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "model.yaml: not a text file" in proc.stderr

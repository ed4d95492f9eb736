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


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: []\n")
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stagetrain: error: ") and err.count("\n") == 1
    assert "stages: List should have at least 1 item" in err

"""``lr: auto``: the per-stage LR search (stagetrain.lr_search) and its place in fit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config_dict
from helpers_for_tests import StopAt

from stagetrain import Curriculum, OptimizerConfig, TrainState, fit, parse_config
from stagetrain.config import AutoLRConfig
from stagetrain.errors import ConfigError, StageTrainError, TrainingError
from stagetrain.handoff import enter_stage, trainable_flags
from stagetrain.logs import read_records
from stagetrain.lr_search import LocalBackend, SearchData, describe_search, search_lr
from stagetrain.lr_search.rules import candidate_lrs
from stagetrain.plan import make_plan
from stagetrain.rng import rng_state
from stagetrain.train import lr_auto

TESTS = Path(__file__).parent
SEARCH = {"range_steps": 30, "trial_steps": 5, "holdout": 64}
"""A small search: 30 range-test steps + 5 x 5 + 2 x 10 trial steps = 75 steps."""


def auto_config(duration: str = "120ba", **auto: Any) -> dict[str, Any]:
    """The tiny two-stage parity curriculum with ``lr: auto`` in its second stage."""
    config = tiny_config_dict()
    config["stages"][1]["duration"] = duration
    config["stages"][1]["optimizer"] = {"name": "adamw", "lr": "auto", "auto": {**SEARCH, **auto}}
    return config


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_records(run_dir / "metrics.jsonl") if r["type"] == kind]


def without_time(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "time"}


# --- configuration and bad input ------------------------------------------------------------


def test_lr_is_a_number_or_auto_and_numbers_work_as_before() -> None:
    assert OptimizerConfig(lr="1e-3").lr == 1e-3  # YAML reads 1e-3 as a string
    auto = OptimizerConfig(lr="auto")
    assert auto.is_auto and auto.initial_lr == auto.search.lr_min
    assert OptimizerConfig(lr=0.1).initial_lr == 0.1 and not OptimizerConfig().is_auto
    stages = Curriculum(parse_config(tiny_config_dict())).stages
    assert stages[0].lr_peak == 0.01 and stages[0].lr(10) == pytest.approx(0.01)
    searched = Curriculum(parse_config(auto_config())).stages[1]
    with pytest.raises(StageTrainError, match=r"^stages\[1\]\.optimizer\.lr: 'auto' is searched"):
        searched.lr(0)  # before its search: never a made-up LR
    searched.auto_lr = 0.5
    assert searched.lr_peak == 0.5 and searched.lr(0) == 0.5


def test_checkpoints_from_before_lr_auto_load() -> None:
    old = TrainState(step=7).to_dict()
    del old["lr_search"]
    assert TrainState.from_dict(old).lr_search == {}


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        ({"lr": "fast"}, r"stages\[1\]\.optimizer\.lr: expected a positive number or 'auto', got 'fast'"),
        ({"lr": 0.1, "auto": {}}, r"stages\[1\]\.optimizer\.auto: options of the LR search; they need lr: auto"),
        ({"lr": "auto", "auto": {"lr_min": 1, "lr_max": 0.5}}, r"stages\[1\]\.optimizer\.auto: lr_min \(1\) must be below lr_max \(0\.5\)"),
        ({"lr": "auto", "auto": {"holdout": 0.7}}, r"stages\[1\]\.optimizer\.auto\.holdout: a fraction .* at most 0\.5"),
        # trial_steps: a count or a share of the stage; range_steps: a count only
        ({"lr": "auto", "auto": {"trial_steps": 0.7}}, r"stages\[1\]\.optimizer\.auto\.trial_steps: must be a count of steps \(an integer >= 1\) or a fraction in \(0, 0\.5\] of the stage's steps, got 0\.7"),
        ({"lr": "auto", "auto": {"trial_steps": 0}}, r"stages\[1\]\.optimizer\.auto\.trial_steps: must be a count of steps .* got 0"),
        ({"lr": "auto", "auto": {"range_steps": 0.1}}, r"stages\[1\]\.optimizer\.auto\.range_steps: "),
        # a search budget larger than the stage
        ({"lr": "auto", "auto": {**SEARCH, "range_steps": 100}}, r"stages\[1\]\.optimizer\.auto: the LR search trains 145 steps \(100 range test \+ 45 trials\), more than the stage's 120"),
        # a stage too small to hold out a slice (400 samples)
        ({"lr": "auto", "auto": {**SEARCH, "holdout": 300}}, r"stages\[1\]\.optimizer\.auto\.holdout: holding out 300 of the 400 samples of source 'uniform' .* too small"),
        # an optimizer that has no learning rate
        ({"lr": "auto", "auto": SEARCH, "name": "helpers_lr_search:no_lr_optimizer"}, r"stages\[1\]\.optimizer\.lr: 'auto' needs an optimizer with a learning rate; helpers_lr_search:no_lr_optimizer takes no 'lr' argument"),
    ],
)  # fmt: skip
def test_bad_auto_settings_fail_before_training_naming_the_field(
    optimizer: dict[str, Any], message: str
) -> None:
    config = auto_config()
    config["stages"][1]["optimizer"] = optimizer
    config["stages"][1]["handoff"] = "reset"  # another optimizer than the first stage's
    with pytest.raises(ConfigError, match=f"^{message}") as caught:
        Curriculum(parse_config(config))
    assert "\n" not in str(caught.value)


def test_counted_budget_must_leave_training_steps_and_global_lr_excludes_auto() -> None:
    config = auto_config(duration="75ba", count_budget=True)
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.optimizer\.auto: .* not less than"):
        Curriculum(parse_config(config))
    config = {**auto_config(), "global_lr": {"lr": 0.01}}
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.optimizer\.lr: 'auto' has no effect"):
        Curriculum(parse_config(config))


def test_plan_shows_auto_with_its_budget_and_counted_budget_shortens_the_stage() -> None:
    text = make_plan(Curriculum(parse_config(auto_config()))).format()
    assert "auto ×1→×1, search 75 steps (1,200 samples, not counted)" in text
    # and its forward passes on the held-out slice: 64 samples, scored at the start and
    # after each of the 5 + 2 trials
    assert "not counted) + up to 512 held-out forward samples" in text
    counted = Curriculum(parse_config(auto_config(count_budget=True)))
    assert counted.stages[1].steps == 120 - 75
    assert "search 75 steps (1,200 samples, counted)" in make_plan(counted).format()


def test_trial_steps_as_a_share_are_sized_by_the_stage_duration_even_when_counted() -> None:
    cfg = AutoLRConfig(range_steps=30, trial_steps=0.05)
    assert cfg.rungs(100) == [(5, 5), (2, 10)]
    assert cfg.rungs(1000) == [(5, 50), (2, 100)]
    assert cfg.search_steps(100) == 30 + 25 + 20
    assert AutoLRConfig(trial_steps=0.001).rungs(100)[0] == (5, 1)  # at least one step
    assert AutoLRConfig(trial_steps=7).rungs(10_000)[0] == (5, 7)  # a count stays a count
    # counted: the stage trains its duration minus the search, and the search (of 5 % of
    # the 120-step duration, not of the 45 steps left) is the same 75 steps as uncounted
    share = {"range_steps": 30, "trial_steps": 5 / 120}
    counted = Curriculum(parse_config(auto_config(count_budget=True, **share))).stages[1]
    assert counted.steps == 120 - 75 and counted.duration_steps == 120
    assert "search 75 steps" in make_plan(Curriculum(parse_config(auto_config(**share)))).format()
    assert "search 75 steps (1,200 samples, counted)" in describe_search(counted)


def test_the_default_ladder_lies_below_the_pick_and_centred_around_it() -> None:
    below = candidate_lrs(1.0, AutoLRConfig(spread=2.0))
    assert below == pytest.approx([1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0])
    assert AutoLRConfig().ladder == "below"
    centred = candidate_lrs(1.0, AutoLRConfig(spread=2.0, ladder="centred"))
    assert centred == pytest.approx([1 / 4, 1 / 2, 1.0, 2.0, 4.0])
    assert candidate_lrs(1.0, AutoLRConfig(candidates=1)) == [1.0]


# --- the search itself -----------------------------------------------------------------------


def stage_start(config: dict[str, Any]) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
    """The second stage, a model and its optimizer after a few first-stage steps."""
    curriculum = Curriculum(parse_config(config))
    model = curriculum.build_model()
    first, second = curriculum.stages
    flags = trainable_flags(model)
    optimizer = enter_stage(first.config, 0, model, None, flags)
    for step in range(3):  # non-empty Adam moments
        inputs, targets = first.batch(step)
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return second, model, enter_stage(second.config, 1, model, optimizer, flags)


def test_search_restores_weights_optimizer_and_every_rng_bitwise() -> None:
    stage, model, optimizer = stage_start(auto_config())
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    before_weights = weights(model)
    before_optim = optimizer.state_dict()
    before_optim = {
        "state": {
            k: {n: t.clone() for n, t in v.items()} for k, v in before_optim["state"].items()
        },
        "groups": json.dumps(before_optim["param_groups"]),
    }
    before_rng = rng_state()
    result = search_lr(stage, model, optimizer, LocalBackend(stage, model, optimizer), seed=3)
    assert result.trials and result.steps == 75
    assert same(weights(model), before_weights)
    after = optimizer.state_dict()
    assert json.dumps(after["param_groups"]) == before_optim["groups"]
    for key, tensors in before_optim["state"].items():
        assert same(after["state"][key], tensors)
    rng = rng_state()
    assert torch.equal(rng["torch"], before_rng["torch"])
    assert torch.equal(rng["numpy"]["keys"], before_rng["numpy"]["keys"])
    assert rng["python"] == before_rng["python"]
    assert all(p.grad is None for p in model.parameters())


def test_search_is_deterministic_and_reports_every_candidate() -> None:
    results = []
    for _ in range(2):
        stage, model, optimizer = stage_start(auto_config())
        results.append(
            search_lr(stage, model, optimizer, LocalBackend(stage, model, optimizer), seed=3)
        )
    assert results[0].to_dict() == results[1].to_dict()
    result = results[0]
    assert len(result.candidates) == 5 and result.lr in result.candidates
    assert [t.rung for t in result.trials] == [0] * 5 + [1] * 2
    assert result.samples == 75 * 16 and result.eval_samples == 64 * 8
    assert not result.fallback


def test_held_out_slice_is_disjoint_from_the_search_batches_and_seeded() -> None:
    config = auto_config()
    config["stages"][1]["data"] = [
        {"builtin": "parity", "name": "a", "args": {"n_bits": 8, "k": 2, "size": 400}, "weight": 3},
        {"builtin": "parity", "name": "b", "args": {"n_bits": 8, "k": 2, "size": 200, "bias": 0.7}},
    ]
    stage = Curriculum(parse_config(config)).stages[1]
    cfg = stage.config.optimizer.search  # type: ignore[union-attr]
    data, again = SearchData(stage, cfg, 3, 30), SearchData(stage, cfg, 3, 30)
    held = set(data.holdout.tolist())
    assert len(held) == 64 and np.array_equal(data.holdout, again.holdout)
    assert sum(i >= 400 for i in held) == 16  # the mixture's share (1/4) of source b
    drawn = np.concatenate([data.batch(t) for t in range(30)])
    assert not held & set(drawn.tolist())
    assert drawn.min() >= 0 and drawn.max() < 600 and len(drawn) == 30 * 16
    other = SearchData(stage, cfg, 4, 30)  # another seed: another held-out slice
    assert not np.array_equal(other.holdout, data.holdout)


def quadratic_stage(curvatures: list[float], **auto: Any) -> tuple[Any, torch.nn.Module, Any]:
    from helpers_lr_search import linear, regression

    config = parse_config(
        {
            "name": "quadratic",
            "seed": 0,
            "batch_size": 256,
            "stages": [
                {
                    "name": "regression",
                    "duration": "300ba",
                    "data": "@regression",
                    "loss": "mse",
                    "optimizer": {"name": "sgd", "lr": "auto", "auto": {
                        "lr_min": 1e-4, "lr_max": 100.0, "range_steps": 50, "trial_steps": 10,
                        **auto}},
                }
            ],
        }
    )  # fmt: skip
    curriculum = Curriculum(config, datasets={"regression": regression(curvatures=curvatures)})
    torch.manual_seed(0)
    model = linear(features=len(curvatures))
    return curriculum.stages[0], model, curriculum


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_picks_the_known_optimal_sgd_lr_of_a_quadratic_within_a_factor_of_two(
    scale: float,
) -> None:
    """Linear regression without noise; the features have X^T X / n = diag(s) exactly, so
    the mean squared error's Hessian is H = 2 diag(s), with eigenvalues h_i = 2 s_i.
    Gradient descent at a constant LR eta shrinks the error along eigenvector i by
    |1 - eta h_i| per step; the LR that minimises the slowest rate, max_i |1 - eta h_i|,
    is eta* = 2 / (h_min + h_max) — the optimal constant LR for a long fixed budget
    (for this stage's 300 steps the exact minimiser of the final loss is within 0.2 %
    of it). We test the search against eta*, knowing divergence starts at 2 / h_max."""
    s = [0.25 * scale, 0.4 * scale, 0.7 * scale, 1.0 * scale]
    h = [2 * v for v in s]
    optimum = 2 / (min(h) + max(h))
    stage, model, _ = quadratic_stage(s)
    optimizer = enter_stage(stage.config, 0, model, None, trainable_flags(model))
    result = search_lr(stage, model, optimizer, LocalBackend(stage, model, optimizer), seed=0)
    assert optimum / 2 <= result.lr <= optimum * 2, (result.lr, optimum, result.candidates)
    assert result.lr < 2 / max(h)  # and it does not pick a diverging LR


def test_every_candidate_diverging_falls_back_to_the_smallest_with_a_warning(
    tmp_path: Path,
) -> None:
    # The range test starts at 100 (its pick: half its edge, >= 50, the candidates by a
    # factor 2 down to pick / 16 >= 3.1) on a quadratic whose divergence starts at
    # 2 / h_max = 1.
    _, model, curriculum = quadratic_stage(
        [0.25, 0.4, 0.7, 1.0], lr_min=100.0, lr_max=1000.0, range_steps=10, trial_steps=5,
        spread=2.0,
    )  # fmt: skip
    with pytest.raises(TrainingError, match="non-finite loss"):  # 2.5 diverges too, as found
        fit(model, curriculum, run_dir=tmp_path / "run", progress=False, tensorboard=False)
    search = records(tmp_path / "run", "lr_search")[0]
    assert search["fallback"] and search["lr"] == min(search["candidates"])
    assert all(t["diverged"] for t in search["trials"])
    (warning,) = records(tmp_path / "run", "warning")
    assert warning["source"] == "lr_search" and "every candidate LR diverged" in warning["detail"]


# --- in fit: recorded, bitwise, resumable --------------------------------------------------


def run(
    config: dict[str, Any], run_dir: Path, *, resume: bool = False, callbacks: Any = ()
) -> tuple[Any, torch.nn.Module]:
    curriculum = Curriculum(parse_config(config))
    model = curriculum.build_model()
    result = fit(
        model, curriculum, run_dir=run_dir, resume=resume, progress=False, tensorboard=False,
        callbacks=callbacks,
    )  # fmt: skip
    return result, model


def test_fit_records_the_choice_and_trains_exactly_as_with_that_lr_typed_in(
    tmp_path: Path,
) -> None:
    result, searched = run(auto_config(), tmp_path / "auto")
    chosen = result.state.lr_search["target"]
    (search,) = records(tmp_path / "auto", "lr_search")
    assert search["lr"] == chosen["lr"] and search["stage_step"] == 0
    assert len(search["trials"]) == 7 and all("score" in t for t in search["trials"])
    assert search["search_samples"] == chosen["samples"] == 75 * 16
    assert not chosen["counted"]
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["state"]["lr_search"]["target"]["lr"] == chosen["lr"]
    checkpoint = sorted((tmp_path / "auto" / "checkpoints").glob("ckpt-*.pt"))[-1]
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["state"]["lr_search"]["target"]["lr"] == chosen["lr"]
    trains = [r for r in records(tmp_path / "auto", "train") if r["stage"] == "target"]
    assert trains and all(r["lr"] == pytest.approx(chosen["lr"]) for r in trains)
    # The search put everything back: typing the chosen LR in trains bitwise alike.
    typed = auto_config()
    typed["stages"][1]["optimizer"] = {"name": "adamw", "lr": chosen["lr"]}
    _, fixed = run(typed, tmp_path / "typed")
    assert same(weights(searched), weights(fixed))


def test_count_budget_trains_the_stage_for_its_duration_minus_the_search(tmp_path: Path) -> None:
    result, _ = run(auto_config(count_budget=True), tmp_path / "run")
    assert result.state.lr_search["target"]["counted"] is True
    assert result.state.step == 30 + 120 - 75
    assert 0 < result.state.lr_search["target"]["eval_samples"] <= 512  # as plan says, at most
    # The stage's end says where its duration went (it trained 45 steps, not 120).
    end = next(r for r in records(tmp_path / "run", "stage_end") if r["stage"] == "target")
    assert end["detail"] == "reached its duration 120ba: 75 search steps (counted) + 45 trained"


class CountSearches:
    """Counts the searches started and the training steps they ran (a monkeypatch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.searches = self.steps = 0
        original_search, original_step = lr_auto.search_lr, lr_auto.EngineBackend.train_step

        def search(*args: Any, **kwargs: Any) -> Any:
            self.searches += 1
            return original_search(*args, **kwargs)

        def step(backend: Any, micro: Any) -> torch.Tensor:
            self.steps += 1
            return original_step(backend, micro)

        monkeypatch.setattr(lr_auto, "search_lr", search)
        monkeypatch.setattr(lr_auto.EngineBackend, "train_step", step)


def test_resume_mid_stage_keeps_the_recorded_lr_without_searching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, full = run(auto_config(), tmp_path / "full")
    run(auto_config(), tmp_path / "cut", callbacks=[StopAt(65)])  # checkpoint at step 60
    counter = CountSearches(monkeypatch)
    result, resumed = run(auto_config(), tmp_path / "cut", resume=True)
    assert counter.searches == 0
    assert same(weights(resumed), weights(full))
    assert (
        result.state.lr_search
        == json.loads((tmp_path / "full" / "summary.json").read_text())["state"]["lr_search"]
    )


def test_a_finished_search_is_not_run_again_when_no_checkpoint_followed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, full = run(auto_config(), tmp_path / "full")
    # Stopped after the search, before the stage's first checkpoint: resume starts from
    # the boundary checkpoint (stage step 0), where the stage's search belongs.
    run(auto_config(), tmp_path / "cut", callbacks=[StopAt(32)])
    counter = CountSearches(monkeypatch)
    _, resumed = run(auto_config(), tmp_path / "cut", resume=True)
    assert counter.searches == 1 and counter.steps == 0  # every unit reused
    assert same(weights(resumed), weights(full))
    (full_search,) = records(tmp_path / "full", "lr_search")
    (cut_search,) = records(tmp_path / "cut", "lr_search")
    assert without_time(cut_search) == without_time(full_search)


def test_a_changed_stage_start_does_not_reuse_an_old_search(tmp_path: Path) -> None:
    run(auto_config(), tmp_path / "run", callbacks=[StopAt(32)])
    cache = tmp_path / "run" / "checkpoints" / "lr_search-1.json"
    data = json.loads(cache.read_text())
    assert set(data["units"]) >= {"start", "range"}
    data["key"] = "another starting point"
    cache.write_text(json.dumps(data))
    result, _ = run(auto_config(), tmp_path / "run", resume=True)
    assert json.loads(cache.read_text())["key"] != "another starting point"  # searched anew
    assert result.state.lr_search["target"]["steps"] == 75


@pytest.mark.slow
def test_kill_9_during_the_search_then_resume_makes_the_same_choice(tmp_path: Path) -> None:
    """SIGKILL at a training forward inside the search's trials (after the range test and
    two trials finished); --resume reuses them and ends with the uninterrupted weights."""
    config = auto_config()
    # 30 first-stage forwards, 30 range-test forwards, then trials of 5 steps each.
    config["model"] = {
        "factory": "helpers_lr_search:mlp_killed_at_forward",
        "args": {"at": 30 + 30 + 12, "in_features": 8, "hidden": [16], "out_features": 2},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "stagetrain.cli", "run", str(path), "--no-progress"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    subprocess.run(
        [*cli, "--run-dir", str(tmp_path / "full")], check=True, env=env, capture_output=True,
        timeout=300,
    )  # fmt: skip
    killed = subprocess.run(
        [*cli, "--run-dir", str(tmp_path / "cut")], env={**env, "STAGETRAIN_TEST_KILL": "1"},
        capture_output=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "summary.json").exists()
    units = json.loads((tmp_path / "cut" / "checkpoints" / "lr_search-1.json").read_text())
    assert len(units["units"]) == 4  # start, range test, two trials
    started = time.time()
    resumed = subprocess.run(
        [*cli, "--run-dir", str(tmp_path / "cut"), "--resume"], check=True, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "reused 4 finished units" in resumed.stdout + resumed.stderr, time.time() - started
    (full_search,) = records(tmp_path / "full", "lr_search")
    (cut_search,) = records(tmp_path / "cut", "lr_search")
    assert without_time(cut_search) == without_time(full_search)
    last = sorted((tmp_path / "full" / "checkpoints").glob("ckpt-*.pt"))[-1].name
    full = torch.load(tmp_path / "full" / "checkpoints" / last, weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / last, weights_only=True)
    assert same(full["model"], cut["model"])


# --- lr-find -----------------------------------------------------------------------------------


def test_lr_find_writes_the_plot_and_the_scores(tmp_path: Path) -> None:
    from stagetrain.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(auto_config()))
    assert main(["lr-find", str(config), "--stage", "target", "--out", str(tmp_path / "o")]) == 0
    png = tmp_path / "o" / "lr-find-target.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((tmp_path / "o" / "lr-find-target.json").read_text())
    assert scores["start"] == "the model's initial weights" and len(scores["trials"]) == 7
    # From a run's boundary checkpoint: the stage's real starting point, and the choice the
    # run itself made there.
    kept = {**auto_config(), "checkpoint": {"every": "50ba", "keep": 10}}
    result, _ = run(kept, tmp_path / "run")
    out = tmp_path / "from-run"
    argv = ["lr-find", str(config), "--stage", "target", "--out", str(out)]
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 0
    scores = json.loads((out / "lr-find-target.json").read_text())
    assert scores["start"].endswith("(stage step 0)")
    assert scores["lr"] == result.state.lr_search["target"]["lr"]
    assert main(["lr-find", str(config), "--stage", "nope"]) == 2


# --- two ranks -------------------------------------------------------------------------------

AGREE_PROBE = """
import json, sys
import stagetrain
from stagetrain.distributed import init_from_env
info = init_from_env()
curriculum = stagetrain.Curriculum.from_file(sys.argv[1])
model = curriculum.build_model()
result = stagetrain.fit(model, curriculum, run_dir=sys.argv[2] + "/run", progress=False,
                        tensorboard=False)
out = {"state": result.state.lr_search, "auto_lr": curriculum.stages[1].auto_lr,
       "weights": {k: v.tolist() for k, v in model.state_dict().items()}}
json.dump(out, open(f"{sys.argv[2]}/rank{info.rank}.json", "w"))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_search_together_and_agree(tmp_path: Path) -> None:
    from test_distributed import torchrun

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(auto_config()))
    (tmp_path / "probe.py").write_text(AGREE_PROBE)
    torchrun([str(tmp_path / "probe.py"), str(path), str(tmp_path)])
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0["state"] == rank1["state"] and rank0["auto_lr"] == rank1["auto_lr"]
    assert rank0["weights"] == rank1["weights"]  # trained alike with it
    (search,) = records(tmp_path / "run", "lr_search")  # rank 0's log
    assert search["lr"] == rank0["auto_lr"] == rank0["state"]["target"]["lr"]
    assert len(search["trials"]) == 7 and search["search_samples"] == 75 * 16


class _Recorder(LocalBackend):
    """Rank 0 of a pretend pair: records what it broadcasts."""

    sent: list[Any]

    def broadcast(self, obj: Any) -> Any:
        self.sent.append(obj)
        return obj


class _Follower(LocalBackend):
    """Rank 1 of the pair: receives rank 0's objects, whatever it computed itself."""

    received: list[Any]

    def broadcast(self, obj: Any) -> Any:
        return self.received.pop(0)


def test_rank_zero_decides_whatever_another_rank_computed() -> None:
    stage, model, optimizer = stage_start(auto_config())
    leader = _Recorder(stage, model, optimizer)
    leader.sent = []
    chosen = search_lr(stage, model, optimizer, leader, seed=3)
    follower = _Follower(stage, model, optimizer)
    follower.received = list(leader.sent)
    # Another seed: another held-out slice and other scores on this "rank".
    other = search_lr(stage, model, optimizer, follower, seed=4)
    assert other.to_dict() == chosen.to_dict()


def test_a_diverging_tail_does_not_hide_the_range_tests_minimum() -> None:
    """A flat, noisy loss, a dip near 0.1 and a blow-up to 10x (noisy-digits' first range
    test): the edge is the dip. Smoothing backwards used to carry the tail's huge values
    into the dip, so the edge fell on the very first LR."""
    from stagetrain.config import AutoLRConfig
    from stagetrain.lr_search import pick_lr

    lrs = [1e-6 * 2.07**i for i in range(20)]
    losses = [2.29, 2.30, 2.28, 2.29, 2.33, 2.28, 2.30, 2.31, 2.32, 2.28,
              2.25, 2.25, 2.23, 2.14, 1.95, 1.76, 1.19, 2.05, 7.42, 25.2]  # fmt: skip
    pick, edge, _ = pick_lr(lrs, losses, AutoLRConfig())
    assert edge is not None and lrs[14] <= edge <= lrs[16]
    assert pick == pytest.approx(AutoLRConfig().fraction * edge)


def test_on_a_plateau_the_edge_is_where_the_loss_starts_to_rise() -> None:
    """Parity's loss stays at ln 2 (+-3 % noise) until the LR is too large: the minimum is
    noise, so the edge is the divergence point, the last LR before the rise."""
    from stagetrain.config import AutoLRConfig
    from stagetrain.lr_search import pick_lr

    rng = np.random.default_rng(0)
    lrs = [1e-6 * 1.6**i for i in range(28)]
    losses = [*(0.69 + 0.02 * rng.standard_normal(24)), 0.88, 3.39, 1.53, 14.3]
    _, edge, _ = pick_lr(lrs, losses, AutoLRConfig())
    assert edge in (lrs[22], lrs[23])


@pytest.mark.parametrize("seed", range(6))
def test_on_a_noisy_plateau_an_early_excursion_is_not_the_divergence_point(seed: int) -> None:
    """A per-batch loss with 15 % noise (small batches of noisy labels) stays flat for 80
    LRs, then rises for good: the edge is where it leaves the plateau, not where noise
    first crossed the threshold (which put it at the first LRs on the development set's
    noisy-label stage), nor where noise made the smoothed curve dip. (The moving average
    lags the rise by a step or two: at most 1.15^3 = 1.5x in LR.)"""
    from stagetrain.config import AutoLRConfig
    from stagetrain.lr_search import pick_lr

    rng = np.random.default_rng(seed)
    lrs = [1e-6 * 1.15**i for i in range(90)]
    losses = [*(1.7 + 0.25 * rng.standard_normal(80)), 2.0, 2.2, 2.6, 3.0, 3.5, 4.5, 6, 8, 10, 14]
    _, edge, _ = pick_lr(lrs, losses, AutoLRConfig())
    assert edge is not None and lrs[75] <= edge <= lrs[83], (edge, lrs.index(edge))

"""Gradient accumulation, autocast, torch.compile, DataLoader workers, and no per-step read-back."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_for_tests import StopAt

from stagetrain import Curriculum, fit, parse_config
from stagetrain.train import meter as meter_module
from stagetrain.train import runner as runner_module
from stagetrain.train import step as step_module


def train(config: dict[str, Any], run_dir: Path, **overrides: Any) -> torch.nn.Module:
    config = {**config, **overrides}
    curriculum = Curriculum(parse_config(config), progress=False)
    model = curriculum.build_model()
    fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False)
    return model


def test_gradient_accumulation_matches_the_full_batch(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    full = train(tiny_config, tmp_path / "a")
    for stage in tiny_config["stages"]:
        stage["grad_accum"] = 4  # 16 samples per step as 4 micro-batches of 4
    accumulated = train(tiny_config, tmp_path / "b")
    for (name, a), b in zip(
        full.state_dict().items(), accumulated.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_data_workers_keep_the_exact_order(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    plain = train(tiny_config, tmp_path / "a")
    workers = train(tiny_config, tmp_path / "b", data_workers=2, pin_memory=False)
    for a, b in zip(plain.state_dict().values(), workers.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bf16_autocast_trains(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    model = train(tiny_config, tmp_path / "a", precision="bf16")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


def test_run_options_do_not_change_the_fingerprint(tiny_config: dict[str, Any]) -> None:
    base = parse_config(tiny_config).fingerprint()
    assert (
        parse_config(
            {**tiny_config, "precision": "bf16", "data_workers": 2, "compile": True}
        ).fingerprint()
        == base
    )


def test_step_path_reads_nothing_back_from_the_device() -> None:
    # The loss is read back only in log_train and the guard's flush (logging / evaluation /
    # checkpoint intervals); the per-step code must not call .item(), float() or .cpu().
    for fn in (
        runner_module.Runner.train_stage,
        step_module.StepRunner.forward_backward,
        step_module.StepRunner.update,
        meter_module.IntervalMeter.add,
    ):
        source = inspect.getsource(fn)
        for forbidden in (".item(", "float(", ".cpu(", ".tolist(", "bool("):
            assert forbidden not in source, (fn.__name__, forbidden)


def test_read_backs_happen_only_at_logging_intervals(
    tmp_path: Path, tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stagetrain.train.guards import NonFiniteGuard

    calls = {"log": 0, "check": 0}
    original_log, original_check = runner_module.Runner.log_train, NonFiniteGuard.flush

    def counting_log(self: Any, *args: Any) -> None:
        calls["log"] += 1
        original_log(self, *args)

    def counting_check(self: Any, *args: Any) -> None:
        calls["check"] += 1
        original_check(self, *args)

    monkeypatch.setattr(runner_module.Runner, "log_train", counting_log)
    monkeypatch.setattr(NonFiniteGuard, "flush", counting_check)
    tiny_config["log_every"] = 10
    tiny_config["checkpoint"] = {"every": None, "keep": 1}
    train(tiny_config, tmp_path / "a")
    assert calls["log"] == 7  # steps 10, 20, ..., 70 of 70
    # Each log (7), each evaluation (steps 20, 40, 60 and both stage ends: 5), each stage
    # end (2) and each checkpoint (the two stage ends: 2) -- never once per step.
    assert calls["check"] == 7 + 5 + 2 + 2


@pytest.mark.slow
def test_torch_compile_trains(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    for stage in tiny_config["stages"]:
        stage["duration"] = "3ba"
    model = train(tiny_config, tmp_path / "a", compile=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_with_gradient_scaler_resumes_exactly(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    tiny_config["precision"] = "fp16"
    full = train(tiny_config, tmp_path / "full")
    curriculum = Curriculum(parse_config(tiny_config), progress=False)
    fit(
        curriculum.build_model(),
        curriculum,
        run_dir=tmp_path / "cut",
        progress=False,
        tensorboard=False,
        callbacks=[StopAt(45)],
    )
    checkpoint = torch.load(
        sorted((tmp_path / "cut" / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True
    )
    assert "scale" in checkpoint["scaler"]
    resumed = curriculum.build_model()
    fit(
        resumed,
        curriculum,
        run_dir=tmp_path / "cut",
        progress=False,
        tensorboard=False,
        resume=True,
    )
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)

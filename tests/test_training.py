"""The loop end to end: exact resume, hand-off modes, frozen parameters, logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers_for_tests import StopAt

from stagetrain import CheckpointError, Curriculum, fit, parse_config
from stagetrain.logs import read_records


def run(config: dict[str, Any], run_dir: Path, **kwargs: Any):
    curriculum = Curriculum(parse_config(config))
    model = curriculum.build_model()
    result = fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False, **kwargs)
    return model, result


def losses(run_dir: Path) -> list[tuple[int, str, int, float]]:
    return [
        (r["step"], r["stage"], r["stage_step"], r["loss"])
        for r in read_records(run_dir / "metrics.jsonl")
        if r["type"] == "train"
    ]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_records_carry_step_stage_and_loss(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    _, result = run(tiny_config, tmp_path / "r")
    records = read_records(tmp_path / "r" / "metrics.jsonl")
    assert all({"step", "stage", "stage_step"} <= r.keys() for r in records)
    train = [r for r in records if r["type"] == "train"]
    assert train and all("loss" in r and "lr" in r for r in train)
    starts = [(r["stage"], r["step"]) for r in records if r["type"] == "stage_start"]
    assert starts == [("easy", 0), ("target", 30)]
    assert result.state.step == 70 and result.state.samples == 70 * 16
    assert "accuracy" in result.metrics["test"]
    assert (tmp_path / "r" / "summary.json").exists() and (tmp_path / "r" / "config.yaml").exists()


def test_resume_mid_stage_two_is_bitwise_identical(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    full_model, _ = run(tiny_config, tmp_path / "full")
    # Stop at step 55 (mid stage 2); the newest checkpoint is at step 50.
    run(tiny_config, tmp_path / "cut", callbacks=[StopAt(55)])
    resumed_model, result = run(tiny_config, tmp_path / "cut", resume=True)
    assert result.state.step == 70
    assert_same_weights(full_model, resumed_model)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


# Wall-clock fields of a train record: the only ones a resumed run may log differently.
TIMED = {"time", "samples_per_s", "step_time", "tokens_per_s", "padded_tokens_per_s"}


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if k not in TIMED}
        for r in read_records(run_dir / "metrics.jsonl")
        if r["type"] == "train"
    ]


@pytest.mark.parametrize(
    ("stop", "checkpoint_every"),
    [(StopAt(53, checkpoint=True), "10ba"), (StopAt(57), "7ba")],
    ids=["stop-checkpoint-at-53", "checkpoint-at-56"],
)
def test_resume_from_a_step_between_logs_gives_the_same_loss_log(
    tmp_path: Path, tiny_config: dict[str, Any], stop: StopAt, checkpoint_every: str
) -> None:
    # Logs every 5 steps; the checkpoint resumed from (53, or 56) is inside an interval:
    # the records after it must still average every step of their interval.
    tiny_config["checkpoint"] = {"every": checkpoint_every, "keep": 3}
    tiny_config["stages"][1]["loss"] = [
        {"name": "cross_entropy"},
        {"name": "hinge", "weight": 0.5},
    ]  # two terms: their sums are carried too
    full_model, _ = run(tiny_config, tmp_path / "full")
    run(tiny_config, tmp_path / "cut", callbacks=[stop])
    resumed_model, _ = run(tiny_config, tmp_path / "cut", resume=True)
    assert_same_weights(full_model, resumed_model)
    got, want = train_records(tmp_path / "cut"), train_records(tmp_path / "full")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert "loss/hinge" in want[-1]
    for a, b in zip(got, want, strict=True):
        assert a == b, a["step"]


def test_resume_from_stage_boundary_checkpoint(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["checkpoint"] = {"every": None, "keep": 2}  # only stage-end checkpoints
    tiny_config["stages"][1]["handoff"] = "reset"
    full_model, _ = run(tiny_config, tmp_path / "full")
    run(tiny_config, tmp_path / "cut", callbacks=[StopAt(45)])  # newest checkpoint: end of stage 1
    resumed_model, _ = run(tiny_config, tmp_path / "cut", resume=True)
    assert_same_weights(full_model, resumed_model)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_resume_refuses_a_changed_curriculum(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    run(tiny_config, tmp_path / "r", callbacks=[StopAt(55)])
    tiny_config["stages"][1]["duration"] = "60ba"
    tiny_config["seed"] = 4
    with pytest.raises(CheckpointError) as info:
        run(tiny_config, tmp_path / "r", resume=True)
    message = str(info.value)
    assert "stages[1].duration: '40ba' -> '60ba'" in message and "seed: 3 -> 4" in message
    _, result = run(tiny_config, tmp_path / "r", resume=True, on_change="keep-position")
    assert result.state.step == 30 + 60  # resumed at stage step 20, ran to the new 60-step end


def test_resume_without_checkpoint(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        run(tiny_config, tmp_path / "empty", resume=True)


def _adam_state(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(s["step"]) for s in optimizer.state.values()]


class _Spy:
    """Records the optimizer object and its state at each stage start."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[float]]] = []

    def on_stage_start(self, run: Any) -> None:
        self.seen.append((id(run.optimizer), _adam_state(run.optimizer)))


@pytest.mark.parametrize(
    ("handoff", "same_optimizer", "state_kept", "warmup_restarts"),
    [("carry", True, True, False), ("rewarm", True, True, True), ("reset", False, False, True)],
)
def test_handoff_modes(
    tmp_path: Path,
    tiny_config: dict[str, Any],
    handoff: str,
    same_optimizer: bool,
    state_kept: bool,
    warmup_restarts: bool,
) -> None:
    tiny_config["stages"][1]["handoff"] = handoff
    spy = _Spy()
    run(tiny_config, tmp_path / handoff, callbacks=[spy])
    (first_id, _), (second_id, second_state) = spy.seen
    assert (first_id == second_id) is same_optimizer
    # Adam's per-parameter step count: 30 after stage 1 when kept, empty when reset.
    assert (second_state == [30.0] * len(second_state) and len(second_state) > 0) is state_kept
    lrs = {
        r["stage_step"]: r["lr"]
        for r in read_records(tmp_path / handoff / "metrics.jsonl")
        if r["type"] == "train" and r["stage"] == "target"
    }
    # warmup is 5 steps: at stage step 5 the recorded LR is that of step 4, i.e. 0.8 * lr
    assert (lrs[5] == pytest.approx(0.008)) is warmup_restarts
    if not warmup_restarts:
        assert lrs[5] == pytest.approx(0.01)


def test_frozen_parameters_do_not_change(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][1]["freeze"] = ["1.*"]  # the first Linear layer of the MLP
    snapshots: dict[str, dict[str, torch.Tensor]] = {}

    class Snap:
        def on_stage_start(self, run: Any) -> None:
            snapshots[run.stage.name] = {k: v.clone() for k, v in run.model.state_dict().items()}

    model, _ = run(tiny_config, tmp_path / "r", callbacks=[Snap()])
    at_stage_two = snapshots["target"]
    assert torch.equal(model.state_dict()["1.weight"], at_stage_two["1.weight"])
    assert torch.equal(model.state_dict()["1.bias"], at_stage_two["1.bias"])
    assert not torch.equal(model.state_dict()["3.weight"], at_stage_two["3.weight"])
    assert not torch.equal(
        at_stage_two["1.weight"], snapshots["easy"]["1.weight"]
    )  # trained in stage 1


def test_freeze_pattern_matching_nothing_is_an_error(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    from stagetrain import ConfigError

    tiny_config["stages"][1]["freeze"] = ["encoder.*"]
    with pytest.raises(
        ConfigError, match=r"stages\[1\]\.freeze\[0\]: pattern 'encoder.\*' matches no parameter"
    ):
        run(tiny_config, tmp_path / "r")


def test_unwritable_run_dir_fails_before_training(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    from stagetrain import StageTrainError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StageTrainError, match="run directory is not writable"):
        run(tiny_config, blocker / "run")


def test_own_loop_example_runs(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config))
    example = Path(__file__).parent.parent / "examples" / "own_loop.py"
    out = subprocess.run(
        [sys.executable, str(example), str(config_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "step 0: entering stage 'easy'" in out and "step 30: entering stage 'target'" in out
    assert "final test accuracy" in out


@pytest.mark.slow
def test_kill_9_during_stage_two_then_resume(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    """The CLI process is SIGKILLed mid stage 2; --resume reaches the uninterrupted weights."""
    tiny_config["stages"][1]["duration"] = "3000ba"  # long enough to be killed mid-stage
    tiny_config["checkpoint"] = {"every": "100ba", "keep": 2}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config))
    cli = [sys.executable, "-m", "stagetrain.cli", "run", str(config_path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [*cli, "--run-dir", str(tmp_path / "full")],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )

    proc = subprocess.Popen(
        [*cli, "--run-dir", str(tmp_path / "cut")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and any(
            r.get("stage") == "target" and r["step"] >= 1000 for r in read_records(log)
        ):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "summary.json").exists()
    subprocess.run(
        [*cli, "--run-dir", str(tmp_path / "cut"), "--resume"],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )

    full = torch.load(tmp_path / "full" / "checkpoints" / "ckpt-00003030.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "ckpt-00003030.pt", weights_only=True)
    for key in full["model"]:
        assert torch.equal(full["model"][key], cut["model"][key]), key
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_meter_restores_a_partial_interval_from_any_checkpoint() -> None:
    from stagetrain.distributed import DistInfo
    from stagetrain.state import TrainState
    from stagetrain.train.engine import TorchEngine
    from stagetrain.train.meter import IntervalMeter, partials
    from stagetrain.train.step import StepResult

    meter = IntervalMeter(TorchEngine(DistInfo(), torch.device("cpu")))
    for value in (1.0, 2.0):
        meter.add(StepResult(torch.tensor(value), {}, None, 0), 4)
    saved = partials(7, [meter.partial()])
    meter.restore(None, 7)  # a checkpoint written before checkpoints carried the interval
    assert meter.steps == 0 and meter.loss is None
    meter.restore(saved, 5)  # a restart-stage resume rewound the step: not this interval
    assert meter.steps == 0
    meter.restore(saved, 7)
    meter.add(StepResult(torch.tensor(3.0), {}, None, 0), 4)
    fields = meter.fields(TrainState(samples=12), 0.1, None)
    assert fields["loss"] == 2.0 and meter.steps == 0
    # Saved by 2 ranks (sums 3 and 5 over the same 2 steps), resumed on 1: their mean.
    other = {**saved["ranks"][0], "loss": [5.0, "float32"]}
    meter.restore(partials(7, [saved["ranks"][0], other]), 7)
    assert meter.steps == 2 and meter.samples == 8
    assert meter.fields(TrainState(samples=8), 0.1, None)["loss"] == 2.0

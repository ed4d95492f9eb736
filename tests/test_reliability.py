"""Reliability: kills at the worst moments, NaN policies, damaged and hostile checkpoints,
unwritable or full run directories, resume guard, and fuzzed configs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helpers_for_tests
import pytest
import torch
import yaml
from conftest import tiny_config_dict
from helpers_for_tests import StopAt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagetrain import (
    CheckpointError,
    Curriculum,
    StageTrainError,
    TrainingError,
    fit,
    load_checkpoint,
    parse_config,
)
from stagetrain.checkpoint import CheckpointStore
from stagetrain.logs import read_records

NAN_LOSS = "helpers_for_tests:cross_entropy_with_nans"


def run(config: dict[str, Any], run_dir: Path, **kwargs: Any):
    curriculum = Curriculum(parse_config(config))
    model = curriculum.build_model()
    result = fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False, **kwargs)
    return model, result


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# --- kills -------------------------------------------------------------------------------

KILLER = """
import os, signal, sys, io
import torch, yaml
torch.set_num_threads(1)
import stagetrain, stagetrain.checkpoint as ck
config = stagetrain.parse_config(yaml.safe_load(open(sys.argv[1])))
mode = sys.argv[3]
saves = {"n": 0}
real_save = torch.save

def torn_save(obj, f):
    saves["n"] += 1
    if saves["n"] == 3:  # die half-way through writing the third checkpoint
        buffer = io.BytesIO(); real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f)

class KillAtBoundary:
    def on_checkpoint(self, run, path):
        if run.state.stage_index == 1 and run.state.stage_step == 0:
            os.kill(os.getpid(), signal.SIGKILL)

callbacks = []
if mode == "mid-write":
    ck.torch.save = torn_save
else:
    callbacks = [KillAtBoundary()]
curriculum = stagetrain.Curriculum(config)
stagetrain.fit(curriculum.build_model(), curriculum, run_dir=sys.argv[2], progress=False,
               tensorboard=False, callbacks=callbacks)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mid-write", "boundary"])
def test_kill_9_at_the_worst_moments(tmp_path: Path, mode: str) -> None:
    config = tiny_config_dict()
    full_model, _ = run(config, tmp_path / "full")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "killer.py").write_text(KILLER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "c.yaml"), str(tmp_path / "cut"), mode],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    store = CheckpointStore(tmp_path / "cut" / "checkpoints")
    steps = [e.step for e in store.entries()]
    if mode == "mid-write":
        assert steps == [10, 20]  # the torn third checkpoint never reached the manifest
        assert list((tmp_path / "cut" / "checkpoints").glob(".ckpt-*.tmp"))  # the torn file
    else:
        assert steps[-1] == 30 and store.load_latest()[0]["state"]["stage_index"] == 1
    resumed, result = run(config, tmp_path / "cut", resume=True)
    assert result.state.step == 70
    assert same_weights(full_model, resumed)


def test_damaged_newest_checkpoint_falls_back(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    full_model, _ = run(tiny_config, tmp_path / "full")
    run(
        tiny_config, tmp_path / "cut", callbacks=[StopAt(55)]
    )  # checkpoints at 30 (boundary), 40, 50
    newest = tmp_path / "cut" / "checkpoints" / "ckpt-00000050.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(
        UserWarning,
        match=r"ckpt-00000050\.pt: checksum mismatch.*resuming from .*ckpt-00000040\.pt",
    ):
        resumed, _ = run(tiny_config, tmp_path / "cut", resume=True)
    assert same_weights(full_model, resumed)


def test_no_intact_checkpoint(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    run(tiny_config, tmp_path / "cut", callbacks=[StopAt(25)])
    for path in (tmp_path / "cut" / "checkpoints").glob("ckpt-*.pt"):
        path.write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        run(tiny_config, tmp_path / "cut", resume=True)


def test_keep_last_k(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["checkpoint"] = {"every": "5ba", "keep": 2}
    run(tiny_config, tmp_path / "r")
    files = sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("ckpt-*.pt"))
    assert files == ["ckpt-00000065.pt", "ckpt-00000070.pt"]
    assert [e.file for e in CheckpointStore(tmp_path / "r" / "checkpoints").entries()] == files


# --- hostile checkpoints -------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": _Payload(str(marker))}, evil)
    with pytest.raises(
        CheckpointError, match=r"refused: the file asks to import .*system, which could run code"
    ):
        load_checkpoint(evil)
    # The same file slipped into a run directory, checksum and all, is refused on resume.
    run(tiny_config, tmp_path / "r", callbacks=[StopAt(15)])
    store = CheckpointStore(tmp_path / "r" / "checkpoints")
    newest = tmp_path / "r" / "checkpoints" / store.entries()[-1].file
    shutil.copy(evil, newest)
    manifest = json.loads(store.manifest_path.read_text())
    from stagetrain.checkpoint import sha256_file

    manifest["checkpoints"][-1]["sha256"] = sha256_file(newest)
    store.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refused"):
        run(tiny_config, tmp_path / "r", resume=True)
    assert not marker.exists()


def test_raw_pickle_is_not_a_checkpoint(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="not a torch zip archive"):
        load_checkpoint(path)
    assert not marker.exists()


# --- run directory ------------------------------------------------------------------------


def test_full_disk_is_refused_before_training(
    tmp_path: Path, tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1024))
    with pytest.raises(
        StageTrainError, match=r"only 0\.0 MiB free, but the checkpoints need about"
    ):
        run(tiny_config, tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_write_failure_keeps_previous_checkpoint(
    tmp_path: Path, tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import stagetrain.checkpoint as ck

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj: Any, f: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(
        CheckpointError,
        match=r"step 20: .*ckpt-00000020\.pt: cannot write \(No space left on device\); the previous checkpoints in .* are intact",
    ):
        run(tiny_config, tmp_path / "r")
    monkeypatch.setattr(ck.torch, "save", real_save)
    directory = tmp_path / "r" / "checkpoints"
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []  # temp removed
    payload, entry = CheckpointStore(directory).load_latest()
    assert entry.step == 10 and payload["state"]["step"] == 10
    _, result = run(tiny_config, tmp_path / "r", resume=True)
    assert result.state.step == 70


# --- non-finite losses --------------------------------------------------------------------


def nan_config(policy: str, **extra: Any) -> dict[str, Any]:
    config = tiny_config_dict()
    for stage in config["stages"]:
        stage["loss"] = NAN_LOSS
    config["nonfinite"] = {"policy": policy, **extra}
    return config


def test_nan_raises_naming_step_stage_and_term(tmp_path: Path) -> None:
    helpers_for_tests.inject_nans(steps={33})
    with pytest.raises(
        TrainingError,
        match=rf"non-finite loss at step 33 in stage 'target' \(stage step 3\); non-finite terms: \['{NAN_LOSS}'\]",
    ):
        run(nan_config("raise"), tmp_path / "r")
    # no checkpoint was written after the bad step
    assert CheckpointStore(tmp_path / "r" / "checkpoints").entries()[-1].step == 30


def test_nan_skip_policy(tmp_path: Path) -> None:
    helpers_for_tests.inject_nans(steps={12, 40})
    model, result = run(nan_config("skip"), tmp_path / "r")
    assert result.state.step == 70 and result.state.skipped == 2
    skips = [r for r in read_records(tmp_path / "r" / "metrics.jsonl") if r["type"] == "skip"]
    assert [(r["step"], r["stage"]) for r in skips] == [(12, "easy"), (40, "target")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_skip_limit(tmp_path: Path) -> None:
    helpers_for_tests.inject_nans(always_after=5)
    with pytest.raises(TrainingError, match="more than 3 consecutive batches skipped"):
        run(nan_config("skip", max_consecutive_skips=3), tmp_path / "r")


def test_nan_rollback_policy(tmp_path: Path) -> None:
    helpers_for_tests.inject_nans(steps={44})  # call 44 = step 44; checkpoint at 40
    _, result = run(nan_config("rollback"), tmp_path / "r")
    assert (
        result.state.step == 70
        and result.state.rollbacks == 1
        and result.state.rollback_lr_scale == 0.5
    )
    records = read_records(tmp_path / "r" / "metrics.jsonl")
    rollback = next(r for r in records if r["type"] == "rollback")
    assert (rollback["step"], rollback["to_step"]) == (44, 40)
    lrs = [r["lr"] for r in records if r["type"] == "train" and r["step"] > 45]
    assert lrs and all(lr == pytest.approx(0.005) for lr in lrs)  # 0.01 x 0.5


def test_nan_rollback_without_checkpoint(tmp_path: Path) -> None:
    helpers_for_tests.inject_nans(steps={3})
    with pytest.raises(TrainingError, match="no checkpoint to roll back to"):
        run(nan_config("rollback"), tmp_path / "r")


def test_grad_clip_bounds_the_update(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["optimizer"] = {"name": "sgd", "lr": 1.0, "grad_clip": 1e-3}
    tiny_config["stages"] = tiny_config["stages"][:1]
    tiny_config["stages"][0]["duration"] = "1ba"
    curriculum = Curriculum(parse_config(tiny_config))
    model = curriculum.build_model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    fit(model, curriculum, run_dir=tmp_path / "r", progress=False, tensorboard=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)  # lr 1 x clipped norm


# --- resume guard ---------------------------------------------------------------------------


def test_changed_data_is_detected(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    run(tiny_config, tmp_path / "r", callbacks=[StopAt(15)])
    tiny_config["stages"][0]["data"]["args"]["bias"] = 0.7
    tiny_config["stages"].append({**tiny_config["stages"][1], "name": "extra"})
    with pytest.raises(CheckpointError) as info:
        run(tiny_config, tmp_path / "r", resume=True)
    message = str(info.value)
    assert "stages[0].data.sources[0].args.bias: 0.8 -> 0.7" in message
    assert "stages: 2 entries -> 3" in message


# --- fuzzed configs ---------------------------------------------------------------------------

_BAD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 0), st.floats(allow_nan=True), st.text(max_size=6),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


_VALID = tiny_config_dict()
_PATHS = _paths(_VALID)


def _mutate(
    config: dict[str, Any], path: tuple[Any, ...], action: str, value: Any
) -> dict[str, Any]:
    parent: Any = config
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete" and isinstance(parent, dict):
        del parent[last]
    elif action == "unknown" and isinstance(parent, dict):
        parent[f"{last}_typo"] = value
    else:
        parent[last] = value
    return config


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    path=st.sampled_from(_PATHS),
    action=st.sampled_from(["replace", "delete", "unknown"]),
    value=_BAD_VALUES,
)
def test_fuzzed_configs_fail_cleanly(path: tuple[Any, ...], action: str, value: Any) -> None:
    config = _mutate(tiny_config_dict(), path, action, value)
    try:
        Curriculum(parse_config(config), progress=False)
    except StageTrainError as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert "Traceback" not in message
        # names the field: the message starts with its location, e.g. 'stages[0].duration: '
        assert re.match(r"^[A-Za-z_](?:[\w.-]|\[[^\]]*\])*: ", message), message
    # A mutation that leaves a valid config (e.g. deleting an optional field) is fine too.

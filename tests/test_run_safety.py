"""Run directories nothing can corrupt (issue 16), end to end through ``stagetrain run``:
the lock, a lost manifest, SIGTERM, keep-position checks, hostile environments, and a
fuzz over the CLI that asserts one-line errors and nothing touched outside the run."""

from __future__ import annotations

import copy
import hashlib
import json
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
from conftest import tiny_config_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagetrain.cli import main
from stagetrain.logs import read_records

TESTS = Path(__file__).parent


def write(tmp_path: Path, config: dict[str, Any], name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def env() -> dict[str, str]:
    path = f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "stagetrain.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=kwargs.pop("env", env()),
                          timeout=kwargs.pop("timeout", 300), **kwargs)  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("stagetrain: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def long_run(tmp_path: Path, steps: int = 3000, every: str = "100ba") -> Path:
    config = tiny_config_dict()
    config["stages"][1]["duration"] = f"{steps}ba"
    config["checkpoint"] = {"every": every, "keep": 2}
    return write(tmp_path, config)


def wait_for(log: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and any(r.get("step", 0) >= step for r in read_records(log)):
            return
        time.sleep(0.05)
    raise AssertionError(f"{log} never reached step {step}")


def stop_at(config: Path, run_dir: Path, step: int) -> None:
    """Train ``config`` into ``run_dir`` in a fresh process, stopped cleanly after ``step``
    (``helpers_for_tests.StopAt``)."""
    cut = subprocess.run(
        [sys.executable, "-c", (
            f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
            "from helpers_for_tests import StopAt\n"
            "import stagetrain\n"
            f"c = stagetrain.Curriculum.from_file({str(config)!r})\n"
            f"stagetrain.fit(c.build_model(), c, run_dir={str(run_dir)!r}, progress=False, callbacks=[StopAt({step})])"
        )],
        env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cut.returncode == 0, cut.stderr[-2000:]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"ckpt-{step:08d}.pt"
    return torch.load(path, weights_only=True)["model"]  # type: ignore[no-any-return]


# --- the lock ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_one_directory_is_refused_naming_the_first(tmp_path: Path) -> None:
    config = long_run(tmp_path)
    command = [sys.executable, "-m", "stagetrain.cli", "run", str(config),
               "--run-dir", str(tmp_path / "r"), "--no-progress"]  # fmt: skip
    first = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(tmp_path / "r" / "metrics.jsonl", 10)
        second = cli("run", str(config), "--run-dir", str(tmp_path / "r"), "--resume")
        line = one_line_error(second)
        assert f"pid {first.pid}" in line and "in use by another stagetrain process" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kill released the lock: the run resumes and completes
    resumed = cli("run", str(config), "--run-dir", str(tmp_path / "r"), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "r" / "summary.json").exists()


# --- a lost manifest, a finished run -----------------------------------------------------------


def test_auto_resume_without_a_manifest_continues_exactly(tmp_path: Path) -> None:
    config = tiny_config_dict()
    path = write(tmp_path, config)
    assert (
        cli("run", str(path), "--run-dir", str(tmp_path / "full"), "--no-progress").returncode == 0
    )
    stop = write(tmp_path, {**copy.deepcopy(config), "name": "tiny"}, "stop.yaml")
    # a run cut at step 45 (checkpoints at 10, 20, 30 (boundary), 40), manifest then lost
    stop_at(stop, tmp_path / "cut", 45)
    (tmp_path / "cut" / "checkpoints" / "manifest.json").unlink()
    resumed = cli("run", str(path), "--run-dir", str(tmp_path / "cut"), "--auto-resume",
                  "--no-progress")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 40" in resumed.stdout  # not a silent restart from step 0
    for key, value in weights(tmp_path / "full", 70).items():
        assert torch.equal(value, weights(tmp_path / "cut", 70)[key]), key


def test_resuming_a_finished_run_keeps_its_summary_byte_for_byte(tmp_path: Path) -> None:
    path = write(tmp_path, tiny_config_dict())
    assert cli("run", str(path), "--run-dir", str(tmp_path / "r"), "--no-progress").returncode == 0
    before = (tmp_path / "r" / "summary.json").read_bytes()
    again = cli("run", str(path), "--run-dir", str(tmp_path / "r"), "--resume", "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "r" / "summary.json").read_bytes() == before


# --- SIGTERM / SIGINT ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_writes_a_checkpoint_and_exits_with_its_code(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    # No scheduled checkpoint between the first stage's end (step 30) and the run's end
    # (430): any checkpoint in between can only be the one the signal wrote. (With one
    # every 100 steps, a signal landing on step 100 made the two indistinguishable.)
    config = long_run(tmp_path, steps=400, every="1000ba")
    run = ["run", str(config), "--no-progress"]
    assert cli(*run, "--run-dir", str(tmp_path / "full")).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagetrain.cli", *run, "--run-dir", str(tmp_path / "cut")],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(tmp_path / "cut" / "metrics.jsonl", 60)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and f"stopped by {sig.name}" in err
    state = json.loads(
        sorted((tmp_path / "cut" / "checkpoints").glob("ckpt-*.json"))[-1].read_text()
    )["state"]
    assert 60 <= state["step"] < 430, state
    assert f"stopped by {sig.name} at step {state['step']:,} " in err, err[-2000:]
    resumed = cli(*run, "--run-dir", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for key, value in weights(tmp_path / "full", 430).items():
        assert torch.equal(value, weights(tmp_path / "cut", 430)[key]), key


# --- keep-position checks before anything is written ---------------------------------------


@pytest.mark.parametrize("change", ["architecture", "optimizer"])
def test_keep_position_refuses_an_incompatible_change_before_writing(
    tmp_path: Path, change: str
) -> None:
    config = tiny_config_dict()
    path = write(tmp_path, config)
    stop_at(path, tmp_path / "r", 45)
    saved = (tmp_path / "r" / "config.yaml").read_bytes()
    changed = copy.deepcopy(config)
    if change == "architecture":
        changed["model"]["args"]["hidden"] = [24]
    else:
        for stage in changed["stages"]:
            stage.pop("optimizer", None)
        changed["stages"][0]["optimizer"] = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
    new = write(tmp_path, changed, "changed.yaml")
    proc = cli("run", str(new), "--run-dir", str(tmp_path / "r"), "--resume",
               "--on-change", "keep-position", "--no-progress")  # fmt: skip
    line = one_line_error(proc)
    assert ("shape" in line) if change == "architecture" else ("momentum" in line), line
    assert (tmp_path / "r" / "config.yaml").read_bytes() == saved


# --- the environment -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE"),
        ({"TORCHELASTIC_RESTART_COUNT": "x"}, "TORCHELASTIC_RESTART_COUNT"),
        ({"STAGETRAIN_DIST_TIMEOUT": "abc", "WORLD_SIZE": "1"}, "STAGETRAIN_DIST_TIMEOUT"),
    ],
)
def test_bad_launcher_variables_are_one_line(
    tmp_path: Path, variables: dict[str, str], named: str
) -> None:
    path = write(tmp_path, tiny_config_dict())
    started = time.time()
    proc = cli("run", str(path), "--run-dir", str(tmp_path / "r"), env={**env(), **variables})
    assert named in one_line_error(proc)
    assert time.time() - started < 60  # refused at once, not after a rendezvous timeout


def test_a_cache_in_proc_is_one_line(tmp_path: Path) -> None:
    config = tiny_config_dict()
    config["stages"][0]["data"]["difficulty"] = {"scorer": "length"}
    config["stages"][0]["data"]["select"] = {"easiest": 0.5}
    path = write(tmp_path, config)
    proc = cli("run", str(path), "--run-dir", str(tmp_path / "r"),
               env={**env(), "STAGETRAIN_CACHE": "/proc/stagetrain"})  # fmt: skip
    assert "STAGETRAIN_CACHE" in one_line_error(proc)


# --- a hostile manifest never reaches outside the run ----------------------------------------


def test_a_manifest_naming_files_outside_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    path = write(tmp_path, tiny_config_dict())
    assert cli("run", str(path), "--run-dir", str(tmp_path / "r"), "--no-progress").returncode == 0
    manifest = tmp_path / "r" / "checkpoints" / "manifest.json"
    data = json.loads(manifest.read_text())
    entry = dict(data["checkpoints"][0])
    data["checkpoints"] = [dict(entry, file=str(victim)), dict(entry, file="../../victim.txt"),
                           *data["checkpoints"]]  # fmt: skip
    manifest.write_text(json.dumps(data))
    (tmp_path / "r" / "summary.json").unlink()  # so that the resume trains and prunes
    proc = cli("run", str(path), "--run-dir", str(tmp_path / "r"), "--resume", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert victim.read_text() == "keep me"


# --- fuzz: run / plan / report / --resume on mutated inputs ----------------------------------


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


MUTATIONS = st.sampled_from(
    ["config-garbage", "config-binary", "config-field", "log-garbage", "log-empty",
     "manifest-garbage", "manifest-entry", "checkpoint-truncated", "checkpoint-dir",
     "sidecar-garbage"]
)  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-base")
    config = tiny_config_dict()
    config["stages"][0]["duration"] = "10ba"
    config["stages"][1]["duration"] = "10ba"
    path = write(root, config)
    assert main(["run", str(path), "--run-dir", str(root / "run"), "--no-progress"]) == 0
    return root


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(mutation=MUTATIONS, command=st.sampled_from(["run", "resume", "plan", "report"]))
def test_fuzzed_inputs_fail_in_one_line_and_touch_nothing_outside(
    finished_run: Path,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    mutation: str,
    command: str,
) -> None:
    import shutil

    work = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(finished_run, work, dirs_exist_ok=True)
    outside = work / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("untouched")
    before = _tree_digest(outside)
    run, config = work / "run", work / "c.yaml"
    (run / "summary.json").unlink()
    if mutation == "config-garbage":
        config.write_text("stages: [{name: 1, duration: }}")
    elif mutation == "config-binary":
        config.write_bytes(b"\xff\xfe\x00stages")
    elif mutation == "config-field":
        config.write_text(config.read_text().replace("duration: 10ba", "duration: 1e400ba", 1))
    elif mutation == "log-garbage":
        lines = (run / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    elif mutation == "log-empty":
        (run / "metrics.jsonl").write_text("")
    elif mutation == "manifest-garbage":
        (run / "checkpoints" / "manifest.json").write_text('{"checkpoints": 7}')
    elif mutation == "manifest-entry":
        data = json.loads((run / "checkpoints" / "manifest.json").read_text())
        data["checkpoints"].append({"file": "../outside/precious.txt", "step": 99, "stage": "x",
                                    "sha256": "0" * 64})  # fmt: skip
        (run / "checkpoints" / "manifest.json").write_text(json.dumps(data))
    elif mutation == "checkpoint-truncated":
        newest = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
        newest.write_bytes(newest.read_bytes()[:100])
    elif mutation == "checkpoint-dir":
        newest = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
        newest.unlink()
        newest.mkdir()
    else:
        for sidecar in (run / "checkpoints").glob("ckpt-*.json"):
            sidecar.write_text("[1, 2")
    argv = {
        "run": ["run", str(config), "--run-dir", str(work / "fresh"), "--no-progress"],
        "resume": ["run", str(config), "--run-dir", str(run), "--resume", "--no-progress"],
        "plan": ["plan", str(config)],
        "report": ["report", str(run)],
    }[command]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refusals
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code != 0:
        errors = [x for x in err.splitlines() if x.startswith("stagetrain: error:")]
        assert code == 2 and len(errors) == 1, err
    assert _tree_digest(outside) == before

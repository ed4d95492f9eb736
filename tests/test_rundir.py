"""Run directories: one process at a time (a real lock), and no run silently replaced.

The lock tests use real processes: a holder that takes the lock and waits, a second
process that is refused, and a kill -9 of the holder that releases it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from stagetrain.checkpoint import CheckpointStore
from stagetrain.errors import CheckpointError, RunDirError
from stagetrain.rundir import (
    LOCK_NAME,
    RunDirLock,
    decide_run_dir,
    open_run_dir,
    read_lock_holder,
)

HOLDER = textwrap.dedent(
    """
    import sys, time
    from stagetrain.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)

CONTENDER = textwrap.dedent(
    """
    import sys
    from stagetrain.errors import StageTrainError
    from stagetrain.rundir import RunDirLock
    try:
        with RunDirLock(sys.argv[1]):
            print("acquired")
    except StageTrainError as exc:
        print(f"stagetrain: error: {exc}", file=sys.stderr)
        sys.exit(2)
    """
)


def start_holder(run_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def contend(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CONTENDER, str(run_dir)], capture_output=True, text=True, timeout=60
    )


def test_a_second_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        refused = contend(run_dir)
        assert refused.returncode == 2, refused
        err = refused.stderr
        assert err.count("\n") == 1 and "Traceback" not in err
        assert (
            f"{run_dir}: in use by another stagetrain process (pid {holder.pid} on {socket.gethostname()}"
            in err
        )
        with pytest.raises(RunDirError, match=rf"pid {holder.pid} on "):
            RunDirLock(run_dir).acquire()  # this very process is refused too
        info = read_lock_holder(run_dir)
        assert info is not None and info["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_kill_9_of_the_holder_releases_the_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert read_lock_holder(run_dir)["pid"] == holder.pid  # the stale record stays...
    accepted = contend(run_dir)  # ...and blocks nobody
    assert accepted.returncode == 0 and accepted.stdout.strip() == "acquired", accepted
    with RunDirLock(run_dir):
        assert read_lock_holder(run_dir)["pid"] == os.getpid()


def test_release_lets_the_next_run_in(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lock = RunDirLock(run_dir)
    with lock:
        assert (run_dir / LOCK_NAME).is_file()
        with pytest.raises(RunDirError, match="in use by another stagetrain process"):
            RunDirLock(run_dir).acquire()
    with RunDirLock(run_dir):
        pass
    lock.acquire()  # the same object can be taken again
    lock.release()
    lock.release()  # and releasing twice is harmless


def test_a_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "target").write_text("precious")
    (run_dir / LOCK_NAME).symlink_to(tmp_path / "target")
    with pytest.raises(RunDirError, match="cannot lock"):
        RunDirLock(run_dir).acquire()
    assert (tmp_path / "target").read_text() == "precious"


def test_a_file_in_place_of_the_run_directory(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("x")
    with pytest.raises(RunDirError, match=r"run: not a directory"):
        RunDirLock(tmp_path / "run").acquire()


# --- fresh, resume or refuse ------------------------------------------------------------


def save(run_dir: Path, *steps: int) -> CheckpointStore:
    store = CheckpointStore(run_dir / "checkpoints")
    for step in steps:
        state = {"step": step, "stage_index": 0, "stage_step": step}
        store.save({"model": {"w": torch.zeros(1)}, "state": state}, step=step, stage="s")
    return store


def used(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "metrics.jsonl").write_text('{"type": "train", "step": 5}\n')
    return run_dir


@pytest.mark.parametrize("exists", [False, True])
def test_a_fresh_run_into_a_new_or_empty_directory(tmp_path: Path, exists: bool) -> None:
    run_dir = tmp_path / "run"
    if exists:
        run_dir.mkdir()
        (run_dir / LOCK_NAME).write_text("{}")  # the lock file alone does not count
    decision = decide_run_dir(run_dir, resume=False)
    assert decision.action == "fresh" and decision.moved_to is None


def test_a_fresh_run_into_a_used_directory_is_refused(tmp_path: Path) -> None:
    run_dir = used(tmp_path / "run")
    with pytest.raises(RunDirError) as info:
        decide_run_dir(run_dir, resume=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{run_dir}: not empty (holds config.yaml, metrics.jsonl)")
    assert "--resume" in message and "--auto-resume" in message and "--overwrite" in message
    assert (run_dir / "metrics.jsonl").read_text() == '{"type": "train", "step": 5}\n'


def test_overwrite_moves_the_old_run_aside(tmp_path: Path) -> None:
    run_dir = used(tmp_path / "run")
    save(run_dir, 10)
    first = decide_run_dir(run_dir, resume=False, overwrite=True)
    assert first.action == "fresh" and first.moved_to is not None
    assert first.moved_to.parent == run_dir and first.moved_to.name.startswith(".replaced-")
    assert (first.moved_to / "metrics.jsonl").read_text() == '{"type": "train", "step": 5}\n'
    assert (first.moved_to / "checkpoints" / "ckpt-00000010.pt").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == [first.moved_to.name]
    used(run_dir)
    second = decide_run_dir(run_dir, resume=False, overwrite=True)
    assert second.moved_to != first.moved_to and first.moved_to.is_dir()
    assert decide_run_dir(run_dir, resume=False).action == "fresh"  # moved-aside runs don't count


def test_other_files_neither_block_nor_move(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "slurm-123.out").write_text("job log\n")  # written by the scheduler first
    assert decide_run_dir(run_dir, resume=False).action == "fresh"
    used(run_dir)
    decision = decide_run_dir(run_dir, resume=False, overwrite=True)
    assert (run_dir / "slurm-123.out").read_text() == "job log\n"
    assert not (decision.moved_to / "slurm-123.out").exists()


def test_resume_with_a_checkpoint(tmp_path: Path) -> None:
    run_dir = used(tmp_path / "run")
    save(run_dir, 10, 20)
    for flags in ({"resume": True}, {"resume": False, "auto_resume": True}):
        decision = decide_run_dir(run_dir, **flags)
        assert decision.action == "resume" and decision.checkpoint is not None
        assert decision.checkpoint.step == 20


def test_auto_resume_after_the_manifest_was_deleted_is_not_a_restart(tmp_path: Path) -> None:
    run_dir = used(tmp_path / "run")
    save(run_dir, 10, 20, 30).manifest_path.unlink()
    decision = decide_run_dir(run_dir, resume=False, auto_resume=True)
    assert decision.action == "resume" and decision.checkpoint.step == 30


def test_resume_without_a_checkpoint(tmp_path: Path) -> None:
    run_dir = used(tmp_path / "run")
    with pytest.raises(
        CheckpointError,
        match=r"run: no checkpoint to resume from \(it holds config\.yaml, metrics\.jsonl\)",
    ):
        decide_run_dir(run_dir, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        decide_run_dir(tmp_path / "missing", resume=True)
    # --auto-resume: nothing to resume, so it starts again, keeping the old files aside
    decision = decide_run_dir(run_dir, resume=False, auto_resume=True)
    assert decision.action == "fresh" and (decision.moved_to / "metrics.jsonl").is_file()


def test_only_unloadable_checkpoint_files_are_never_a_silent_restart(tmp_path: Path) -> None:
    run_dir = used(tmp_path / "run")
    store = save(run_dir, 10)
    (store.directory / "ckpt-00000010.pt").write_bytes(b"torn")
    decision = decide_run_dir(run_dir, resume=False, auto_resume=True)
    assert decision.action == "resume"  # load_latest will then say why nothing loads
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        store.load_latest()


def finish(run_dir: Path, step: int, status: str = "completed") -> None:
    summary = {"status": status, "state": {"step": step, "stage_index": 1, "stage_step": 0}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_resuming_a_finished_run_is_a_no_op(tmp_path: Path) -> None:
    run_dir = used(tmp_path / "run")
    store = CheckpointStore(run_dir / "checkpoints")
    final = {"step": 30, "stage_index": 1, "stage_step": 0}
    store.save({"model": {}, "state": final}, step=30, stage="s")
    finish(run_dir, 30)
    before = (run_dir / "summary.json").read_bytes()
    for flags in ({"resume": True}, {"resume": False, "auto_resume": True}):
        decision = decide_run_dir(run_dir, **flags)
        assert decision.action == "finished" and decision.checkpoint.step == 30
        assert decision.summary is not None and decision.summary["status"] == "completed"
    assert (run_dir / "summary.json").read_bytes() == before


@pytest.mark.parametrize(
    "summary",
    [
        {"status": "completed", "state": {"step": 20, "stage_index": 1, "stage_step": 0}},
        {"status": "failed", "state": {"step": 30, "stage_index": 1, "stage_step": 0}},
        {"status": "completed"},
        "not json at all",
    ],
    ids=["older-summary", "not-completed", "no-state", "garbage"],
)
def test_a_summary_that_does_not_match_the_newest_checkpoint_resumes(
    tmp_path: Path, summary: object
) -> None:
    run_dir = used(tmp_path / "run")
    store = CheckpointStore(run_dir / "checkpoints")
    store.save(
        {"model": {}, "state": {"step": 30, "stage_index": 1, "stage_step": 0}}, step=30, stage="s"
    )
    (run_dir / "summary.json").write_text(
        summary if isinstance(summary, str) else json.dumps(summary)
    )
    assert decide_run_dir(run_dir, resume=True).action == "resume"


def test_resume_and_overwrite_contradict(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="--overwrite and --resume"):
        decide_run_dir(tmp_path, resume=True, overwrite=True)


def test_open_run_dir_holds_the_lock_and_cleans_temps(tmp_path: Path) -> None:
    run_dir = used(tmp_path / "run")
    save(run_dir, 10)
    orphan = run_dir / "checkpoints" / ".ckpt-00000020.pt.a1b2c3d4.tmp"
    orphan.write_bytes(b"torn")
    with open_run_dir(run_dir, resume=True) as decision:
        assert decision.action == "resume" and not orphan.exists()
        assert decision.removed_temps == [orphan]
        with pytest.raises(RunDirError, match="in use"):
            RunDirLock(run_dir).acquire()
    with RunDirLock(run_dir):
        pass  # released on exit
    with (
        pytest.raises(CheckpointError, match="no such run directory to resume"),
        open_run_dir(tmp_path / "nowhere", resume=True),
    ):
        pass
    assert not (tmp_path / "nowhere").exists()  # not created by a failed resume


def test_the_lock_is_released_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError), open_run_dir(tmp_path / "run", resume=False):
        raise ValueError("training failed")
    with RunDirLock(tmp_path / "run"):
        pass


def test_lock_wait_is_bounded(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        start = time.perf_counter()
        with pytest.raises(RunDirError, match="in use"):
            RunDirLock(run_dir, wait_s=0.5).acquire()
        assert 0.4 < time.perf_counter() - start < 5
    finally:
        holder.kill()
        holder.wait()

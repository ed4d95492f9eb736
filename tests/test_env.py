"""Environment variables: validated, one clear line each, no hang on a stray WORLD_SIZE."""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest

from stagetrain.env import DEFAULT_DIST_TIMEOUT_S, LaunchEnv, cache_dir, read_launch_env
from stagetrain.errors import EnvError, StageTrainError

TORCHRUN = {
    "WORLD_SIZE": "2",
    "RANK": "1",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29511",
    "TORCHELASTIC_RESTART_COUNT": "3",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
}


def test_no_launcher_is_a_single_process() -> None:
    env = read_launch_env({})
    assert env == LaunchEnv()
    assert (env.world_size, env.rank, env.distributed, env.is_main, env.restarted) == (
        1,
        0,
        False,
        True,
        False,
    )
    assert env.timeout == timedelta(seconds=DEFAULT_DIST_TIMEOUT_S)


def test_torchrun_variables() -> None:
    env = read_launch_env({**TORCHRUN, "STAGETRAIN_DIST_TIMEOUT": "90"})
    assert (env.world_size, env.rank, env.local_rank, env.local_world_size) == (2, 1, 1, 2)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29511)
    assert env.restart_count == 3 and env.restarted and env.use_agent_store
    assert env.distributed and not env.is_main and env.timeout == timedelta(seconds=90)


def test_world_size_one_needs_nothing_else() -> None:
    assert read_launch_env({"WORLD_SIZE": "1", "RANK": "0"}).distributed is False
    assert read_launch_env({"WORLD_SIZE": " 1 "}).world_size == 1
    assert read_launch_env({"WORLD_SIZE": ""}).world_size == 1  # set but empty: unset


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"WORLD_SIZE": "abc"},
            "WORLD_SIZE: expected a whole number >= 1 (the number of processes), got 'abc'",
        ),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE: expected a whole number >= 1"),
        ({"WORLD_SIZE": "2.5"}, "WORLD_SIZE: expected a whole number >= 1"),
        ({"WORLD_SIZE": "1e9999"}, "WORLD_SIZE: expected a whole number >= 1"),
        ({**TORCHRUN, "RANK": "abc"}, "RANK: expected a whole number >= 0"),
        ({**TORCHRUN, "RANK": "2"}, "RANK: 2 is not below WORLD_SIZE 2"),
        (
            {**TORCHRUN, "LOCAL_RANK": "-1"},
            "LOCAL_RANK: expected a whole number >= 0 (the index on this machine), got '-1'",
        ),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK: 2 is not below LOCAL_WORLD_SIZE 2"),
        (
            {**TORCHRUN, "MASTER_PORT": "99999"},
            "MASTER_PORT: expected a port number 1-65535, got '99999'",
        ),
        ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT: expected a port number 1-65535"),
        ({**TORCHRUN, "MASTER_ADDR": " "}, "MASTER_ADDR: expected a host name or address"),
        (
            {"TORCHELASTIC_RESTART_COUNT": "x"},
            "TORCHELASTIC_RESTART_COUNT: expected a whole number >= 0 (restarts so far), got 'x'",
        ),
        (
            {"STAGETRAIN_DIST_TIMEOUT": "abc"},
            "STAGETRAIN_DIST_TIMEOUT: expected seconds, a number > 0 and at most 604800",
        ),
        ({"STAGETRAIN_DIST_TIMEOUT": "0"}, "STAGETRAIN_DIST_TIMEOUT: expected seconds"),
        ({"STAGETRAIN_DIST_TIMEOUT": "nan"}, "STAGETRAIN_DIST_TIMEOUT: expected seconds"),
        ({"STAGETRAIN_DIST_TIMEOUT": "1e400"}, "STAGETRAIN_DIST_TIMEOUT: expected seconds"),
        (
            {"TORCHELASTIC_USE_AGENT_STORE": "maybe"},
            "TORCHELASTIC_USE_AGENT_STORE: expected true or false",
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(EnvError) as info:
        read_launch_env(env)
    text = str(info.value)
    assert "\n" not in text and text.startswith(message.split(":")[0] + ":")
    assert message in text, text
    assert isinstance(info.value, StageTrainError)


def test_a_stray_world_size_is_refused_at_once() -> None:
    start = time.perf_counter()
    with pytest.raises(EnvError) as info:
        read_launch_env({"WORLD_SIZE": "2"})
    assert time.perf_counter() - start < 1.0
    text = str(info.value)
    assert text.startswith("WORLD_SIZE=2, but RANK, MASTER_ADDR, MASTER_PORT are not set")
    assert "torchrun" in text and "unset WORLD_SIZE" in text
    with pytest.raises(EnvError, match="but MASTER_PORT is not set"):
        read_launch_env({"WORLD_SIZE": "4", "RANK": "0", "MASTER_ADDR": "node1"})


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert read_launch_env().restart_count == 2


# --- STAGETRAIN_CACHE ---------------------------------------------------------------


def test_cache_dir_default_and_created(tmp_path: Path) -> None:
    assert cache_dir({"HOME": str(tmp_path)}) == tmp_path / ".cache" / "stagetrain" / "scores"
    assert (tmp_path / ".cache" / "stagetrain" / "scores").is_dir()
    target = tmp_path / "a" / "b"
    assert cache_dir({"STAGETRAIN_CACHE": str(target)}) == target and target.is_dir()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file", "is a file, not a directory"),
        ("under-file", "cannot be created (Not a directory)"),
        ("/proc", "is on a pseudo file system (/proc)"),
        ("/proc/stagetrain-cache", "is on a pseudo file system (/proc)"),
        ("/sys/kernel/stagetrain", "is on a pseudo file system (/sys)"),
    ],
)
def test_bad_cache_dirs_are_one_line(tmp_path: Path, where: str, message: str) -> None:
    (tmp_path / "file").write_text("x")
    value = {"file": str(tmp_path / "file"), "under-file": str(tmp_path / "file" / "sub")}.get(
        where, where
    )
    with pytest.raises(EnvError) as info:
        cache_dir({"STAGETRAIN_CACHE": value})
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"STAGETRAIN_CACHE: {value!r} ")
    assert message in text and "expected a writable directory" in text, text


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_cache_dir(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(EnvError, match=re.escape("is not writable")):
        cache_dir({"STAGETRAIN_CACHE": str(locked)})

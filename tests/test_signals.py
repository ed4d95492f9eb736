"""Graceful shutdown: SIGTERM / SIGINT set a flag that the loop checks after each step; a
second signal exits at once. Tested on real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from stagetrain.signals import StopRequest, graceful_shutdown

# A stand-in for the training loop: a step takes 0.2 s; after each one it checks the flag,
# "writes a checkpoint" and exits with the flag's code, as the runner does.
LOOP = textwrap.dedent(
    """
    import sys, time
    from stagetrain.signals import graceful_shutdown
    check = sys.argv[1] == "check"
    with graceful_shutdown() as stop:
        for step in range(1000):
            print(f"step {step} start", flush=True)
            time.sleep(0.2)
            print(f"step {step} done", flush=True)
            if check and stop.requested:
                print(f"checkpoint at {step + 1} after {stop.signal_name}", flush=True)
                sys.exit(stop.exit_code)
    """
)


def start(mode: str) -> tuple[subprocess.Popen[str], list[str]]:
    """The loop, started and read up to its third step's end; the lines read so far."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOOP, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    while not seen or seen[-1] != "step 2 done":
        line = proc.stdout.readline()
        assert line, f"the loop ended early: {proc.communicate()}"
        seen.append(line.rstrip("\n"))
    return proc, seen


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_then_exits_with_its_code(
    sig: signal.Signals, code: int
) -> None:
    proc, seen = start("check")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (out, err)
    # The signal may land before the loop checks the flag after step 2: then the step that
    # just ended is among the lines already read.
    lines = seen + out.splitlines()
    # The step in progress ran to its end; the loop stopped right after it.
    assert lines[-1].startswith("checkpoint at ") and lines[-1].endswith(f"after {sig.name}")
    stopped_at = int(lines[-1].split()[2])
    assert lines[-2] == f"step {stopped_at - 1} done"
    assert f"{sig.name} received" in err and "send it again to stop at once" in err
    assert "Traceback" not in err


def test_a_second_signal_exits_at_once() -> None:
    proc, _ = start("ignore")  # a loop that never looks at the flag
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # the first signal alone does not stop it
    begin = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.perf_counter() - begin < 5
    assert "second SIGTERM: stopping at once" in err and "Traceback" not in err


def test_previous_handlers_are_restored() -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    # Python's default_int_handler, or SIG_IGN when the suite was started in the background
    # of a non-interactive shell (nohup ... &), which ignores SIGINT for its children
    sigint_before = signal.getsignal(signal.SIGINT)
    try:
        with graceful_shutdown(announce=False) as stop:
            assert signal.getsignal(signal.SIGTERM) is not mine
            assert stop.installed and not stop.requested
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested and stop.signal_name == "SIGTERM" and stop.exit_code == 143
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    seen: list[StopRequest] = []

    def body() -> None:
        with graceful_shutdown(announce=False) as stop:
            seen.append(stop)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen and not seen[0].installed and not seen[0].requested
    assert seen[0].exit_code == 0


def test_a_request_can_come_from_elsewhere(tmp_path: Path) -> None:
    # Another rank's signal, agreed through a collective, is recorded the same way.
    stop = StopRequest()
    stop.request(signal.SIGTERM)
    assert stop.requested and stop.exit_code == 143 and stop.signal_name == "SIGTERM"
    assert "SIGTERM" in stop.message(step=42) and "42" in stop.message(step=42)

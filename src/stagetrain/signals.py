"""Graceful shutdown on SIGTERM and SIGINT.

Schedulers (Slurm, Kubernetes) send SIGTERM some seconds before they kill a job; a
user presses Ctrl-C (SIGINT). Inside :func:`graceful_shutdown` the first such signal
only sets a flag; the training loop checks it after each step, writes a checkpoint and
exits with the conventional code ``128 + signal`` (143 for SIGTERM, 130 for SIGINT)::

    with graceful_shutdown() as stop:
        for step in ...:
            train_one_step()
            if stop.requested:          # in a distributed run: agree on it across ranks
                save_checkpoint()
                print(stop.message(step=state.step), file=sys.stderr)
                sys.exit(stop.exit_code)

A second signal exits at once (``os._exit``), without unwinding: checkpoints are
written atomically, so this is as safe as ``kill -9``. The previous handlers are
restored when the block ends. Signal handlers can only be installed from the main
thread; elsewhere the block installs nothing and :attr:`StopRequest.installed` is
False.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO


@dataclass
class StopRequest:
    """Whether a stop was asked for, and by which signal."""

    requested: bool = False
    signal_name: str | None = None
    signum: int | None = None
    installed: bool = False
    """Whether :func:`graceful_shutdown` installed its handlers (main thread only)."""
    _count: int = field(default=0, repr=False)

    @property
    def exit_code(self) -> int:
        """``128 + signal number`` (143 for SIGTERM, 130 for SIGINT); 0 when not requested."""
        return 128 + self.signum if self.requested and self.signum is not None else 0

    def request(self, signum: int) -> None:
        """Record a stop asked for by ``signum`` (also for a stop agreed with other ranks)."""
        self.requested = True
        if self.signum is None:
            self.signum = int(signum)
            self.signal_name = signal.Signals(signum).name
        self._count += 1

    def message(self, *, step: int | None = None) -> str:
        """One line for the user: why the run stopped and how to continue it."""
        where = f" at step {step:,}" if step is not None else ""
        return (
            f"stopped by {self.signal_name}{where} after writing a checkpoint; run again with "
            "--resume (or --auto-resume) to continue"
        )


@contextlib.contextmanager
def graceful_shutdown(
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    *,
    announce: bool = True,
    stream: TextIO | None = None,
) -> Iterator[StopRequest]:
    """Turn the first SIGTERM/SIGINT into a flag, and a second one into an immediate exit.

    Args:
        signals: the signals to catch.
        announce: write one line to ``stream`` (stderr by default) on the first signal.
        stream: where the announcement goes.

    Yields:
        The :class:`StopRequest` the handlers set.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.requested:
            # os.write, not print: the handler may run while stderr's buffer is in use.
            _say(f"stagetrain: second {name}: stopping at once (the newest checkpoint is intact)")
            os._exit(128 + signum)
        stop.request(signum)
        if announce:
            _say(
                f"stagetrain: {name} received: finishing the current step, then writing a "
                "checkpoint (send it again to stop at once)",
                stream,
            )

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, on_signal)
        stop.installed = True
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say(line: str, stream: TextIO | None = None) -> None:
    if stream is not None:
        with contextlib.suppress(Exception):
            stream.write(line + "\n")
            stream.flush()
        return
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())

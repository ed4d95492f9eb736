"""One background checkpoint write at a time, for the stores of :mod:`stagetrain.train.stores`
and :mod:`stagetrain.train.dcp`.

With ``checkpoint.async_save`` a store copies the state to host memory and hands the
write to a :class:`BackgroundWriter`; the next checkpoint, a rollback and the end of
the run call :meth:`BackgroundWriter.wait` first, so at most one write is in flight
and a failed one surfaces as a :class:`~stagetrain.errors.CheckpointError` naming the
directory, never as a thread's traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stagetrain.errors import CheckpointError


class BackgroundWriter:
    """A long-lived worker thread running one checkpoint write at a time.

    Args:
        directory: the checkpoints directory, named in the error of a failed write.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # One long-lived worker: starting a thread per checkpoint costs the stall time.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stagetrain-ckpt")
        self._pending: Future[Any] | None = None

    def submit(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Start ``write(*args, **kwargs)`` in the background, after the previous write."""
        self.wait()
        self._pending = self._worker.submit(write, *args, **kwargs)

    def wait(self) -> None:
        """Block until the write in flight (if any) has finished.

        Raises:
            CheckpointError: when it failed (its own CheckpointError as it is; any other
                error as one line naming the directory and the error's type).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except CheckpointError:
            raise
        except Exception as error:
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(
                f"{self.directory}: writing a checkpoint failed ({type(error).__name__}: {text})"
            ) from error

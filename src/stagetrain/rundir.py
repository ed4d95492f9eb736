"""Run directories: one process at a time, and no run silently replaced by another.

Two pieces, used together at the start of :func:`stagetrain.fit` (by the main process)::

    with open_run_dir(run_dir, resume=..., auto_resume=..., overwrite=...) as decision:
        ...  # decision.action is "fresh", "resume" or "finished"; train; write summary

* :class:`RunDirLock` — an exclusive ``fcntl.flock`` on ``<run_dir>/.stagetrain.lock``.
  The operating system drops it when the holder exits or is killed (even ``kill -9``),
  so a stale lock file never blocks anyone. The holder writes its PID, host and start
  time into the file, and a second process is refused with one line naming them.
* :func:`decide_run_dir` — the run-directory policy: a fresh run goes only into a
  directory without run files; a used one needs ``--resume`` / ``--auto-resume``
  (continue from its newest checkpoint) or ``--overwrite`` (move its run files aside into
  ``<run_dir>/.replaced-<UTC time>/``, never delete them). Only the files a run writes
  (:data:`RUN_FILES`) make a directory used; a scheduler's log beside them does not.
  A run whose ``summary.json`` says
  ``completed`` for the state of its newest checkpoint is ``finished``: resuming it
  changes nothing.

``flock`` works on local file systems and on NFSv4; where it is not supported, a
warning says that concurrent runs cannot be detected and the run goes on.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from stagetrain.checkpoint import (
    CheckpointStore,
    ManifestEntry,
    load_checkpoint,
    remove_orphan_temps,
)
from stagetrain.errors import CheckpointError, RunDirError

LOCK_NAME = ".stagetrain.lock"
"""The lock file inside a run directory (its content: the holder's pid, host, start time)."""
OLD_PREFIX = ".replaced-"
"""Prefix of the folders that ``--overwrite`` moves an earlier run into."""
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "tb")
"""What a run writes into its directory; other files (a scheduler's log, say) are left alone."""
SUMMARY = "summary.json"
SHARDED_MANIFEST = "sharded.json"
"""The manifest of ``parallel: fsdp`` runs' sharded checkpoints (:mod:`stagetrain.train.dcp`)."""

Action = Literal["fresh", "resume", "finished"]


class RunDirLock:
    """An exclusive lock on a run directory, held by one process at a time.

    Creates the directory if needed. Usable as a context manager; :meth:`release` is
    idempotent. The lock belongs to the open file, so it is also refused to a second
    :class:`RunDirLock` on the same directory inside the same process.

    Args:
        run_dir: the run directory.
        wait_s: how long to keep trying while another process holds it (0: refuse at once).
    """

    def __init__(self, run_dir: str | Path, *, wait_s: float = 0.0) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.wait_s = wait_s
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            RunDirError: when another process holds it (naming its PID and host), or when
                the directory or the lock file cannot be created.
        """
        if self._fd is not None:
            return
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"{self.run_dir}: not a directory")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(
                f"{self.run_dir}: run directory is not writable ({exc.strerror or exc})"
            ) from None
        try:
            # O_NOFOLLOW: a symbolic link planted as the lock file is refused, not written.
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise RunDirError(f"{self.path}: cannot lock ({exc.strerror or exc})") from None
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                os.close(fd)
                raise RunDirError(self._busy_message()) from None
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    warnings.warn(
                        f"{self.path}: the file system cannot lock ({exc.strerror}); a second "
                        "run in this directory at the same time would not be detected",
                        stacklevel=2,
                    )
                    break
                os.close(fd)
                raise RunDirError(f"{self.path}: cannot lock ({exc.strerror or exc})") from None
        self._fd = fd
        self._write_holder()

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with the next holder)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _write_holder(self) -> None:
        assert self._fd is not None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[:8],
        }
        data = json.dumps(record).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:
            pass  # the lock itself is what matters; the record is only for the message

    def _busy_message(self) -> str:
        holder = read_lock_holder(self.run_dir)
        if holder is None:
            who = "pid unknown"
        else:
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
            if holder.get("started"):
                who += f", since {holder['started']}"
        return (
            f"{self.run_dir}: in use by another stagetrain process ({who}); wait for it to "
            "finish or stop it, or choose another --run-dir"
        )


def read_lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """What the last holder of the run directory's lock wrote (pid, host, started)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        if path.is_symlink():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class RunDirDecision:
    """What a run does with its directory, as decided by :func:`decide_run_dir`.

    Attributes:
        action: ``fresh`` (start at step 0), ``resume`` (continue from ``checkpoint``,
            through :meth:`CheckpointStore.load_latest`, which falls back past damaged
            files) or ``finished`` (the run is complete: change nothing, keep
            ``summary.json``).
        run_dir: the directory.
        checkpoint: the newest checkpoint found (resume and finished).
        moved_to: where the earlier contents went (``--overwrite``, or ``--auto-resume``
            of a used directory without any checkpoint).
        summary: the finished run's ``summary.json``.
        removed_temps: temp files of killed writes removed by :func:`open_run_dir`.
    """

    action: Action
    run_dir: Path
    checkpoint: ManifestEntry | None = None
    moved_to: Path | None = None
    summary: dict[str, Any] | None = None
    removed_temps: list[Path] = field(default_factory=list)


def run_dir_contents(run_dir: str | Path) -> list[str]:
    """The run files (:data:`RUN_FILES`) present in ``run_dir``: what makes it used."""
    run_dir = Path(run_dir)
    try:
        return [name for name in RUN_FILES if os.path.lexists(run_dir / name)]
    except OSError as exc:  # pragma: no cover - lexists does not raise on Linux
        raise RunDirError(f"{run_dir}: cannot list ({exc.strerror or exc})") from None


def decide_run_dir(
    run_dir: str | Path,
    *,
    resume: bool,
    auto_resume: bool = False,
    overwrite: bool = False,
) -> RunDirDecision:
    """Start fresh, resume, or refuse: the run-directory policy (call it holding the lock).

    ====================== =================== ==========================================
    directory              flags               decision
    ====================== =================== ==========================================
    new or empty           none, auto-resume   fresh
    new or empty           resume              error: no checkpoint to resume from
    used                   none                error naming its contents and the flags
    used                   overwrite           run files moved to ``.replaced-<time>/``
    has checkpoint files   resume, auto-resume resume (or finished, see below)
    used, no checkpoint    resume              error: no checkpoint to resume from
    used, no checkpoint    auto-resume         contents moved aside; fresh
    ====================== =================== ==========================================

    ``finished``: ``summary.json`` has ``status: completed`` and the same ``step``,
    ``stage_index`` and ``stage_step`` as the newest checkpoint's sidecar.

    Raises:
        RunDirError: a used directory without a flag, contradictory flags, or a move that
            the file system refuses.
        CheckpointError: ``resume`` without any checkpoint.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError(
            "--overwrite and --resume: choose one (overwrite starts again; resume continues)"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory")
    contents = run_dir_contents(run_dir)
    listing = _listing(contents)
    if not contents:
        if resume:
            where = "the directory is empty" if run_dir.is_dir() else "no such directory"
            raise CheckpointError(f"{run_dir}: no checkpoint to resume from ({where})")
        return RunDirDecision("fresh", run_dir)
    if overwrite:
        return RunDirDecision("fresh", run_dir, moved_to=move_aside(run_dir, contents))
    if not (resume or auto_resume):
        raise RunDirError(
            f"{run_dir}: not empty (holds {listing}); pass --resume to continue that run, "
            "--auto-resume to continue it when it has a checkpoint, or --overwrite to move "
            "its contents aside and start again; or choose another --run-dir"
        )
    single = CheckpointStore(run_dir / "checkpoints")
    entries, _ = single.candidates()
    store = single if entries else None
    if not entries:  # a sharded run (parallel: fsdp) lists its checkpoints elsewhere
        entries = _sharded_entries(run_dir / "checkpoints")
    if not entries:
        if resume:
            raise CheckpointError(
                f"{run_dir}: no checkpoint to resume from (it holds {listing}); pass "
                "--overwrite to start again with its contents moved aside"
            )
        warnings.warn(
            f"{run_dir}: no checkpoint to resume from; starting again with its contents "
            f"({listing}) moved aside",
            stacklevel=2,
        )
        return RunDirDecision("fresh", run_dir, moved_to=move_aside(run_dir, contents))
    newest = (store.latest_entry() if store is not None else None) or entries[-1]
    summary = _finished_summary(run_dir, newest)
    if summary is not None:
        return RunDirDecision("finished", run_dir, checkpoint=newest, summary=summary)
    return RunDirDecision("resume", run_dir, checkpoint=newest)


def move_aside(run_dir: Path, names: list[str] | None = None) -> Path:
    """Move ``names`` (default: the run files present) into ``run_dir/.replaced-<UTC time>/``.

    Renames within one file system: nothing is copied or deleted.
    """
    names = run_dir_contents(run_dir) if names is None else names
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = run_dir / f"{OLD_PREFIX}{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = run_dir / f"{OLD_PREFIX}{stamp}-{suffix}"
    try:
        target.mkdir()
        for name in names:
            os.rename(run_dir / name, target / name)
    except OSError as exc:
        raise RunDirError(
            f"{run_dir}: cannot move the earlier run aside into {target.name} "
            f"({exc.strerror or exc})"
        ) from None
    return target


@contextlib.contextmanager
def open_run_dir(
    run_dir: str | Path,
    *,
    resume: bool,
    auto_resume: bool = False,
    overwrite: bool = False,
    wait_s: float = 0.0,
) -> Iterator[RunDirDecision]:
    """Lock the run directory, decide what to do with it, and clean killed writes' temps.

    The lock is held for the whole ``with`` block (the training run) and released on
    exit, whatever happens; a killed process releases it too. An explicit ``resume`` of
    a directory that does not exist fails without creating it.
    """
    run_dir = Path(run_dir)
    if resume and not run_dir.exists():
        raise CheckpointError(f"{run_dir}: no such run directory to resume")
    with RunDirLock(run_dir, wait_s=wait_s):
        decision = decide_run_dir(
            run_dir, resume=resume, auto_resume=auto_resume, overwrite=overwrite
        )
        removed = remove_orphan_temps(run_dir)
        yield RunDirDecision(
            decision.action,
            decision.run_dir,
            decision.checkpoint,
            decision.moved_to,
            decision.summary,
            removed,
        )


def _sharded_entries(directory: Path) -> list[ManifestEntry]:
    """The sharded checkpoints ``sharded.json`` lists, oldest first, the newest one's state
    counters read from its ``meta.pt`` (verification is the store's, at load time)."""
    path = directory / SHARDED_MANIFEST
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
        listed = [(str(e["file"]), int(e["step"]), str(e["stage"])) for e in raw["checkpoints"]]
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable sharded-checkpoint manifest ({exc})") from None
    entries = [ManifestEntry(file, step, stage, None) for file, step, stage in listed]
    if entries:
        try:
            state = load_checkpoint(directory / entries[-1].file / "meta.pt").get("state")
        except CheckpointError:
            state = None  # damaged: the store falls back to an older one when resuming
        if isinstance(state, dict):
            keys = ("step", "stage_index", "stage_step")
            counters = {k: state[k] for k in keys if isinstance(state.get(k), int)}
            entries[-1] = replace(entries[-1], state=counters)
    return entries


def _finished_summary(run_dir: Path, newest: ManifestEntry) -> dict[str, Any] | None:
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "completed":
        return None
    state = summary.get("state")
    if not isinstance(state, dict) or newest.state is None:
        return None
    keys = ("step", "stage_index", "stage_step")
    if all(state.get(k) == newest.state.get(k) for k in keys):
        return summary
    return None


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

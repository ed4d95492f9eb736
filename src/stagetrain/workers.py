"""A pool of persistent worker processes that train many runs each, in-process.

Why: starting a Python process that imports torch costs seconds, far more than a small
run's training. A worker imports torch once and then calls :func:`stagetrain.fit` for
job after job. Each job still gets its own run directory and log file, and the pool
keeps what separate processes gave:

* **crash isolation** — a worker that dies (a segfault, ``os._exit``, the OOM killer)
  is replaced; its job is reported as failed with the exit code or signal. A Python
  exception inside a job fails only that job, with its message (the traceback goes to
  the job's log).
* **inheritance** — on Linux the workers are forked, so datasets that exist only in
  memory and callables defined in the calling script reach them unpickled.

Threads: each worker runs ``threads`` intra-op threads. The GNU OpenMP runtime that
CPU builds of torch use is not fork-safe: a forked child hangs in its first parallel
region when the parent had already run one. The pool therefore asks each new worker
to run a small parallel operation first and waits for it; a worker that does not
answer is killed and the pool falls back to one thread per worker, with a warning.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

PROBE_TIMEOUT_S = 30.0
"""How long a new multi-threaded worker may take to answer its first parallel operation."""


@dataclass(frozen=True)
class Job:
    """One unit of work: ``key`` identifies it, ``payload`` is passed to the job function."""

    key: Any
    payload: Any
    log_path: str
    """The job's stdout and stderr go here (created or truncated)."""


@dataclass(frozen=True)
class JobResult:
    key: Any
    ok: bool
    error: str | None
    elapsed_s: float


JobFunction = Callable[[Any, Any], None]
"""``fn(shared, payload)``: runs one job; raising fails the job."""


def default_threads(jobs: int) -> int:
    """Intra-op threads per worker so that ``jobs`` workers share the machine's cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(jobs, 1))


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _worker_main(conn: Connection, fn: JobFunction, shared: Any, threads: int) -> None:
    import torch

    # Ctrl-C reaches the whole process group: the parent decides, the workers wait.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    if threads > 1:
        torch.ones(1 << 18).sin_()  # a parallel region: hangs here if OpenMP is unusable
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job: Job = message
        conn.send(_run_job(fn, shared, job))


def _run_job(fn: JobFunction, shared: Any, job: Job) -> JobResult:
    start = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    with open(job.log_path, "w", buffering=1) as log:
        # the job's prints, warnings and tracebacks go to its own log: Python's streams
        # (which may not be file descriptors 1 and 2 at all) and the descriptors (C code)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                fn(shared, job.payload)
                ok, error = True, None
            except BaseException as exc:  # the job's failure, not the worker's
                traceback.print_exc()
                ok, error = False, _one_line(exc)
    return JobResult(job.key, ok, error, time.perf_counter() - start)


def _one_line(exc: BaseException) -> str:
    from stagetrain.errors import StageTrainError

    text = str(exc).strip().replace("\n", " ")
    return text if isinstance(exc, StageTrainError) else f"{type(exc).__name__}: {text}"


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return f"worker process died (signal {name})"
    return f"worker process died (exit code {exitcode})"


class _Worker:
    def __init__(self, ctx: Any, fn: JobFunction, shared: Any, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, fn, shared, threads), daemon=True
        )
        self.process.start()
        child.close()
        self.job: Job | None = None
        self.ready = False

    def stop(self, *, kill: bool = False) -> None:
        if self.process.is_alive():
            if kill:
                self.process.kill()
            else:
                with contextlib.suppress(OSError, BrokenPipeError):
                    self.conn.send(None)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def run_jobs(
    jobs: Iterable[Job],
    fn: JobFunction,
    shared: Any,
    *,
    workers: int,
    threads: int,
    on_result: Callable[[JobResult], None],
) -> None:
    """Run ``jobs`` on ``workers`` persistent processes; ``on_result`` gets each outcome.

    Results arrive in completion order. ``fn`` and ``shared`` reach the workers by fork
    where the platform has it (else they must be picklable).
    """
    pending = deque(jobs)
    if not pending:
        return
    ctx = _context()
    count = min(workers, len(pending))
    pool = [_Worker(ctx, fn, shared, threads) for _ in range(count)]
    started = time.monotonic()
    try:
        while pending or any(w.job is not None for w in pool):
            for w in pool:
                if w.ready and w.job is None and pending:
                    w.job = pending.popleft()
                    with contextlib.suppress(OSError):  # a dead worker: found below
                        w.conn.send(w.job)
            ready = wait([w.conn for w in pool] + [w.process.sentinel for w in pool], timeout=5)
            for i, w in enumerate(pool):
                if w.conn in ready or w.conn.poll():
                    try:
                        message = w.conn.recv()
                    except (EOFError, OSError):
                        message = None
                    if message == "ready":
                        w.ready = True
                        continue
                    if isinstance(message, JobResult):
                        w.job = None
                        on_result(message)
                        continue
                if not w.process.is_alive():
                    w.process.join()
                    if w.job is not None:
                        on_result(JobResult(w.job.key, False, _death(w.process.exitcode), 0.0))
                    w.conn.close()
                    pool[i] = _Worker(ctx, fn, shared, threads)
            waited = time.monotonic() - started
            if threads > 1 and waited > PROBE_TIMEOUT_S and not any(w.ready for w in pool):
                warnings.warn(
                    "stagetrain: multi-threaded worker processes did not start (torch's OpenMP "
                    "runtime had already run in this process before it forked); running one "
                    "thread per worker instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
                for w in pool:
                    if w.job is not None:
                        pending.appendleft(w.job)
                    w.stop(kill=True)
                threads = 1
                pool = [_Worker(ctx, fn, shared, threads) for _ in range(count)]
    except BaseException:
        for w in pool:
            w.process.terminate()  # the job checkpoints and stops where SIGTERM is handled
        for w in pool:
            w.process.join(timeout=30)
            w.stop(kill=True)
        raise
    for w in pool:
        w.stop()

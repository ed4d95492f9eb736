"""The worker pool: threads per worker, one log per job, failures contained, OpenMP fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from stagetrain.workers import Job, JobResult, run_jobs


def job(shared: dict[str, Any], payload: int) -> None:
    print(f"job {payload} of {shared['name']} with {torch.get_num_threads()} threads")
    print(f"pid {os.getpid()}")
    if payload == 1:
        raise ValueError("payload 1 is refused")
    if payload == 2:
        os._exit(5)
    if payload == 3:
        os.kill(os.getpid(), signal.SIGKILL)


def run(tmp_path: Path, payloads: list[int], **kwargs: Any) -> dict[int, JobResult]:
    results: dict[int, JobResult] = {}

    def collect(result: JobResult) -> None:
        assert result.key not in results, "a job reported twice"
        results[result.key] = result

    jobs = [Job(p, p, str(tmp_path / f"{p}.log")) for p in payloads]
    run_jobs(jobs, job, {"name": "test"}, on_result=collect, **kwargs)
    return results


def test_jobs_share_workers_and_keep_their_own_logs(tmp_path: Path) -> None:
    results = run(tmp_path, [10, 11, 12, 13], workers=2, threads=2)
    assert sorted(results) == [10, 11, 12, 13] and all(r.ok for r in results.values())
    pids = set()
    for p in (10, 11, 12, 13):
        log = (tmp_path / f"{p}.log").read_text()
        assert f"job {p} of test with 2 threads" in log
        pids.add(log.split("pid ")[1].split()[0])
    assert len(pids) <= 2  # persistent workers: four jobs, at most two processes


def test_failures_are_contained(tmp_path: Path) -> None:
    results = run(tmp_path, [0, 1, 2, 3, 4, 5], workers=2, threads=1)
    assert sorted(results) == [0, 1, 2, 3, 4, 5]
    assert [p for p, r in sorted(results.items()) if r.ok] == [0, 4, 5]
    assert results[1].error == "ValueError: payload 1 is refused"
    assert "Traceback" in (tmp_path / "1.log").read_text()
    assert results[2].error == "worker process died (exit code 5)"
    assert results[3].error == "worker process died (signal SIGKILL)"


def test_falls_back_to_one_thread_when_openmp_ran_before_the_fork(tmp_path: Path) -> None:
    # In a fresh interpreter: the parent runs a parallel region first, as user code might.
    script = textwrap.dedent(
        f"""
        import sys, warnings
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        torch.set_num_threads(2)
        torch.ones(1 << 20).sin_()
        import stagetrain.workers as workers
        from test_workers import run
        from pathlib import Path
        workers.PROBE_TIMEOUT_S = 3.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = run(Path({str(tmp_path)!r}), [10, 11], workers=1, threads=2)
        assert all(r.ok for r in results.values()), results
        assert any("one thread per worker" in str(w.message) for w in caught)
        print(open(Path({str(tmp_path)!r}) / "10.log").read())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "with 1 threads" in done.stdout

"""The run directory, as the loop sees it: write probe, space estimate, summary.

The policy — lock, fresh / resume / finished / refused, ``--overwrite`` moving old files
aside — is :mod:`stagetrain.rundir`'s; a run directory holds one run:
``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``tb/`` and, once complete,
``summary.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from stagetrain.errors import StageTrainError
from stagetrain.rundir import decide_run_dir

SUMMARY = "summary.json"


def default_run_dir(name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def check_fresh(run_dir: Path, *, overwrite: bool) -> None:
    """A fresh run may start in ``run_dir`` (the policy of
    :func:`stagetrain.rundir.decide_run_dir`: refused when it holds a run, unless
    ``overwrite`` moves the old files aside).

    Raises:
        StageTrainError: naming the directory and the options.
    """
    decide_run_dir(run_dir, resume=False, overwrite=overwrite)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json`` when it says the run completed, else None."""
    path = run_dir / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "completed" else None


def check_writable(run_dir: Path, needed_bytes: int = 0) -> None:
    """Fail before training when the run directory cannot be written or has too little space.

    ``needed_bytes`` is an estimate of what the run's checkpoints will occupy.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise StageTrainError(
            f"{run_dir}: run directory is not writable ({exc.strerror})"
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise StageTrainError(
            f"{run_dir}: only {free / 2**20:,.1f} MiB free, but the checkpoints need about "
            f"{needed_bytes / 2**20:,.1f} MiB; free space or lower checkpoint.keep"
        )


def checkpoint_bytes_estimate(model: torch.nn.Module, keep: int) -> int:
    """Model + two optimizer moments per kept checkpoint, one more while writing, plus logs."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params * 3 * (keep + 1) + (1 << 20)

"""The run directory: what a fresh run, a resume and ``--overwrite`` may do to it.

A run directory holds one run: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``tb/`` and, once complete, ``summary.json``. A fresh run never writes into a
directory that holds another run's files (they would mix: an old manifest, an old
summary beside a new log); it is refused unless ``--resume`` or ``--overwrite``, and
``--overwrite`` moves the old files aside instead of deleting them.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from stagetrain.errors import StageTrainError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "tb")
SUMMARY = "summary.json"


def default_run_dir(name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds files of a run."""
    return any((run_dir / name).exists() for name in RUN_FILES)


def move_aside(run_dir: Path) -> Path:
    """Move the run files of ``run_dir`` into ``run_dir/.replaced-<time>/``; returns it."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    aside = run_dir / f".replaced-{stamp}"
    aside.mkdir(parents=True)
    for name in RUN_FILES:
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(aside / name))
    return aside


def check_fresh(run_dir: Path, *, overwrite: bool) -> None:
    """A fresh run may start in ``run_dir``: empty of run files, or ``overwrite`` (moved aside).

    Raises:
        StageTrainError: naming the directory and the options.
    """
    if not holds_run(run_dir):
        return
    if overwrite:
        move_aside(run_dir)
        return
    found = ", ".join(n for n in RUN_FILES if (run_dir / n).exists())
    raise StageTrainError(
        f"{run_dir}: already holds a run ({found}); pass --resume (resume=True) to continue "
        "it, or --overwrite (overwrite=True) to start over with the old files moved aside"
    )


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

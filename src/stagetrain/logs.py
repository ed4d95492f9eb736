"""Run logs: JSONL always, TensorBoard when it is installed.

Every record carries ``type``, ``step`` (global, completed steps), ``stage`` (name) and
``stage_step``; training records carry ``loss`` and ``lr``. A checkpoint stores how
many JSONL lines existed when it was taken, and resume truncates the file back to
that point, so a resumed run's log equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from stagetrain.checkpoint import atomic_write_text
from stagetrain.errors import DataError

METRICS_FILE = "metrics.jsonl"

_NONFINITE = ("nan", "inf", "-inf")  # JSON has no NaN/inf: the logger writes them as strings


class _Record(BaseModel):
    """Fields every record has (others are kept as they are)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: StrictStr
    step: int = Field(ge=0)
    stage: StrictStr
    stage_step: int = Field(ge=0)


class _Progress(_Record):
    """Records that place themselves on the run's axes (evaluations, stage starts)."""

    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    time: float = Field(ge=0)


class _Eval(_Progress):
    name: StrictStr


_SCHEMAS: dict[str, type[_Record]] = {"eval": _Eval, "stage_start": _Progress, "train": _Record}


def validate_record(record: object) -> dict[str, Any]:
    """``record`` checked against the schema of its type; raises ``ValueError`` saying what
    is wrong. Metric values of evaluations must be numbers (or "nan"/"inf" strings)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    schema = _SCHEMAS.get(str(record.get("type")), _Record)
    try:
        schema.model_validate(record)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "record"
        raise ValueError(f"{where}: {err['msg']}") from None
    if record["type"] == "eval":
        for key, value in record.items():
            if key in _Eval.model_fields:
                continue
            if isinstance(value, bool) or not (
                isinstance(value, int | float) or value in _NONFINITE
            ):
                raise ValueError(f"{key}: a metric must be a number, got {value!r}")
    return record


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSONL log, each validated (:func:`validate_record`).

    A torn last line — one without its newline, as a kill during a write leaves — is
    ignored. Anything else that is not a valid record raises :class:`DataError` naming
    the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the log: {exc}") from None
    lines = text.split("\n")
    lines.pop()  # after the last newline: '' unless the last write was cut short
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(validate_record(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as exc:
            problem = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise DataError(f"{path} line {number}: {problem}") from None
    return records


class RunLogger:
    """Writes the records of one run (only rank 0 writes; other ranks pass ``enabled=False``).

    Args:
        run_dir: the run directory.
        enabled: False on non-zero ranks.
        resume_lines: when resuming, the number of JSONL lines to keep.
        tensorboard: write TensorBoard events too when the package is available.
        purge_step: on resume, TensorBoard events after this step are dropped.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        resume_lines: int | None = None,
        tensorboard: bool = True,
        purge_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.lines = 0
        self._tb: Any = None
        if not enabled:
            return
        if resume_lines is not None and self.path.exists():
            kept = self.path.read_text().splitlines()[:resume_lines]
            atomic_write_text(self.path, "".join(x + "\n" for x in kept))
            self.lines = len(kept)
        elif self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only
                pass
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge_step)

    def truncate(self, lines: int) -> None:
        """Drop every record after the first ``lines`` (a rollback returns to a checkpoint)."""
        if not self.enabled:
            return
        self._file.close()
        kept = self.path.read_text().splitlines()[:lines]
        atomic_write_text(self.path, "".join(x + "\n" for x in kept))
        self.lines = len(kept)
        self._file = self.path.open("a")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (flushed at once so that a kill loses at most this line)."""
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        self.lines += 1
        if self._tb is not None:
            self._write_tensorboard(clean)

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        kind, step = record.get("type"), record.get("step", 0)
        prefix = {"train": "train", "eval": f"eval/{record.get('name')}"}.get(str(kind))
        if prefix is None:
            if kind == "stage_start":
                self._tb.add_scalar("curriculum/stage_index", record.get("stage_index", 0), step)
            return
        for key, value in record.items():
            if key in ("step", "stage_step", "stage_index", "name", "type"):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value

"""Reading a comparison's runs back: the target metric, and each run's status and curve."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stagetrain.config import CurriculumConfig
from stagetrain.errors import ConfigError, DataError
from stagetrain.logs import read_records


@dataclass(frozen=True)
class TargetMetric:
    """An evaluation's metric, e.g. ``test.accuracy``; accuracy is maximised, loss minimised."""

    eval_name: str
    key: str

    @property
    def higher_is_better(self) -> bool:
        # Losses, error rates and perplexity are minimised; accuracies and matches maximised.
        return not (self.key.endswith("loss") or self.key in ("error", "perplexity"))

    def __str__(self) -> str:
        return f"{self.eval_name}.{self.key}"

    @classmethod
    def parse(cls, text: str | None, available: Sequence[str]) -> TargetMetric:
        """``"test.accuracy"``, or the first evaluation's accuracy (else loss) when ``None``.

        ``available`` lists every ``EVAL.KEY`` the curriculum-level evaluations produce.
        """
        if not available:
            raise ConfigError("evals: compare needs at least one curriculum-level evaluation")
        if text is None:
            first = available[0].rpartition(".")[0]
            text = f"{first}.accuracy" if f"{first}.accuracy" in available else f"{first}.loss"
        if text not in available:
            raise ConfigError(
                f"metric: no evaluation produces {text!r}; available: {list(available)}"
            )
        name, _, key = text.rpartition(".")
        return cls(name, key)


def produced_metrics(config: CurriculumConfig) -> list[str]:
    """Every ``EVAL.KEY`` of the curriculum-level evaluations known before a run, in order
    (a custom metric contributes its ``key`` when it names one)."""
    out: list[str] = []
    for ev in config.evals:
        for metric in ev.metrics:
            keys = metric.produced_keys() or ([metric.key] if metric.key else [])
            out += [f"{ev.name}.{k}" for k in keys]
    return out


@dataclass
class RunResult:
    """One (arm, seed) run as read back from its directory."""

    arm: str
    seed: int
    status: str
    """completed, failed, damaged (finished, but its log cannot be trusted) or missing."""
    curve: list[dict[str, float]] = field(default_factory=list)
    """Eval points: step, samples, tokens, time, value."""
    stage_starts: list[tuple[int, str, float, int]] = field(default_factory=list)
    """(global step, stage name, wall-clock seconds, tokens) of each stage start."""
    error: str | None = None

    @property
    def final(self) -> float | None:
        return self.curve[-1]["value"] if self.curve else None

    def best(self, higher_is_better: bool) -> float | None:
        values = [p["value"] for p in self.curve]
        if not values:
            return None
        return max(values) if higher_is_better else min(values)

    def time_to(self, target: float, higher_is_better: bool) -> dict[str, float] | None:
        """The first evaluation that reaches ``target`` (None if none did)."""
        for point in self.curve:
            value = point["value"]
            if (value >= target) if higher_is_better else (value <= target):
                return point
        return None


def run_dir_of(out_dir: Path, arm: str, seed: int) -> Path:
    return out_dir / "runs" / arm / f"seed-{seed}"


def read_run(out_dir: Path, arm: str, seed: int, metric: TargetMetric) -> RunResult:
    """Read one run's status and target-metric curve from disk (every record validated)."""
    run_dir = run_dir_of(out_dir, arm, seed)
    log = run_dir / "metrics.jsonl"
    failed = run_dir.parent / f"seed-{seed}.failed"
    if failed.exists():
        return RunResult(arm, seed, "failed", error=failed.read_text().strip())
    finished = (run_dir / "summary.json").exists()
    if not finished:
        return RunResult(arm, seed, "missing")
    try:
        records = read_records(log) if log.exists() else None
    except DataError as exc:
        return RunResult(arm, seed, "damaged", error=str(exc))
    if records is None:
        return RunResult(arm, seed, "damaged", error=f"{log} is missing")
    if not records:
        return RunResult(arm, seed, "damaged", error=f"{log} is empty")
    curve = [
        {
            "step": r["step"],
            "samples": r["samples"],
            "tokens": r["tokens"],
            "time": r["time"],
            "value": float(r[metric.key]),
        }
        for r in records
        if r["type"] == "eval" and r.get("name") == metric.eval_name and metric.key in r
    ]
    starts = [
        (int(r["step"]), str(r["stage"]), float(r["time"]), int(r["tokens"]))
        for r in records
        if r["type"] == "stage_start"
    ]
    if not curve:
        return RunResult(arm, seed, "damaged", error=f"{log}: no {metric} evaluation")
    if not math.isfinite(curve[-1]["value"]):
        return RunResult(
            arm, seed, "damaged", curve, starts, f"{log}: final {metric} is {curve[-1]['value']}"
        )
    return RunResult(arm, seed, "completed", curve, starts)

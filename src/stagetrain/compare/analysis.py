"""The statistics of a comparison: every arm's runs summarised and set against the baseline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stagetrain.compare.runs import RunResult, TargetMetric, read_run
from stagetrain.compare.spec import VARY, CompareSpec, check_target
from stagetrain.errors import ConfigError
from stagetrain.stats import (
    PairedDifference,
    PairedTimes,
    Summary,
    TimeToTarget,
    paired_difference,
    paired_times,
    summarize,
    time_to_target,
)


@dataclass
class ArmAnalysis:
    """Everything the report says about one arm."""

    arm: str
    runs: list[RunResult]
    final: Summary | None
    best: Summary | None
    time: TimeToTarget | None
    """Time to the target in the comparison's ``time_unit`` (censored: runs that never
    reached it count as misses)."""
    versus_baseline: PairedDifference | None
    seconds: TimeToTarget | None = None
    """Wall-clock seconds to the target."""
    time_versus_baseline: PairedTimes | None = None
    """Time to the target, seed by seed against the baseline."""

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.runs if r.status != "completed"]


@dataclass
class Analysis:
    """The whole comparison, analysed."""

    metric: TargetMetric
    target: float | None
    arms: list[ArmAnalysis]
    seeds: list[int]
    data_seeds: list[int] = field(default_factory=list)
    vary: list[str] = field(default_factory=lambda: list(VARY))
    time_unit: TimeAxis = "step"
    """What time to target is counted in (see :func:`time_axis`)."""


TimeAxis = Literal["step", "tokens", "samples"]


def time_axis(runs: Mapping[str, list[RunResult]]) -> TimeAxis:
    """``step`` when every completed run ends at the same step (a step is then the same
    share of the budget in every arm), else ``tokens`` (``samples`` when the data counts no
    tokens): arms whose stages keep a token budget at another ``seq_len`` take other
    numbers of steps for the same training, and steps would not compare them."""
    ends = [r.curve[-1] for rs in runs.values() for r in rs if r.status == "completed" and r.curve]
    if len({int(p["step"]) for p in ends}) <= 1:
        return "step"
    return "tokens" if all(p["tokens"] > 0 for p in ends) else "samples"


def analyze(
    out_dir: str | Path, *, target: float | None = None, metric: str | None = None
) -> Analysis:
    """Read every run of a comparison directory and compute the statistics.

    Args:
        out_dir: the comparison directory.
        target: time-to-target threshold (default: the one the comparison was run with,
            else the baseline's median final value).
        metric: ``EVAL.KEY`` to analyse instead of the one the comparison was run for.
    """
    out = Path(out_dir)
    check_target(target)
    spec_path = out / "compare.json"
    if not spec_path.is_file():
        raise ConfigError(f"{out}: not a comparison directory (no compare.json)")
    spec = CompareSpec.from_file(spec_path)
    chosen = TargetMetric.parse(metric or spec.metric, spec.metrics)
    hib = chosen.higher_is_better
    runs = {arm: [read_run(out, arm, s, chosen) for s in spec.seeds] for arm in spec.arms}

    def ok(run: RunResult) -> bool:
        return run.status == "completed" and run.final is not None

    if target is None:
        target = spec.target
    if target is None:
        reference = runs["baseline"] if "baseline" in runs else runs[spec.arms[0]]
        finals = [r.final for r in reference if ok(r) and r.final is not None]
        target = summarize(finals).median if finals else None
    baseline = runs.get("baseline")
    unit = time_axis(runs)
    arms = []
    for arm in spec.arms:
        completed = [r for r in runs[arm] if ok(r)]
        values = [r.final for r in completed if r.final is not None]
        bests = [b for r in completed if (b := r.best(hib)) is not None]
        time = seconds = time_versus = None
        if target is not None and completed:
            hits = [r.time_to(target, hib) for r in completed]
            time = time_to_target([h[unit] if h else None for h in hits])
            seconds = time_to_target([h["time"] if h else None for h in hits])
        versus = None
        if arm != "baseline" and baseline is not None:
            pairs = [(a, b) for a, b in zip(runs[arm], baseline, strict=True) if ok(a) and ok(b)]
            if pairs:
                versus = paired_difference(
                    [a.final for a, _ in pairs],  # type: ignore[misc]
                    [b.final for _, b in pairs],  # type: ignore[misc]
                    higher_is_better=hib,
                )
                if target is not None:
                    steps = [
                        [h[unit] if (h := r.time_to(target, hib)) else None for r in side]
                        for side in zip(*pairs, strict=True)
                    ]
                    time_versus = paired_times(steps[0], steps[1])
        arms.append(
            ArmAnalysis(
                arm=arm,
                runs=runs[arm],
                final=summarize(values) if values else None,
                best=summarize(bests) if bests else None,
                time=time,
                versus_baseline=versus,
                seconds=seconds,
                time_versus_baseline=time_versus,
            )
        )
    return Analysis(chosen, target, arms, list(spec.seeds), list(spec.data_seeds), spec.vary, unit)

"""``compare``: run a curriculum against its control arms over seeds, then analyse.

Layout of a comparison directory::

    compare.json            what was asked (config fingerprint, arms, seeds, metric)
    config.yaml             the curriculum as given
    arms/<arm>.yaml         each derived arm's config
    runs/<arm>/seed-<s>/    an ordinary run directory per (arm, seed)
    runs/<arm>/seed-<s>.log the run's output

Each run is a separate ``stagetrain run`` process, so a crash is contained and
recorded as failed. A finished run has ``summary.json``; an interrupted compare
skips finished runs and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stagetrain.arms import derive_arm, parse_arms
from stagetrain.checkpoint import atomic_write_text
from stagetrain.config import CurriculumConfig, load_config
from stagetrain.curriculum import Curriculum
from stagetrain.errors import ConfigError
from stagetrain.logs import read_records
from stagetrain.stats import PairedDifference, Summary, paired_difference, summarize


@dataclass(frozen=True)
class TargetMetric:
    """An evaluation's metric, e.g. ``test.accuracy``; accuracy is maximised, loss minimised."""

    eval_name: str
    key: str

    @property
    def higher_is_better(self) -> bool:
        return self.key != "loss"  # accuracy and exact_match are maximised

    def __str__(self) -> str:
        return f"{self.eval_name}.{self.key}"

    @classmethod
    def parse(cls, text: str | None, config: CurriculumConfig) -> TargetMetric:
        """``"test.accuracy"``, or the first evaluation's accuracy (else loss) when ``None``."""
        evals = {e.name: e for e in config.evals}
        if not evals:
            raise ConfigError("evals: compare needs at least one curriculum-level evaluation")
        if text is None:
            first = config.evals[0]
            keys = first.produced_keys() or []
            return cls(first.name, "accuracy" if f"{first.name}.accuracy" in keys else "loss")
        name, _, key = text.rpartition(".")
        produced = [k for e in config.evals for k in (e.produced_keys() or [])]
        custom = any(e.produced_keys() is None for e in config.evals)
        if name not in evals or (text not in produced and not custom):
            raise ConfigError(f"metric: no evaluation produces {text!r}; available: {produced}")
        return cls(name, key)


@dataclass
class RunResult:
    """One (arm, seed) run as read back from its directory."""

    arm: str
    seed: int
    status: str
    """completed, failed or missing."""
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
        """The first eval point that reaches ``target`` (None if never)."""
        for point in self.curve:
            value = point["value"]
            if (value >= target) if higher_is_better else (value <= target):
                return point
        return None


def run_dir_of(out_dir: Path, arm: str, seed: int) -> Path:
    return out_dir / "runs" / arm / f"seed-{seed}"


def read_run(out_dir: Path, arm: str, seed: int, metric: TargetMetric) -> RunResult:
    """Read one run's status and target-metric curve from disk."""
    run_dir = run_dir_of(out_dir, arm, seed)
    log = run_dir / "metrics.jsonl"
    records = read_records(log) if log.exists() else []
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
    if (run_dir / "summary.json").exists():
        status, error = "completed", None
    elif (run_dir.parent / f"seed-{seed}.failed").exists():
        status = "failed"
        error = (run_dir.parent / f"seed-{seed}.failed").read_text().strip()
    else:
        status, error = "missing", None
    return RunResult(arm, seed, status, curve, starts, error)


def _run_one(
    out_dir: Path, arm: str, seed: int, threads: int, env_extra: dict[str, str]
) -> tuple[str, int, bool, float]:
    run_dir = run_dir_of(out_dir, arm, seed)
    if (run_dir / "summary.json").exists():
        return arm, seed, True, 0.0
    failed_marker = run_dir.parent / f"seed-{seed}.failed"
    failed_marker.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "stagetrain.cli", "run", str(out_dir / "arms" / f"{arm}.yaml"),
        "--seed", str(seed), "--run-dir", str(run_dir), "--no-progress",
    ]  # fmt: skip
    if (run_dir / "checkpoints" / "manifest.json").exists():
        command.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env_extra}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run_dir.parent / f"seed-{seed}.log").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    elapsed = time.perf_counter() - start
    if code != 0:
        tail = (run_dir.parent / f"seed-{seed}.log").read_text().strip().splitlines()[-1:]
        failed_marker.write_text(f"exit code {code}: {' '.join(tail)}")
    return arm, seed, code == 0, elapsed


@dataclass
class CompareSpec:
    """What a comparison runs (stored as ``compare.json``)."""

    arms: list[str]
    seeds: list[int]
    metric: str
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def prepare(
    config: CurriculumConfig, out_dir: Path, arms: Sequence[str], seeds: int, metric: str | None
) -> CompareSpec:
    """Derive the arms' configs and write the comparison directory's description."""
    if seeds < 1:
        raise ConfigError(f"seeds: need at least one seed, got {seeds}")
    arm_names = parse_arms(list(arms))
    target = TargetMetric.parse(metric, config)
    curriculum = Curriculum(config)
    derived = {arm: derive_arm(curriculum, arm) for arm in arm_names}
    spec = CompareSpec(
        arms=arm_names,
        seeds=[config.seed + i for i in range(seeds)],
        metric=str(target),
        fingerprint=config.fingerprint(),
    )
    spec_path = out_dir / "compare.json"
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if old.get("fingerprint") != spec.fingerprint:
            raise ConfigError(
                f"{out_dir}: holds a comparison of a different curriculum; use another --out"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "arms").mkdir(exist_ok=True)
    for arm, arm_config in derived.items():
        arm_text = yaml.safe_dump(arm_config.to_dict(), sort_keys=False)
        atomic_write_text(out_dir / "arms" / f"{arm}.yaml", arm_text)
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(spec_path, json.dumps(spec.to_dict(), indent=1))
    return spec


def run_all(
    out_dir: Path,
    spec: CompareSpec,
    *,
    jobs: int = 1,
    echo: Callable[[str], None] = print,
    env_extra: dict[str, str] | None = None,
) -> None:
    """Run every (arm, seed) not finished yet; seed-major order so arms share conditions."""
    tasks = [(arm, seed) for seed in spec.seeds for arm in spec.arms]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [
            pool.submit(_run_one, out_dir, arm, seed, threads, env_extra or {})
            for arm, seed in tasks
        ]
        for future in futures:
            arm, seed, ok, elapsed = future.result()
            done += 1
            status = "ok" if ok else "FAILED"
            timing = f"{elapsed:.1f} s" if elapsed else "already done"
            echo(f"[{done}/{len(tasks)}] {arm} seed {seed}: {status} ({timing})")


@dataclass
class ArmAnalysis:
    """Everything the report says about one arm."""

    arm: str
    runs: list[RunResult]
    final: Summary | None
    best: Summary | None
    reached: int
    to_target: dict[str, float | None]
    """Median over seeds of steps/samples/tokens/time to the target (None: not reached by half)."""
    versus_baseline: PairedDifference | None

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


def analyze(out_dir: Path, *, target: float | None = None) -> Analysis:
    """Read every run of a comparison directory and compute the statistics."""
    spec_path = out_dir / "compare.json"
    if not spec_path.exists():
        raise ConfigError(f"{out_dir}: not a comparison directory (no compare.json)")
    spec = json.loads(spec_path.read_text())
    config = load_config(out_dir / "config.yaml")
    metric = TargetMetric.parse(spec["metric"], config)
    hib = metric.higher_is_better
    runs = {arm: [read_run(out_dir, arm, s, metric) for s in spec["seeds"]] for arm in spec["arms"]}

    def finals(arm: str) -> list[float]:
        return [r.final for r in runs[arm] if r.status == "completed" and r.final is not None]

    if target is None:
        reference = finals("baseline") if "baseline" in runs else finals(spec["arms"][0])
        target = summarize(reference).median if reference else None
    arms = []
    for arm in spec["arms"]:
        completed = [r for r in runs[arm] if r.status == "completed" and r.final is not None]
        values = [r.final for r in completed if r.final is not None]
        bests = [b for r in completed if (b := r.best(hib)) is not None]
        hits = [r.time_to(target, hib) for r in completed] if target is not None else []
        to_target: dict[str, float | None] = {}
        for unit in ("step", "samples", "tokens", "time"):
            # Runs that never reach the target count as infinitely slow: the median is
            # then honest about a target that most seeds miss.
            times = sorted(h[unit] if h else math.inf for h in hits)
            median = _median(times) if times else None
            to_target[unit] = None if median is None or math.isinf(median) else median
        versus = None
        if arm != "baseline" and "baseline" in runs:
            pairs = [
                (a.final, b.final)
                for a, b in zip(runs[arm], runs["baseline"], strict=True)
                if a.status == b.status == "completed"
                and a.final is not None
                and b.final is not None
            ]
            if pairs:
                versus = paired_difference(
                    [p[0] for p in pairs], [p[1] for p in pairs], higher_is_better=hib
                )
        arms.append(
            ArmAnalysis(
                arm=arm,
                runs=runs[arm],
                final=summarize(values) if values else None,
                best=summarize(bests) if bests else None,
                reached=sum(h is not None for h in hits),
                to_target=to_target,
                versus_baseline=versus,
            )
        )
    return Analysis(metric, target, arms, list(spec["seeds"]))


def _median(values: list[float]) -> float:
    n = len(values)
    mid = n // 2
    if n % 2:
        return values[mid]
    low, high = values[mid - 1], values[mid]
    return math.inf if math.isinf(high) else (low + high) / 2


def verdict(diff: PairedDifference | None, higher_is_better: bool) -> str:
    """Plain words for a paired difference."""
    if diff is None:
        return "—"
    if not diff.significant():
        return f"no significant difference (p = {diff.p_value:.3g})"
    better = (diff.mean > 0) == higher_is_better
    return f"{'better' if better else 'worse'} than baseline (p = {diff.p_value:.3g})"


def markdown_table(analysis: Analysis) -> str:
    """The summary table printed to the terminal and embedded in the report."""
    m = analysis.metric
    target = "—" if analysis.target is None else f"{analysis.target:.4g}"
    lines = [
        f"Target metric: {m} ({'higher' if m.higher_is_better else 'lower'} is better); "
        f"time-to-target threshold {target}; seeds {analysis.seeds}",
        "",
        "| arm | runs ok | final median [IQR] | final mean [95% CI] | steps to target "
        "| seconds to target | Δ final vs baseline [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in analysis.arms:
        ok = f"{len(a.runs) - len(a.failed)}/{len(a.runs)}"
        if a.final is None:
            lines.append(f"| {a.arm} | {ok} | failed | | | | | |")
            continue
        f = a.final
        steps = a.to_target["step"]
        secs = a.to_target["time"]
        reach = f" ({a.reached}/{len(a.runs)} reached)"
        steps_text = ("not reached" if steps is None else f"{steps:,.0f}") + reach
        secs_text = "—" if secs is None else f"{secs:.1f}"
        d = a.versus_baseline
        delta = "—" if d is None else f"{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]"
        lines.append(
            f"| {a.arm} | {ok} | {f.median:.4f} [{f.q25:.4f}, {f.q75:.4f}] | "
            f"{f.mean:.4f} [{f.ci_low:.4f}, {f.ci_high:.4f}] | {steps_text} | {secs_text} | "
            f"{delta} | {verdict(d, m.higher_is_better)} |"
        )
    failures = [r for a in analysis.arms for r in a.failed]
    for r in failures:
        lines.append(f"\n{r.arm} seed {r.seed}: {r.status}{': ' + r.error if r.error else ''}")
    return "\n".join(lines)


def compare(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    arms: Sequence[str] = ("curriculum", "baseline"),
    seeds: int = 5,
    jobs: int = 1,
    metric: str | None = None,
    target: float | None = None,
    echo: Callable[[str], None] = print,
) -> Analysis:
    """Prepare, run (skipping finished runs) and analyse a comparison."""
    config = load_config(config_path)
    out = Path(out_dir)
    spec = prepare(config, out, arms, seeds, metric)
    if jobs < 1:
        raise ConfigError(f"jobs: need at least 1, got {jobs}")
    run_all(out, spec, jobs=jobs, echo=echo)
    return analyze(out, target=target)

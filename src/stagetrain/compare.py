"""``compare``: run a curriculum against its control arms over seeds, then analyse.

Layout of a comparison directory::

    compare.json            what was asked (fingerprint, arms, seeds, data seeds, metric)
    config.yaml             the curriculum as given
    arms/<arm>.yaml         each derived arm's config (see stagetrain.arms)
    runs/<arm>/seed-<s>/    an ordinary run directory per (arm, seed)
    runs/<arm>/seed-<s>.log the run's output (a traceback when it failed)

The runs are trained by a pool of persistent worker processes
(:mod:`stagetrain.workers`) that call :func:`stagetrain.fit` in-process, so the cost of
starting Python and importing torch is paid once per worker, not once per run. A run
that raises, or whose worker dies, is recorded as failed (``seed-<s>.failed``) without
stopping the others. A finished run has ``summary.json``; an interrupted compare skips
finished runs and resumes cut ones from their checkpoints.

Seeds: run ``i`` of every arm uses ``seed + i`` for the initialisation and batch order
and ``data_seed + i`` for the data factories (``--vary init,data``, the default); with
``--vary init`` the data seed stays the config's, with ``--vary data`` the seed does.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stagetrain.arms import derive_arm, parse_arms
from stagetrain.checkpoint import atomic_write_text
from stagetrain.config import CurriculumConfig, load_config
from stagetrain.curriculum import Curriculum
from stagetrain.errors import ConfigError, DataError, StageTrainError
from stagetrain.logs import read_records
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
from stagetrain.workers import Job, JobResult, default_threads, run_jobs

VARY = ("init", "data")
"""What the seeds of a comparison vary: the initialisation (and batch order), the data."""


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


@dataclass
class CompareSpec:
    """What a comparison runs (stored as ``compare.json``)."""

    arms: list[str]
    seeds: list[int]
    """Run labels (``runs/<arm>/seed-<label>``): the config's seed + 0, 1, ..."""
    data_seeds: list[int]
    init_seeds: list[int]
    vary: list[str]
    metric: str
    metrics: list[str]
    """Every metric the curriculum-level evaluations produce (for ``report --metric``)."""
    fingerprint: str
    target: float | None = None
    """The time-to-target threshold ``compare`` was given (``report`` uses it by default)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_file(cls, path: Path) -> CompareSpec:
        try:
            data = json.loads(path.read_text())
            fields = [k for k in cls.__dataclass_fields__ if k != "target"]
            return cls(**{k: data[k] for k in fields}, target=data.get("target"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path}: not a comparison description ({type(exc).__name__}: {exc}); "
                "was it written by an older stagetrain? Use another --out"
            ) from None


def parse_vary(vary: str | Sequence[str]) -> list[str]:
    """``"init,data"`` or a list, validated."""
    names = [v.strip() for v in vary.split(",")] if isinstance(vary, str) else list(vary)
    names = [n for n in names if n]
    for name in names:
        if name not in VARY:
            raise ConfigError(f"vary: unknown {name!r}; choose from {', '.join(VARY)}")
    if not names:
        raise ConfigError("vary: give init, data or both")
    return [v for v in VARY if v in names]


def check_target(target: float | None) -> None:
    if target is not None and not math.isfinite(target):
        raise ConfigError(f"target: must be a finite number, got {target}")


def require_report_extra() -> None:
    """Fail now, before any training, when the statistics and plots could not be made."""
    missing = []
    for module in ("scipy.stats", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module.split(".")[0])
    if missing:
        raise StageTrainError(
            f"compare needs {' and '.join(missing)} for its statistics and plots: "
            "pip install 'stagetrain[report]'"
        )


def prepare(
    config: CurriculumConfig,
    out_dir: Path,
    arms: Sequence[str],
    seeds: int,
    metric: str | None,
    *,
    vary: Sequence[str] = VARY,
    target: float | None = None,
    datasets: Mapping[str, Any] | None = None,
    models: Mapping[str, Any] | None = None,
) -> tuple[CompareSpec, dict[str, CurriculumConfig]]:
    """Derive the arms' configs and write the comparison directory's description."""
    if seeds < 1:
        raise ConfigError(f"seeds: need at least one seed, got {seeds}")
    arm_names = parse_arms(list(arms))
    vary_names = parse_vary(list(vary))
    chosen = TargetMetric.parse(metric, produced_metrics(config))
    curriculum = Curriculum(config, datasets=datasets, models=models, progress=False)
    derived = {arm: derive_arm(curriculum, arm) for arm in arm_names}
    base_data = config.data_seed if config.data_seed is not None else config.seed
    labels = [config.seed + i for i in range(seeds)]
    spec = CompareSpec(
        arms=arm_names,
        seeds=labels,
        init_seeds=[s if "init" in vary_names else config.seed for s in labels],
        data_seeds=[base_data + i if "data" in vary_names else base_data for i in range(seeds)],
        vary=vary_names,
        metric=str(chosen),
        metrics=produced_metrics(config),
        fingerprint=config.fingerprint(),
        target=target,
    )
    spec_path = out_dir / "compare.json"
    if spec_path.exists():
        old = CompareSpec.from_file(spec_path)
        if old.fingerprint != spec.fingerprint:
            raise ConfigError(
                f"{out_dir}: holds a comparison of a different curriculum; use another --out"
            )
        if old.vary != spec.vary:
            raise ConfigError(
                f"{out_dir}: its runs vary {','.join(old.vary)}, not {','.join(spec.vary)}; "
                "use another --out"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "arms").mkdir(exist_ok=True)
    for arm, arm_config in derived.items():
        arm_text = yaml.safe_dump(arm_config.to_dict(), sort_keys=False)
        atomic_write_text(out_dir / "arms" / f"{arm}.yaml", arm_text)
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(spec_path, json.dumps(spec.to_dict(), indent=1))
    return spec, derived


@dataclass(frozen=True)
class _Shared:
    """What every worker inherits: the arms' configs and the in-memory objects."""

    configs: dict[str, CurriculumConfig]
    datasets: Mapping[str, Any] | None
    models: Mapping[str, Any] | None


@dataclass(frozen=True)
class _RunJob:
    arm: str
    seed: int
    data_seed: int
    run_dir: str
    resume: bool


def _train_one(shared: _Shared, job: _RunJob) -> None:
    """One (arm, seed) run, in a worker: what ``stagetrain run`` does, through the API."""
    from stagetrain import fit

    config = shared.configs[job.arm].model_copy(
        update={"seed": job.seed, "data_seed": job.data_seed}
    )
    note = ", resuming from the newest checkpoint" if job.resume else ""
    print(f"stagetrain compare: arm {job.arm}, seed {job.seed}, data seed {job.data_seed}{note}")
    curriculum = Curriculum(config, datasets=shared.datasets, models=shared.models, progress=False)
    model = curriculum.build_model()
    result = fit(
        model,
        curriculum,
        teacher=curriculum.build_teacher(),
        run_dir=job.run_dir,
        resume=job.resume,
        progress=False,
    )
    for name, metrics in result.metrics.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _warm_imports() -> None:
    """Import here, once, what every run imports on first use (the optimizers pull in
    torch._dynamo, seconds on a CPU): forked workers inherit the imported modules."""
    import importlib

    for module in ("torch._dynamo", "torch.utils.tensorboard"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def run_all(
    out_dir: Path,
    spec: CompareSpec,
    configs: Mapping[str, CurriculumConfig],
    *,
    jobs: int = 1,
    threads: int | None = None,
    datasets: Mapping[str, Any] | None = None,
    models: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Run every (arm, seed) not finished yet; seed-major order so arms share conditions."""
    runs = list(zip(spec.seeds, spec.init_seeds, spec.data_seeds, strict=True))
    total = len(runs) * len(spec.arms)
    done = 0
    work: list[Job] = []
    for label, seed, data_seed in runs:
        for arm in spec.arms:
            run_dir = run_dir_of(out_dir, arm, label)
            if (run_dir / "summary.json").exists():
                done += 1
                echo(f"[{done}/{total}] {arm} seed {label}: ok (already done)")
                continue
            (run_dir.parent / f"seed-{label}.failed").unlink(missing_ok=True)
            resume = (run_dir / "checkpoints" / "manifest.json").exists()
            if not resume and run_dir.exists():
                shutil.rmtree(run_dir)  # an attempt that left no checkpoint: start afresh
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            payload = _RunJob(arm, seed, data_seed, str(run_dir), resume)
            log = run_dir.parent / f"seed-{label}.log"
            work.append(Job((arm, label), payload, str(log)))

    def finished(result: JobResult) -> None:
        nonlocal done
        arm, label = result.key
        done += 1
        if not result.ok:
            failed = out_dir / "runs" / arm / f"seed-{label}.failed"
            atomic_write_text(failed, (result.error or "failed") + "\n")
        status = "ok" if result.ok else f"FAILED: {result.error}"
        echo(f"[{done}/{total}] {arm} seed {label}: {status} ({result.elapsed_s:.1f} s)")

    if work:
        _warm_imports()
    shared = _Shared(dict(configs), datasets, models)
    run_jobs(
        work,
        _train_one,
        shared,
        workers=jobs,
        threads=threads or default_threads(jobs),
        on_result=finished,
    )


@dataclass
class ArmAnalysis:
    """Everything the report says about one arm."""

    arm: str
    runs: list[RunResult]
    final: Summary | None
    best: Summary | None
    time: TimeToTarget | None
    """Steps to the target (censored: runs that never reached it count as misses)."""
    versus_baseline: PairedDifference | None
    seconds: TimeToTarget | None = None
    """Wall-clock seconds to the target."""
    time_versus_baseline: PairedTimes | None = None
    """Steps to the target, seed by seed against the baseline."""

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
    arms = []
    for arm in spec.arms:
        completed = [r for r in runs[arm] if ok(r)]
        values = [r.final for r in completed if r.final is not None]
        bests = [b for r in completed if (b := r.best(hib)) is not None]
        time = seconds = time_versus = None
        if target is not None and completed:
            hits = [r.time_to(target, hib) for r in completed]
            time = time_to_target([h["step"] if h else None for h in hits])
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
                        [h["step"] if (h := r.time_to(target, hib)) else None for r in side]
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
    return Analysis(chosen, target, arms, list(spec.seeds), list(spec.data_seeds), spec.vary)


def _p(p_value: float, p_se: float) -> str:
    return f"p = {p_value:.3g}" + (f" ± {p_se:.1g}" if p_se else "")


def verdict(diff: PairedDifference | None, higher_is_better: bool) -> str:
    """Plain words for a paired difference, read from the same test as its interval."""
    if diff is None:
        return "—"
    if not diff.significant():
        return f"no significant difference ({_p(diff.p_value, diff.p_se)})"
    better = (diff.mean > 0) == higher_is_better
    return f"{'better' if better else 'worse'} than baseline ({_p(diff.p_value, diff.p_se)})"


def time_verdict(times: PairedTimes | None) -> str:
    """Plain words for the paired comparison of steps to the target."""
    if times is None:
        return "—"
    counts = f"sooner on {times.faster}/{times.n}, later on {times.slower}/{times.n}"
    if not times.significant():
        return f"no significant difference ({counts}; {_p(times.p_value, times.p_se)})"
    word = "sooner" if times.faster > times.slower else "later"
    return f"{word} ({counts}; {_p(times.p_value, times.p_se)})"


def _interval(low: float, high: float, fmt: str) -> str:
    if math.isnan(low) or math.isnan(high):
        return "[—]"
    return f"[{low:{fmt}}, {high:{fmt}}]"


def markdown_table(analysis: Analysis) -> str:
    """The summary table printed to the terminal and embedded in the report."""
    m = analysis.metric
    target = "—" if analysis.target is None else f"{analysis.target:.4g}"
    lines = [
        f"Target metric: {m} ({'higher' if m.higher_is_better else 'lower'} is better); "
        f"time-to-target threshold {target}; seeds {analysis.seeds} "
        f"(varying {' and '.join(analysis.vary)})",
        "",
        "| arm | runs ok | final median [IQR] | final mean [95% CI] "
        "| Δ final vs baseline [95% CI] | verdict | reached target [95% CI] "
        "| median steps to target | median seconds to target | steps to target vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    unbounded = False
    for a in analysis.arms:
        ok = f"{len(a.runs) - len(a.failed)}/{len(a.runs)}"
        if a.final is None:
            lines.append(f"| {a.arm} | {ok} | failed | | | | | | | |")
            continue
        f = a.final
        d = a.versus_baseline
        if d is None:
            delta = "—"
        else:
            delta = f"{d.mean:+.4f} {_interval(d.ci_low, d.ci_high, '+.4f')}"
            unbounded = unbounded or math.isinf(d.ci_low) or math.isinf(d.ci_high)
        t, s = a.time, a.seconds
        reached = (
            "—"
            if t is None
            else f"{t.reached}/{t.n} {_interval(t.reached_low, t.reached_high, '.2f')}"
        )
        steps = "—" if t is None or t.median is None else f"{t.median:,.0f}"
        secs = "—" if s is None or s.median is None else f"{s.median:.1f}"
        lines.append(
            f"| {a.arm} | {ok} | {f.median:.4f} [{f.q25:.4f}, {f.q75:.4f}] | "
            f"{f.mean:.4f} {_interval(f.ci_low, f.ci_high, '.4f')} | {delta} | "
            f"{verdict(d, m.higher_is_better)} | {reached} | {steps} | {secs} | "
            f"{time_verdict(a.time_versus_baseline)} |"
        )
    notes = [
        "",
        "Δ: mean paired difference; its interval is the sign-flip test inverted, so the "
        "verdict (p < 0.05) and the interval always agree. Final mean: BCa bootstrap "
        "interval. Median steps / seconds to target: shown only when more than half the "
        "runs reached it (an evaluated step; misses count as slower than any hit).",
    ]
    if unbounded:
        n = len(analysis.seeds)
        notes.append(
            f"An interval of ±inf: with {n} seeds the smallest possible p is "
            f"{2 / 2**n:.3g}, so no shift can be excluded at 95 %; use more seeds."
        )
    failures = [r for a in analysis.arms for r in a.failed]
    for r in failures:
        notes.append(f"\n{r.arm} seed {r.seed}: {r.status}{': ' + r.error if r.error else ''}")
    return "\n".join(lines + notes)


@contextlib.contextmanager
def _one_thread_here() -> Iterator[None]:
    """Keep this process's torch single-threaded while workers fork from it: OpenMP's
    thread pool, once started, does not survive a fork (see stagetrain.workers)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _resolve(
    curriculum: str | Path | CurriculumConfig | Curriculum,
    datasets: Mapping[str, Any] | None,
    models: Mapping[str, Any] | None,
) -> tuple[CurriculumConfig, dict[str, Any], dict[str, Any]]:
    if isinstance(curriculum, Curriculum):
        config = curriculum.config
        datasets = {**getattr(curriculum.sources, "datasets", {}), **(datasets or {})}
        models = {**getattr(curriculum.scorer, "models", {}), **(models or {})}
    elif isinstance(curriculum, CurriculumConfig):
        config = curriculum
    else:
        config = load_config(curriculum)
    return config, dict(datasets or {}), dict(models or {})


def compare(
    curriculum: str | Path | CurriculumConfig | Curriculum,
    out_dir: str | Path,
    *,
    arms: Sequence[str] | str = ("curriculum", "baseline"),
    seeds: int = 10,
    jobs: int = 1,
    metric: str | None = None,
    target: float | None = None,
    vary: Sequence[str] | str = VARY,
    datasets: Mapping[str, Any] | None = None,
    models: Mapping[str, Any] | None = None,
    threads: int | None = None,
    echo: Callable[[str], None] = print,
) -> Analysis:
    """Prepare, run (skipping finished runs) and analyse a comparison.

    Args:
        curriculum: a config file, a :class:`CurriculumConfig` or a :class:`Curriculum`
            (its in-memory datasets and reference models are used; on Linux the workers
            inherit them by fork, so nothing needs to be picklable).
        out_dir: the comparison directory (created; reused to resume).
        arms: arm names (see :mod:`stagetrain.arms`), each at most once.
        seeds: runs per arm.
        jobs: runs in parallel (worker processes).
        metric: ``EVAL.KEY`` compared (default: the first evaluation's accuracy, else loss).
        target: time-to-target threshold (default: the baseline's median final value).
        vary: what the seeds vary: ``init`` (weights, batch order), ``data`` (the seed
            data factories receive), or both.
        datasets: in-memory datasets named ``"@name"`` in the config.
        models: in-memory reference models for difficulty scorers.
        threads: torch threads per run (default: the machine's cores // ``jobs``).
        echo: receives one line per finished run.

    Raises:
        ConfigError: on invalid arguments, before anything is written.
        StageTrainError: when scipy or matplotlib is missing, before any training.
    """
    arm_names = parse_arms(arms)
    vary_names = parse_vary(vary)
    if seeds < 1:
        raise ConfigError(f"seeds: need at least one seed, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"jobs: need at least 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads: need at least 1, got {threads}")
    check_target(target)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file, not a directory; give --out a directory")
    require_report_extra()
    config, in_memory, reference_models = _resolve(curriculum, datasets, models)
    TargetMetric.parse(metric, produced_metrics(config))
    with _one_thread_here():
        spec, configs = prepare(
            config, out, arm_names, seeds, metric, vary=vary_names, target=target,
            datasets=in_memory, models=reference_models,
        )  # fmt: skip
        run_all(
            out, spec, configs, jobs=jobs, threads=threads, datasets=in_memory,
            models=reference_models, echo=echo,
        )  # fmt: skip
    return analyze(out, target=target)

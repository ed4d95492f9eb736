"""``compare()``: check the arguments, then prepare, run and analyse a comparison."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stagetrain.arms import parse_arms
from stagetrain.compare.analysis import Analysis, analyze
from stagetrain.compare.pool import run_all
from stagetrain.compare.runs import TargetMetric, produced_metrics
from stagetrain.compare.spec import VARY, check_target, parse_vary, prepare, require_report_extra
from stagetrain.config import CurriculumConfig, load_config
from stagetrain.curriculum import Curriculum
from stagetrain.errors import ConfigError


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

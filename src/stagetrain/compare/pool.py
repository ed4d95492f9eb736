"""Training every (arm, seed) of a comparison in the worker pool, skipping finished runs."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagetrain.checkpoint import atomic_write_text
from stagetrain.compare.runs import run_dir_of
from stagetrain.compare.spec import CompareSpec
from stagetrain.config import CurriculumConfig
from stagetrain.curriculum import Curriculum
from stagetrain.workers import Job, JobResult, default_threads, run_jobs


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
        handle_signals=True,  # the pool's SIGTERM on Ctrl-C: checkpoint, then stop
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
            # Any checkpoint file counts (a lost manifest is rebuilt from the sidecars).
            resume = any((run_dir / "checkpoints").glob("ckpt-*.pt"))
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

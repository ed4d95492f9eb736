"""Fixed cost per run of `stagetrain compare`: a process per run (before) vs the worker pool.

The demo curriculum (sparse parity, MLP 50-256-256-2) cut to one step per stage, so a
run is almost only its fixed cost: building the data and the model, two evaluations
on 4,000 test samples, two checkpoints, the run directory. Each (arm, seed) run is
trained three ways, the runs of one way back to back:

* ``subprocess`` — what `compare` did before: one ``python -m stagetrain.cli run``
  process per run (a fresh interpreter importing torch each time);
* ``pool`` — `compare`'s worker pool: persistent processes that call `fit` in-process;
* ``direct`` — the same runs called one after another in this process (no harness at
  all), the floor.

Reported per way and number of parallel jobs: wall seconds per run, and the harness
overhead = per-run wall minus the direct per-run wall (goal for the pool: <= 0.5 s).
Repetitions are interleaved and the median is reported. Every run uses one torch
thread (this process must stay single-threaded to fork the pool's workers, and the
direct runs happen in this process).

    python benchmarks/compare_overhead.py            # 2 arms x 4 seeds, jobs 1 and 2, 3 repetitions
    python benchmarks/compare_overhead.py --quick    # 2 arms x 2 seeds, jobs 1, 1 repetition
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml

from stagetrain import Curriculum, fit, parse_config

compare_module = sys.modules[
    "stagetrain.compare"
]  # the module (stagetrain.compare is the function)

RESULTS = Path(__file__).parent / "results"
ARMS = ["curriculum", "baseline"]


def one_step_demo() -> dict[str, Any]:
    config = yaml.safe_load((files("stagetrain.recipes") / "parity_demo.yaml").read_text())
    for stage in config["stages"]:
        stage["duration"] = "1ba"
    return config


def run_subprocesses(out: Path, spec: Any, jobs: int, threads: int) -> float:
    """The harness before the pool: one `stagetrain run` process per (arm, seed)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def one(arm: str, label: int, seed: int, data_seed: int) -> None:
        arm_config = yaml.safe_load((out / "arms" / f"{arm}.yaml").read_text())
        arm_config["data_seed"] = data_seed
        path = out / "arms" / f"{arm}-{label}.yaml"
        path.write_text(yaml.safe_dump(arm_config, sort_keys=False))
        command = [sys.executable, "-m", "stagetrain.cli", "run", str(path), "--seed", str(seed),
                   "--run-dir", str(out / "sub" / arm / f"seed-{label}"), "--no-progress"]  # fmt: skip
        subprocess.run(command, check=True, env=env, capture_output=True)

    runs = [(arm, *r) for r in zip(spec.seeds, spec.init_seeds, spec.data_seeds, strict=True)
            for arm in spec.arms]  # fmt: skip
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda r: one(*r), runs))
    return time.perf_counter() - start


def run_pool(out: Path, spec: Any, configs: dict[str, Any], jobs: int, threads: int) -> float:
    start = time.perf_counter()
    compare_module.run_all(out, spec, configs, jobs=jobs, threads=threads, echo=lambda _: None)
    return time.perf_counter() - start


def run_direct(out: Path, spec: Any, configs: dict[str, Any]) -> float:
    start = time.perf_counter()
    for label, seed, data_seed in zip(spec.seeds, spec.init_seeds, spec.data_seeds, strict=True):
        for arm in spec.arms:
            config = configs[arm].model_copy(update={"seed": seed, "data_seed": data_seed})
            curriculum = Curriculum(config, progress=False)
            fit(curriculum.build_model(), curriculum, run_dir=out / "direct" / arm / f"seed-{label}",
                teacher=curriculum.build_teacher(), progress=False)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "compare_overhead.json")
    args = parser.parse_args()
    seeds, job_counts, repetitions = (2, [1], 1) if args.quick else (4, [1, 2], 3)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)  # this process only prepares; it forks the pool's workers
    config = parse_config(one_step_demo())
    times: dict[tuple[str, int], list[float]] = {}
    ways = ["subprocess", "pool", "direct"]
    with tempfile.TemporaryDirectory() as tmp:
        # one untimed run first: this process's own first-use imports (torch._dynamo, ...)
        # are paid once by every way alike, not charged to whichever runs first
        warm, warm_configs = compare_module.prepare(config, Path(tmp) / "warm", ARMS[:1], 1, None)
        run_direct(Path(tmp) / "warm", warm, warm_configs)
        for rep in range(repetitions):
            for jobs in job_counts:
                threads = 1  # every way alike (see the module docstring)
                out = Path(tmp) / f"r{rep}-j{jobs}"
                spec, configs = compare_module.prepare(config, out, ARMS, seeds, None)
                n = len(spec.seeds) * len(spec.arms)
                for way in ways[rep % 3 :] + ways[: rep % 3]:  # interleaved order
                    if way == "direct" and jobs > 1:
                        continue  # the floor is sequential by definition
                    if way == "subprocess":
                        wall = run_subprocesses(out, spec, jobs, threads)
                    elif way == "pool":
                        wall = run_pool(out, spec, configs, jobs, threads)
                    else:
                        wall = run_direct(out, spec, configs)
                    times.setdefault((way, jobs), []).append(wall / n)
                    print(f"rep {rep} jobs {jobs} {way}: {wall / n:.3f} s per run", flush=True)
                shutil.rmtree(out)
    direct = statistics.median(times["direct", 1])
    rows = [
        {
            "way": way,
            "jobs": jobs,
            "runs": seeds * len(ARMS),
            "repetitions": len(values),
            "per_run_s": round(statistics.median(values), 3),
            "overhead_s": round(statistics.median(values) - direct, 3) if jobs == 1 else None,
        }
        for (way, jobs), values in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]
    machine = (
        f"{platform.system()} {platform.machine()}, {cores} CPU cores, no GPU, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    data = {"machine": machine, "quick": args.quick, "goal_overhead_s": 0.5,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    print(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()

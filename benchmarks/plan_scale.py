"""Plan and mixture-sampler cost against the stage length: 10^3 to 10^12 steps.

A two-source stage (weights 1 : 3, or 1 : a linear ramp 1 -> 0) of the tiny parity
curriculum: time and peak traced memory of ``make_plan``; time of the first batch at
a late step (a resume deep into the stage: the last step for constant weights, step
10^6 - 1 for the schedule); then the mean time per batch of 2,000 consecutive steps
(training's access pattern). For reference, the per-step
apportionment loop that stagetrain used before (kept here, not in the library) is
timed on the same mixture.

    python benchmarks/plan_scale.py            # up to 10^12 steps; the old loop at 10^4, 10^5
    python benchmarks/plan_scale.py --quick    # up to 10^9 steps; the old loop at 10^4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import tiny_config_dict

from stagetrain import Curriculum, make_plan, parse_config

DRAWS = 2000


def config(steps: int, scheduled: bool) -> dict[str, Any]:
    cfg = tiny_config_dict()
    stage = cfg["stages"][1]
    weight: Any = {"kind": "linear", "start": 1.0, "end": 0.0} if scheduled else 3.0
    stage["duration"] = f"{steps}ba"
    stage["data"] = {"sources": [stage["data"], {**cfg["stages"][0]["data"], "weight": weight}]}
    return cfg


def measured(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak


def legacy_apportion(
    weights: Sequence[Callable[[float], float]], batch: int, steps: int
) -> np.ndarray:
    """The loop stagetrain used before the closed form: one Python iteration per step."""
    n = len(weights)
    counts = np.empty((steps, n), dtype=np.int64)
    carry = np.zeros(n)
    for t in range(steps):
        w = np.array([max(float(f(t)), 0.0) for f in weights])
        share = w / w.sum()
        desired = batch * share + carry
        base = np.floor(desired).astype(np.int64)
        short = batch - int(base.sum())
        if short > 0:
            base[np.argsort(-(desired - base), kind="stable")[:short]] += 1
        counts[t] = base
        carry = desired - base
    return counts


def row(steps: int, scheduled: bool) -> dict[str, Any]:
    curriculum = Curriculum(parse_config(config(steps, scheduled)), progress=False)
    plan, plan_s, plan_peak = measured(lambda: make_plan(curriculum))
    sampler = curriculum.stages[1].sampler
    out: dict[str, Any] = {
        "weights": "1 : linear 1->0" if scheduled else "1 : 3",
        "steps": steps,
        "plan_s": round(plan_s, 4),
        "plan_peak_mib": round(plan_peak / 2**20, 2),
        "share": round(plan.stages[1].sources[0][1], 4),
    }
    # A resume deep into the stage: constant weights answer any step in O(1); scheduled
    # ones compute the cumulative counts up to the step once (here at most 10^6 steps in).
    deep = steps - 1 if not scheduled else min(steps, 10**6) - 1
    _, first_s, first_peak = measured(lambda: sampler.global_batch(deep))
    out["resume_step"] = deep
    out["resume_first_batch_ms"] = round(first_s * 1e3, 3)
    out["resume_peak_mib"] = round(first_peak / 2**20, 2)
    count = min(DRAWS, steps - 1 - deep) or min(DRAWS, deep)
    begin = deep + 1 if steps - 1 - deep else 0
    sampler.global_batch(begin)  # steady state: the block of these steps is cached
    start = time.perf_counter()
    for t in range(begin, begin + count):
        sampler.global_batch(t)
    out["us_per_batch"] = round((time.perf_counter() - start) / count * 1e6, 1)
    return out


def legacy_row(steps: int) -> dict[str, Any]:
    weights = [lambda t: 1.0, lambda t: 3.0]
    _, seconds, peak = measured(lambda: legacy_apportion(weights, 16, steps))
    return {"steps": steps, "seconds": round(seconds, 3), "us_per_step": round(seconds / steps * 1e6, 1),
            "peak_mib": round(peak / 2**20, 2)}  # fmt: skip


def markdown(data: dict[str, Any]) -> str:
    lines = [f"Machine: {data['machine']}.", "",
             "| weights | steps | `make_plan` s | plan peak MiB | share of source 1 | resume at step | first batch there, ms | its peak MiB | µs per batch after |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        lines.append(
            f"| {r['weights']} | {r['steps']:.0e} | {r['plan_s']:.4f} | {r['plan_peak_mib']:.2f} | {r['share']:.4f} | {r['resume_step']:,} | {r['resume_first_batch_ms']:.1f} | {r['resume_peak_mib']:.2f} | {r['us_per_batch']:.1f} |"
        )
    lines += ["", "The per-step loop used before (1 : 3, batch 16), which `plan` and every mixture sampler ran over the whole stage at construction:", "",
              "| steps | seconds | µs per step | peak MiB |", "|---|---|---|---|"]  # fmt: skip
    for r in data["legacy"]:
        lines.append(
            f"| {r['steps']:.0e} | {r['seconds']:.3f} | {r['us_per_step']:.1f} | {r['peak_mib']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lengths = [10**3, 10**6, 10**9] if args.quick else [10**3, 10**6, 10**9, 10**12]
    rows = []
    for scheduled in (False, True):
        for steps in lengths:
            rows.append(row(steps, scheduled))
            print(json.dumps(rows[-1]), flush=True)
    legacy = [legacy_row(n) for n in ([10**4] if args.quick else [10**4, 10**5])]
    for r in legacy:
        print(json.dumps(r), flush=True)
    machine = f"{platform.machine()}, 1 thread, torch {torch.__version__}, numpy {np.__version__}"
    data = {"machine": machine, "quick": args.quick, "rows": rows, "legacy": legacy}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "plan_scale-quick" if args.quick else "plan_scale"
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (args.out / f"{name}.md").write_text(markdown(data) + "\n")


if __name__ == "__main__":
    main()

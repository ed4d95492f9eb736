"""Sampler and scoring scale: build time, time per drawn batch and memory per sample at
10^6, 10^7 and 10^8 samples; scoring throughput against a plain no_grad forward pass;
the sampler's share of a training step.

    python benchmarks/sampler_scale.py            # 10^6, 10^7, 10^8 samples
    python benchmarks/sampler_scale.py --quick    # 10^6, 10^7
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagetrain.config import PacingConfig, SelectConfig
from stagetrain.data import TensorPairDataset
from stagetrain.difficulty import score_with_model, select_indices
from stagetrain.pacing import PacedSampler, ordering, pacing_function
from stagetrain.sampler import StageSampler
from stagetrain.schedules import constant

BATCH = 1024
DRAWS = 2000


def timed_build(build: Any) -> tuple[Any, float, int]:
    """Run ``build()``; return its result, seconds, and peak traced bytes (NumPy arrays)."""
    tracemalloc.start()
    start = time.perf_counter()
    result = build()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak


def draw_us(sampler: Any, steps: int) -> float:
    """Mean time of one global batch over DRAWS consecutive steps (training's access pattern),
    from a random starting step, permutation builds at epoch boundaries included."""
    first = int(np.random.default_rng(0).integers(0, steps - DRAWS))
    sampler.global_batch(first)  # a resume: the jump builds the current epoch's permutation
    start = time.perf_counter()
    for t in range(first + 1, first + 1 + DRAWS):
        sampler.global_batch(t)
    return (time.perf_counter() - start) / DRAWS * 1e6


def sampler_rows(n: int) -> list[dict[str, Any]]:
    steps = 10_000
    rows = []

    def plain() -> StageSampler:
        sampler = StageSampler([n], [constant(1.0)], BATCH, steps, seed=0, stage_index=0)
        sampler.global_batch(0)  # materialise the first epoch's permutation
        return sampler

    sampler, seconds, peak = timed_build(plain)
    resident = sum(p.nbytes for p in sampler._perm_cache.values())
    rows.append({"sampler": "shuffled epochs", "n": n, "build_s": round(seconds, 3),
                 "draw_us_per_batch": round(draw_us(sampler, steps), 1),
                 "resident_bytes_per_sample": round(resident / n, 2),
                 "build_peak_bytes_per_sample": round(peak / n, 2)})  # fmt: skip
    scores = np.random.default_rng(1).random(n, dtype=np.float32)

    def quantile_stage() -> StageSampler:
        keep = select_indices(scores, SelectConfig(quantiles=(0.0, 0.3)))
        sampler = StageSampler([len(keep)], [constant(1.0)], BATCH, steps, seed=0, stage_index=0)
        sampler.global_batch(0)
        return keep, sampler

    (keep, sampler), seconds, peak = timed_build(quantile_stage)
    resident = keep.nbytes + sum(p.nbytes for p in sampler._perm_cache.values())
    rows.append({"sampler": "easiest 30 % (quantile stage)", "n": n, "build_s": round(seconds, 3),
                 "draw_us_per_batch": round(draw_us(sampler, steps), 1),
                 "resident_bytes_per_sample": round(resident / n, 2),
                 "build_peak_bytes_per_sample": round(peak / n, 2)})  # fmt: skip

    def paced() -> PacedSampler:
        order = ordering(scores, "curriculum", 0, 0)
        pacing = pacing_function(PacingConfig(kind="linear", a=0.8, b=0.1), steps)
        return PacedSampler(order, pacing, BATCH, steps, seed=0, stage_index=0)

    sampler, seconds, peak = timed_build(paced)
    rows.append({"sampler": "paced (linear, sorted by difficulty)", "n": n, "build_s": round(seconds, 3),
                 "draw_us_per_batch": round(draw_us(sampler, steps), 1),
                 "resident_bytes_per_sample": round(sampler.order.nbytes / n, 2),
                 "build_peak_bytes_per_sample": round(peak / n, 2)})  # fmt: skip
    return rows


def scoring_row(n: int = 200_000) -> dict[str, Any]:
    torch.manual_seed(0)
    data = TensorPairDataset(torch.randn(n, 64), torch.randint(0, 10, (n,)))
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))

    @torch.no_grad()
    def plain() -> float:
        model.eval()
        start = time.perf_counter()
        for i in range(0, n, 1024):
            inputs, targets = data.get_batch(np.arange(i, min(i + 1024, n)))
            torch.nn.functional.cross_entropy(model(inputs), targets, reduction="none")
        return n / (time.perf_counter() - start)

    def ours() -> float:
        start = time.perf_counter()
        score_with_model(model, data, kind="loss", batch_size=1024, progress=False)
        return n / (time.perf_counter() - start)

    plain(), ours()  # warm-up
    pairs = [(plain(), ours()) for _ in range(5)]
    ratios = sorted(b / a for a, b in pairs)
    return {"n": n, "plain_forward_samples_per_s": round(float(np.median([a for a, _ in pairs]))),
            "scoring_samples_per_s": round(float(np.median([b for _, b in pairs]))),
            "ratio": round(ratios[len(ratios) // 2], 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "sampler_scale.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [10**6, 10**7] if args.quick else [10**6, 10**7, 10**8]
    rows = []
    for n in sizes:
        for row in sampler_rows(n):
            print(json.dumps(row))
            rows.append(row)
    scoring = scoring_row()
    print(json.dumps(scoring))
    machine = f"{platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}, numpy {np.__version__}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"machine": machine, "batch": BATCH, "samplers": rows, "scoring": scoring}, indent=1
        )
    )


if __name__ == "__main__":
    main()

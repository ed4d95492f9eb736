"""Sampler and scoring scale: build time, time per drawn batch and memory per sample at
10^6, 10^7 and 10^8 samples; scoring throughput against a plain no_grad forward pass;
the sampler's share of a training step. With ``--tokens``: the ``tokens`` source over
sparse token files of 10^7, 10^8 and 10^9 tokens (time per batch, resident memory).

    python benchmarks/sampler_scale.py            # 10^6, 10^7, 10^8 samples
    python benchmarks/sampler_scale.py --quick    # 10^6, 10^7
    python benchmarks/sampler_scale.py --tokens   # the tokens source only (results/tokens_scale.*)
"""

from __future__ import annotations

import argparse
import json
import os
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


TOKEN_BATCH = 32
TOKEN_SEQ_LEN = 1024


def rss_bytes() -> int:
    """Resident set size of this process (file-backed mapped pages included)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed_batches(read: Any, draws: list[np.ndarray]) -> tuple[float, int]:
    """Mean µs of ``read(indices)`` over ``draws``, and the resident set's growth meanwhile."""
    before = rss_bytes()
    start = time.perf_counter()
    for idx in draws:
        read(idx)
    return (time.perf_counter() - start) / len(draws) * 1e6, rss_bytes() - before


class KeptMapping:
    """The source's windows read through one mapping kept for good (the contrast)."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.view = np.lib.stride_tricks.sliding_window_view(
            data.files[0].mapped(), TOKEN_SEQ_LEN + 1
        )

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.view[self.data.window_starts(indices)[1]], dtype=np.int64)


def tokens_rows(sizes: list[int], batches: int, directory: Path) -> list[dict[str, Any]]:
    """The tokens source over sparse uint16 files of ``sizes`` tokens.

    For each size and mode, on a new sparse file (nothing of it in the page cache): build
    time; mean time of ``batches`` batches of TOKEN_BATCH windows at uniformly random
    indices (the worst case for locality; the stage sampler's own draw is measured above),
    first pass ("cold") and the same batches again ("warm"); the growth of the resident
    set over the first pass; the same for one mapping kept open for the whole pass (what
    replacing mappings avoids); and tracemalloc's peak during one batch (its buffers). A
    sparse file reads as zeros, but the kernel still gives every touched page a page-cache
    page and maps it, which is what the resident set counts.
    """
    from stagetrain.sources import tokens as token_module

    rows = []
    for n in sizes:
        for mode in ("sequential", "random"):
            path = directory / f"sparse-{n}-{mode}.bin"
            with path.open("wb") as f:
                f.truncate(2 * n)  # n uint16 tokens, no disk blocks
            start = time.perf_counter()
            data = token_module.tokens_source(
                files=str(path), dtype="uint16", seq_len=TOKEN_SEQ_LEN, mode=mode
            )
            build_s = time.perf_counter() - start
            rng = np.random.default_rng(0)
            draws = [rng.integers(0, len(data), TOKEN_BATCH) for _ in range(batches)]

            cold_us, growth = timed_batches(data.get_batch, draws)
            warm_us, _ = timed_batches(data.get_batch, draws)
            tracemalloc.start()
            data.get_batch(draws[0])
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            path.unlink()  # a new file: the kept mapping starts cold as well
            with path.open("wb") as f:
                f.truncate(2 * n)
            kept_us, kept_growth = timed_batches(KeptMapping(data), draws)
            path.unlink()
            rows.append({"tokens": n, "mode": mode, "windows": len(data),
                         "build_s": round(build_s, 4), "cold_us_per_batch": round(cold_us, 1),
                         "warm_us_per_batch": round(warm_us, 1),
                         "rss_growth_mib": round(growth / 2**20, 2),
                         "kept_mapping_us_per_batch": round(kept_us, 1),
                         "kept_mapping_rss_growth_mib": round(kept_growth / 2**20, 2),
                         "batch_peak_kib": round(peak / 1024, 1),
                         "sampler_index_mib": round(4 * len(data) / 2**20, 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def tokens_table(data: dict[str, Any]) -> str:
    lines = [
        f"Machine: {data['machine']}; batches of {data['batch']} windows of "
        f"{data['seq_len']} + 1 uint16 tokens at uniformly random indices, "
        f"{data['batches']} batches per row; sparse files, new for every row.",
        "",
        "| tokens | mode | windows | build s | µs/batch cold | µs/batch warm | RSS growth | "
        "one mapping kept: µs/batch, RSS growth | traced peak per batch | "
        "sampler index (4 B/window) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['tokens']:.0e} | {r['mode']} | {r['windows']:,} | {r['build_s']:.4f} | "
            f"{r['cold_us_per_batch']:,.0f} | {r['warm_us_per_batch']:,.0f} | "
            f"{r['rss_growth_mib']:.1f} MiB | {r['kept_mapping_us_per_batch']:,.0f}, "
            f"{r['kept_mapping_rss_growth_mib']:.1f} MiB | {r['batch_peak_kib']:.0f} KiB | "
            f"{r['sampler_index_mib']:,.1f} MiB |"
        )
    return "\n".join(lines)


def tokens_main(batches: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tokens-scale-") as directory:
        rows = tokens_rows([10**7, 10**8, 10**9], batches, Path(directory))
    machine = f"{platform.processor() or platform.machine()}, 1 thread, numpy {np.__version__}"
    data = {"machine": machine, "batch": TOKEN_BATCH, "seq_len": TOKEN_SEQ_LEN,
            "batches": batches, "rows": rows}  # fmt: skip
    results = Path(__file__).parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "tokens_scale.json").write_text(json.dumps(data, indent=1))
    (results / "tokens_scale.md").write_text(tokens_table(data) + "\n")
    print(tokens_table(data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", action="store_true", help="only the tokens source")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "sampler_scale.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.tokens:
        tokens_main(batches=200 if args.quick else 1000)
        return
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

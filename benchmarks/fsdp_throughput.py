"""FSDP vs DDP: training throughput and peak memory per rank, under torchrun.

Trains the GPT of ``stagetrain.recipes.gpt`` through ``stagetrain.fit`` (one stage, no
evaluation, one checkpoint at the end) once per setting and reports, per setting, the
tokens per second of the whole job after ``--warmup`` steps and each rank's peak
allocated CUDA memory (``torch.cuda.max_memory_allocated``; on CPU: not measured).

========== =====================================================================
setting    what it is
========== =====================================================================
ddp        DistributedDataParallel, ``precision: bf16`` (autocast)
fsdp       FSDP2 per block, ``mixed_precision: {param_dtype: bf16}``
fsdp-ac    as fsdp, with activation checkpointing per block
========== =====================================================================

    torchrun --standalone --nproc_per_node=8 benchmarks/fsdp_throughput.py   # GPUs, NCCL
    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_throughput.py --quick  # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import stagetrain
from stagetrain.recipes.gpt import gpt

SETTINGS: dict[str, dict[str, Any]] = {
    "ddp": {"precision": "bf16", "parallel": {"kind": "ddp"}},
    "fsdp": {"parallel": {"kind": "fsdp", "mixed_precision": {"param_dtype": "bf16"}}},
    "fsdp-ac": {
        "parallel": {
            "kind": "fsdp",
            "mixed_precision": {"param_dtype": "bf16"},
            "activation_checkpointing": True,
        }
    },
}


class Clock:
    """Step times (after a barrier-free ``synchronize``) and the peak memory of the run."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []

    def on_fit_start(self, run: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, run: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def make_config(
    setting: str, *, width: int, layers: int, heads: int, context: int, batch: int, steps: int
) -> dict[str, Any]:
    data = {
        "builtin": "stdlib_text",
        "name": "stdlib-train",
        "args": {"split": "train", "context": context},
    }
    return {
        "name": f"throughput-{setting}",
        "seed": 0,
        "batch_size": batch,
        "log_every": 10_000,
        "checkpoint": {"keep": 1},
        "model": {
            "builtin": "gpt",
            "args": {
                "vocab": 256,
                "context": context,
                "width": width,
                "layers": layers,
                "heads": heads,
            },
        },
        "stages": [
            {
                "name": "train",
                "duration": f"{steps}ba",
                "data": data,
                "optimizer": {"name": "adamw", "lr": 3e-4},
            }
        ],
        **SETTINGS[setting],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model: checks the script")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="global batch (sequences)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--settings", default="ddp,fsdp,fsdp-ac")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    width = args.width or (64 if args.quick else 1024)
    layers = args.layers or (2 if args.quick else 12)
    context = args.context or (64 if args.quick else 1024)
    batch = args.batch or (4 * world if args.quick else 8 * world)
    steps = args.steps or (8 if args.quick else 60)
    warmup = args.warmup or (2 if args.quick else 10)
    heads = max(1, width // 64)
    job = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
    shared = Path(tempfile.gettempdir()) / f"stagetrain-throughput-{job}"
    results: dict[str, Any] = {}
    try:
        for setting in args.settings.split(","):
            config = make_config(
                setting, width=width, layers=layers, heads=heads, context=context,
                batch=batch, steps=steps,
            )  # fmt: skip
            curriculum = stagetrain.Curriculum(stagetrain.parse_config(config))
            clock = Clock(warmup)
            stagetrain.fit(
                curriculum.build_model(), curriculum, run_dir=shared / setting,
                progress=False, tensorboard=False, callbacks=[clock],
            )  # fmt: skip
            timed = clock.times[warmup:]
            tokens = (len(timed) - 1) * batch * context
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            gathered: list[Any] = [None] * world
            if dist.is_initialized() and world > 1:
                dist.all_gather_object(gathered, peak)
            else:
                gathered = [peak]
            results[setting] = {
                "tokens_per_s": tokens / (timed[-1] - timed[0]),
                "peak_gib_per_rank": gathered,
            }
    finally:
        if rank == 0:
            shutil.rmtree(shared, ignore_errors=True)
    if rank != 0:
        return
    model = gpt(vocab=256, context=context, width=width, layers=layers, heads=heads)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    summary = {
        "machine": f"{platform.node()}: {world} x {device}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "world_size": world,
        "model": {
            "width": width,
            "layers": layers,
            "context": context,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "global_batch": batch,
        "steps": steps,
        "warmup": warmup,
        "settings": results,
    }
    print(json.dumps(summary, indent=1))
    for setting, row in results.items():
        peak = row["peak_gib_per_rank"]
        shown = "n/a" if peak[0] is None else f"{max(peak):.2f} GiB"
        print(f"{setting:8} {row['tokens_per_s']:>12,.0f} tokens/s   peak memory/rank {shown}")
    default = "fsdp_throughput-quick.json" if args.quick else "fsdp_throughput_gpu.json"
    out = args.out or Path(__file__).parent / "results" / default
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Checkpoint stall: how long training waits per checkpoint, synchronous vs asynchronous.

The small GPT of ``stagetrain.recipes.gpt`` trains two stages on byte windows of the
standard library and checkpoints every ``--every`` steps. For each store — sharded
(``parallel: fsdp``, ``torch.distributed.checkpoint``) and single-file (``ddp``) — and
each mode (``checkpoint.async_save`` false / true) the script times every call of the
loop's checkpoint step (``Runner.checkpoint``: RNG gather, state capture, the write, or,
asynchronously, the copy to host memory and the hand-off to the writer thread) and the
final wait for the last background write. Modes are interleaved over ``--repeats``.
Reported: the median stall per checkpoint, and async / sync.

    python benchmarks/checkpoint_stall.py            # width 512, 4 layers (~13M parameters)
    python benchmarks/checkpoint_stall.py --quick    # width 256, 2 layers, 2 repeats
    torchrun --nproc_per_node=2 benchmarks/checkpoint_stall.py --quick   # sharded over 2 ranks
    python benchmarks/checkpoint_stall.py --render benchmarks/results/checkpoint_stall.json

The checkpoint interval is long enough for a background write to finish before the
next one (otherwise the next checkpoint waits for it, and that wait is counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import stagetrain
from stagetrain.recipes.gpt import gpt
from stagetrain.train import runner as runner_module


def make_config(
    kind: str, asynchronous: bool, *, width: int, layers: int, steps: int, every: int
) -> dict[str, Any]:
    train = {
        "builtin": "stdlib_text",
        "name": "stdlib-train",
        "args": {"split": "train", "context": 64, "limit": 4096},
    }
    half = steps // 2
    return {
        "name": "stall",
        "seed": 0,
        "batch_size": 8,
        "log_every": 1000,
        "checkpoint": {"every": f"{every}ba", "keep": 2, "async_save": asynchronous},
        "model": {
            "builtin": "gpt",
            "args": {"vocab": 256, "context": 64, "width": width, "layers": layers, "heads": 4},
        },
        "stages": [
            {
                "name": "short",
                "duration": f"{half}ba",
                "seq_len": 32,
                "data": train,
                "optimizer": {"name": "adamw", "lr": 1e-3},
            },
            {"name": "long", "duration": f"{steps - half}ba", "seq_len": 64, "data": train},
        ],
        "parallel": {"kind": kind},
    }


def timed_run(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train once; the stall of every checkpoint call and of the final wait, in seconds."""
    stalls: list[float] = []
    original = runner_module.Runner.checkpoint

    def checkpoint(self: Any, stage: Any) -> None:
        started = time.perf_counter()
        original(self, stage)
        stalls.append(time.perf_counter() - started)

    waits: list[float] = []
    original_run = runner_module.Runner.run

    def run(self: Any) -> bool:
        wait = self.store.wait

        def timed_wait() -> None:
            started = time.perf_counter()
            wait()
            waits.append(time.perf_counter() - started)

        self.store.wait = timed_wait
        return original_run(self)

    runner_module.Runner.checkpoint = checkpoint  # type: ignore[method-assign]
    runner_module.Runner.run = run  # type: ignore[method-assign]
    try:
        curriculum = stagetrain.Curriculum(stagetrain.parse_config(config))
        model = curriculum.build_model()
        started = time.perf_counter()
        stagetrain.fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False)
        wall = time.perf_counter() - started
    finally:
        runner_module.Runner.checkpoint = original  # type: ignore[method-assign]
        runner_module.Runner.run = original_run  # type: ignore[method-assign]
        if dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            dist.destroy_process_group()  # one-process FSDP made its own group
    return {"stalls": stalls, "final_wait": sum(waits), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 2 repeats")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--every", type=int, default=None, help="checkpoint interval in steps")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--kinds", default="fsdp,ddp", help="stores to measure (fsdp, ddp)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--render", type=Path, default=None, help="only write the Markdown table of this JSON"
    )
    args = parser.parse_args()
    if args.render is not None:
        summary = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(
            markdown(summary, quick="quick" in args.render.name) + "\n"
        )
        return
    width = args.width or (256 if args.quick else 512)
    layers = args.layers or (2 if args.quick else 4)
    steps = args.steps or (40 if args.quick else 60)
    every = args.every or (10 if args.quick else 15)
    repeats = args.repeats or (2 if args.quick else 3)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    results: dict[str, dict[str, list[Any]]] = {}
    # One directory for every rank of the job (sharded checkpoints are written together).
    job = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
    shared = Path(tempfile.gettempdir()) / f"stagetrain-stall-{job}"
    try:
        for repeat in range(repeats):
            for kind in args.kinds.split(","):
                for asynchronous in (False, True):
                    name = f"{kind}-{'async' if asynchronous else 'sync'}"
                    config = make_config(
                        kind, asynchronous, width=width, layers=layers, steps=steps, every=every
                    )
                    out = timed_run(config, shared / f"{name}-{repeat}")
                    entry = results.setdefault(name, {"stalls": [], "final_wait": [], "wall": []})
                    entry["stalls"].extend(out["stalls"])
                    entry["final_wait"].append(out["final_wait"])
                    entry["wall"].append(out["wall"])
    finally:
        if rank == 0:
            shutil.rmtree(shared, ignore_errors=True)
    if rank != 0:
        return
    model = gpt(vocab=256, context=64, width=width, layers=layers, heads=4)
    params = sum(p.numel() for p in model.parameters())
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}",
        "torch": torch.__version__,
        "world_size": world,
        "model": {"width": width, "layers": layers, "parameters": params},
        "steps": steps,
        "every": every,
        "repeats": repeats,
        "modes": {},
    }
    for name, entry in results.items():
        summary["modes"][name] = {
            "checkpoints": len(entry["stalls"]),
            "median_stall_ms": 1000 * statistics.median(entry["stalls"]),
            "mean_stall_ms": 1000 * statistics.fmean(entry["stalls"]),
            "final_wait_ms": 1000 * statistics.median(entry["final_wait"]),
            "median_wall_s": statistics.median(entry["wall"]),
        }
    print(f"{params:,} parameters, world size {world}, {summary['machine']}")
    print(f"{'mode':12} {'checkpoints':>11} {'median stall':>13} {'mean stall':>11}")
    for name, row in summary["modes"].items():
        print(
            f"{name:12} {row['checkpoints']:>11} {row['median_stall_ms']:>10.1f} ms"
            f" {row['mean_stall_ms']:>8.1f} ms"
        )
    for kind in args.kinds.split(","):
        sync, asyn = summary["modes"][f"{kind}-sync"], summary["modes"][f"{kind}-async"]
        ratio = asyn["median_stall_ms"] / sync["median_stall_ms"]
        summary[f"{kind}_async_over_sync"] = ratio
        print(f"{kind}: async stall / sync stall = {ratio:.1%} (goal <= 10 %)")
    default = "checkpoint_stall-quick.json" if args.quick else "checkpoint_stall.json"
    out_path = args.out or Path(__file__).parent / "results" / default
    out_path.write_text(json.dumps(summary, indent=1) + "\n")
    out_path.with_suffix(".md").write_text(markdown(summary, quick=args.quick) + "\n")
    print(f"wrote {out_path} and {out_path.with_suffix('.md').name}")


def markdown(summary: dict[str, Any], *, quick: bool) -> str:
    """The table benchmarks/README.md shows (``<!-- insert checkpoint_stall -->``)."""
    model = summary["model"]
    lines = [
        f"GPT width {model['width']}, {model['layers']} blocks ({model['parameters']:,} "
        f"parameters), world size {summary['world_size']}, a checkpoint every "
        f"{summary['every']} of {summary['steps']} steps, {summary['repeats']} interleaved "
        f"repeats{' (--quick)' if quick else ''}; {summary['machine']}, torch "
        f"{summary['torch']}.",
        "",
        "| store | mode | checkpoints | median stall | mean stall | final wait | async / sync |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["modes"].items():
        kind, mode = name.split("-")
        ratio = summary.get(f"{kind}_async_over_sync") if mode == "async" else None
        lines.append(
            f"| {'sharded (fsdp)' if kind == 'fsdp' else 'single file (ddp)'} | {mode} | "
            f"{row['checkpoints']} | {row['median_stall_ms']:.1f} ms | "
            f"{row['mean_stall_ms']:.1f} ms | {row['final_wait_ms']:.1f} ms | "
            f"{'' if ratio is None else f'{ratio:.1%}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

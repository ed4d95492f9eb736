"""Loop overhead: stagetrain's two-stage `fit` against a minimal hand-written PyTorch loop.

Both train the same model on the same data with the same batch size, optimizer and
seed and read the loss back every 100 steps; stagetrain also writes JSONL and
TensorBoard logs (every 100 steps) and checkpoints (every 1000 steps and at each stage
end). Neither evaluates, so the ratio measures the loop alone. A and B runs are
interleaved, and the ratio of their samples per second is reported per setting. Small
models make any overhead visible.

    python benchmarks/loop_overhead.py              # full: 7 pairs x 3000 steps per setting
    python benchmarks/loop_overhead.py --quick      # 2 pairs x 600 steps, the default settings only

A second workload is a ``transformers`` GPT-2 (2 layers, width 64) on dict batches
(``input_ids``, ``attention_mask``, ``labels``) of byte windows of the standard
library, trained on its own loss (``loss: model``): the path a Hugging Face user takes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import stagetrain
from stagetrain.recipes.models import mlp
from stagetrain.recipes.parity import parity_dataset


def make_config(
    steps: int, *, batch: int, hidden: int, extra: dict[str, Any]
) -> stagetrain.CurriculumConfig:
    half = steps // 2
    accum = extra.get("grad_accum", 1)
    extra = {k: v for k, v in extra.items() if k != "grad_accum"}
    data = {"n_bits": 50, "k": 5, "size": 100_000}
    return stagetrain.parse_config(
        {
            "name": "overhead",
            "seed": 0,
            "batch_size": batch,
            "log_every": 100,
            "checkpoint": {"every": "1000ba", "keep": 2},
            "model": {
                "builtin": "mlp",
                "args": {"in_features": 50, "hidden": [hidden, hidden], "out_features": 2},
            },
            "stages": [
                {
                    "name": "easy",
                    "grad_accum": accum,
                    "duration": f"{half}ba",
                    "data": {"builtin": "parity", "name": "biased", "args": {**data, "bias": 0.75}},
                    "optimizer": {"name": "adam", "lr": 1e-3},
                },
                {
                    "name": "target",
                    "grad_accum": accum,
                    "duration": f"{steps - half}ba",
                    "data": {"builtin": "parity", "name": "uniform", "args": data},
                },
            ],
            **extra,
        }
    )


DEVICE = torch.device("cpu")


def hand_written(steps: int, batch: int, hidden: int, extra: dict[str, Any] | None = None) -> float:
    """The A side: the plainest loop that trains the same thing. Returns samples/second."""
    extra = extra or {}
    accum = extra.get("grad_accum", 1)
    bf16 = extra.get("precision") == "bf16"
    torch.manual_seed(0)
    model = mlp(in_features=50, hidden=[hidden, hidden], out_features=2).to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if extra.get("compile") else model
    easy = parity_dataset(n_bits=50, k=5, size=100_000, bias=0.75, seed=0)
    target = parity_dataset(n_bits=50, k=5, size=100_000, seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(steps):
        data = easy if step < steps // 2 else target
        inputs, targets = data.get_batch(rng.integers(0, len(data), batch))
        inputs, targets = (
            inputs.to(DEVICE, non_blocking=True),
            targets.to(DEVICE, non_blocking=True),
        )
        for x, y in zip(inputs.chunk(accum), targets.chunk(accum), strict=True):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(forward(x), y) / accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            loss.item()  # what any loop does to print progress
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def through_stagetrain(steps: int, batch: int, hidden: int, extra: dict[str, Any]) -> float:
    """The B side: a two-stage curriculum through `fit`, logging and checkpointing."""
    config = make_config(steps, batch=batch, hidden=hidden, extra=extra)
    curriculum = stagetrain.Curriculum(config, progress=False)
    model = curriculum.build_model()
    with tempfile.TemporaryDirectory() as tmp:
        result = stagetrain.fit(
            model, curriculum, run_dir=Path(tmp) / "run", progress=False, device=DEVICE
        )
    return result.state.samples / result.state.elapsed_s


class DictWindows:
    """Byte windows of the standard library as dict batches, the Hugging Face way."""

    def __init__(self, context: int) -> None:
        from stagetrain.recipes.pystdlib import corpus

        data = torch.from_numpy(corpus("train")[:2_000_000].astype(np.int64))
        self.windows = data[: (len(data) // context) * context].reshape(-1, context)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.get_batch(np.array([index]))

    def get_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        ids = self.windows[torch.from_numpy(np.asarray(indices, dtype=np.int64))]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def tiny_gpt2() -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def gpt2_hand_written(steps: int, batch: int, data: DictWindows) -> float:
    model = tiny_gpt2().to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(steps):
        rows = data.get_batch(rng.integers(0, len(data), batch))
        rows = {k: v.to(DEVICE, non_blocking=True) for k, v in rows.items()}
        loss = model(**rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            loss.item()
    return steps * batch / (time.perf_counter() - start)


def gpt2_through_stagetrain(steps: int, batch: int, data: DictWindows) -> float:
    half = steps // 2
    config = stagetrain.parse_config(
        {
            "name": "overhead-gpt2", "seed": 0, "batch_size": batch, "log_every": 100,
            "checkpoint": {"every": "1000ba", "keep": 2},
            "stages": [
                {"name": "a", "duration": f"{half}ba", "data": "@text", "loss": "model",
                 "optimizer": {"name": "adam", "lr": 1e-3}},
                {"name": "b", "duration": f"{steps - half}ba", "data": "@text"},
            ],
        }
    )  # fmt: skip
    curriculum = stagetrain.Curriculum(config, datasets={"text": data}, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = stagetrain.fit(
            tiny_gpt2(), curriculum, run_dir=Path(tmp) / "run", progress=False, device=DEVICE
        )
    return result.state.samples / result.state.elapsed_s


def gpt2_rows(quick: bool) -> list[dict[str, Any]]:
    """The dict-batch GPT-2 setting: interleaved pairs, like the MLP settings."""
    steps, pairs, batch = (200, 2, 8) if quick else (1000, 7, 8)
    data = DictWindows(context=64)
    gpt2_hand_written(50, batch, data)
    gpt2_through_stagetrain(50, batch, data)
    a_runs, b_runs = [], []
    for _ in range(pairs):
        a_runs.append(gpt2_hand_written(steps, batch, data))
        b_runs.append(gpt2_through_stagetrain(steps, batch, data))
    ratios = sorted(b / a for a, b in zip(a_runs, b_runs, strict=True))
    return [
        {
            "model": "GPT-2 2x64 (transformers), dict batches, loss: model",
            "batch": batch,
            "setting": "default",
            "steps": steps,
            "pairs": pairs,
            "hand_written_samples_per_s": round(statistics.median(a_runs)),
            "stagetrain_samples_per_s": round(statistics.median(b_runs)),
            "ratio_B_over_A": round(statistics.median(ratios), 3),
            "pair_ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
        }
    ]


SETTINGS = {
    "default": {},
    "grad_accum=4": {"grad_accum": 4},
    "bf16 autocast": {"precision": "bf16"},
    "torch.compile": {"compile": True},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU version")
    parser.add_argument(
        "--sizes", default="64x64,256x256", help="HIDDENxBATCH pairs, comma-separated"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "loop_overhead.json"
    )
    parser.add_argument(
        "--workloads", default="mlp,gpt2", help="comma-separated: mlp, gpt2 (default: both)"
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    quick = args.quick
    steps, pairs = (600, 2) if quick else (3000, 7)
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    rows = []
    sizes = [tuple(int(v) for v in pair.split("x")) for pair in args.sizes.split(",")]
    workloads = args.workloads.split(",")
    for hidden, batch in sizes if "mlp" in workloads else []:
        for name, extra in SETTINGS.items():
            a_runs, b_runs = [], []
            if quick and name != "default":
                continue
            hand_written(100, batch, hidden, extra)  # warm-up: allocator, kernels, compile cache
            through_stagetrain(100, batch, hidden, extra)
            for _ in range(pairs):  # interleaved A, B, A, B, ...
                a_runs.append(hand_written(steps, batch, hidden, extra))
                b_runs.append(through_stagetrain(steps, batch, hidden, extra))
            a, b = statistics.median(a_runs), statistics.median(b_runs)
            # Each B run is compared with the A run just before it: machine noise that
            # drifts over minutes cancels within a pair.
            pair_ratios = sorted(bb / aa for aa, bb in zip(a_runs, b_runs, strict=True))
            row = {
                "model": f"MLP 50-{hidden}-{hidden}-2",
                "batch": batch,
                "setting": name,
                "steps": steps,
                "pairs": pairs,
                "hand_written_samples_per_s": round(a),
                "stagetrain_samples_per_s": round(b),
                "ratio_B_over_A": round(statistics.median(pair_ratios), 3),
                "pair_ratio_range": [round(pair_ratios[0], 3), round(pair_ratios[-1], 3)],
            }
            rows.append(row)
            print(json.dumps(row))
    if "gpt2" in workloads:
        for row in gpt2_rows(quick):
            rows.append(row)
            print(json.dumps(row))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared "
        f"with other jobs), {torch.get_num_threads()} torch thread, torch {torch.__version__}"
    )
    command = "python benchmarks/loop_overhead.py" + " ".join(["", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()

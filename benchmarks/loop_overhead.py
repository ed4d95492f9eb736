"""Loop overhead: stagetrain's two-stage `fit` against a minimal hand-written PyTorch loop.

Both train the same model on the same data with the same batch size, optimizer and
seed and read the loss back every 100 steps; stagetrain also writes JSONL and
TensorBoard logs (every 100 steps) and checkpoints (every 1000 steps and at each stage
end). Neither evaluates, so the ratio measures the loop alone. A and B runs are
interleaved, and the ratio of their samples per second is reported per setting. Small
models make any overhead visible.

    python benchmarks/loop_overhead.py              # full: 3 pairs x 3000 steps per setting
    python benchmarks/loop_overhead.py --quick      # 2 pairs x 600 steps, the default settings only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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
                    "duration": f"{half}ba",
                    "data": {"builtin": "parity", "name": "biased", "args": {**data, "bias": 0.75}},
                    "optimizer": {"name": "adam", "lr": 1e-3},
                },
                {
                    "name": "target",
                    "duration": f"{steps - half}ba",
                    "data": {"builtin": "parity", "name": "uniform", "args": data},
                },
            ],
            **extra,
        }
    )


def hand_written(steps: int, batch: int, hidden: int) -> float:
    """The A side: the plainest loop that trains the same thing. Returns samples/second."""
    torch.manual_seed(0)
    model = mlp(in_features=50, hidden=[hidden, hidden], out_features=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    easy = parity_dataset(n_bits=50, k=5, size=100_000, bias=0.75, seed=0)
    target = parity_dataset(n_bits=50, k=5, size=100_000, seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(steps):
        data = easy if step < steps // 2 else target
        inputs, targets = data.get_batch(rng.integers(0, len(data), batch))
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            loss.item()  # what any loop does to print progress
    return steps * batch / (time.perf_counter() - start)


def through_stagetrain(steps: int, batch: int, hidden: int, extra: dict[str, Any]) -> float:
    """The B side: a two-stage curriculum through `fit`, logging and checkpointing."""
    config = make_config(steps, batch=batch, hidden=hidden, extra=extra)
    curriculum = stagetrain.Curriculum(config, progress=False)
    model = curriculum.build_model()
    with tempfile.TemporaryDirectory() as tmp:
        result = stagetrain.fit(model, curriculum, run_dir=Path(tmp) / "run", progress=False)
    return result.state.samples / result.state.elapsed_s


SETTINGS = {
    "default": {},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "loop_overhead.json"
    )
    args = parser.parse_args()
    steps, pairs = (600, 2) if args.quick else (3000, 3)
    torch.set_num_threads(1)
    rows = []
    for hidden, batch in [(64, 64), (256, 256)]:
        for name, extra in SETTINGS.items():
            a_runs, b_runs = [], []
            hand_written(100, batch, hidden)  # warm-up: allocator, kernels
            for _ in range(pairs):  # interleaved A, B, A, B, ...
                a_runs.append(hand_written(steps, batch, hidden))
                b_runs.append(through_stagetrain(steps, batch, hidden, extra))
            a, b = statistics.median(a_runs), statistics.median(b_runs)
            row = {
                "model": f"MLP 50-{hidden}-{hidden}-2",
                "batch": batch,
                "setting": name,
                "steps": steps,
                "pairs": pairs,
                "hand_written_samples_per_s": round(a),
                "stagetrain_samples_per_s": round(b),
                "ratio_B_over_A": round(b / a, 3),
            }
            rows.append(row)
            print(json.dumps(row))
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
        f"torch {torch.__version__}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

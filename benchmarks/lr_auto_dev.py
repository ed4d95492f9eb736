"""The development set of ``lr: auto``'s rules: where the best LR of a stage lies, and
which search rules find it — on tasks disjoint from the evaluation (benchmarks/lr_auto.py).

    python benchmarks/lr_auto_dev.py sweep [--tasks shapes,addition,teacher,noisy-regression] [--seeds 2]
    python benchmarks/lr_auto_dev.py report      # results/lr_auto_dev.{json,md} from the sweeps
    python benchmarks/lr_auto_dev.py check       # the library's current defaults, for real

Development tasks: examples/shapes.yaml (SGD + momentum, 2 stages), examples/addition.yaml
(Adam, GRU, 4 stages) and two synthetic ones of benchmarks/dev_tasks.py (a small MLP with
Adam on noisy labels; linear regression with label noise, SGD). None of the evaluation
recipes (noisy-digits, parity, charlm) is used here.

``sweep``: for every stage of a task and a seed, from the stage's real starting point (the
earlier stages trained at the recipe's hand-set LR), the stage is trained at each LR of a
grid (the hand LR x 2^k, k = -6 ... 5) at a constant LR for the stage's whole length on
the search's own batches (the stage's data less the search's held-out slice), and the
held-out loss is recorded at horizons from 0.5 % to 100 % of the stage: the loss surface
L(LR, horizon). Beside it, the range test the search runs (the current defaults' ramp).

``report``: (1) the best LR against the horizon (the short-horizon bias, measured), and
(2) rule variants of the search simulated on the surfaces — range-test anchor, candidate
ladder, trial length — each scored by the *regret* of its choice at the full stage: the
held-out loss at the stage's end with the chosen LR (log-linear interpolation between
grid LRs) above the grid's best, as a fraction of the improvement the best LR makes over
the stage's start. ``check``: the library's search (its current defaults) from the same
starting points, for real, with the regret of its choice on the same surfaces.

Runs are kept under runs/bench/lr-auto-dev/ (a rerun skips finished stages).
Machine: 2 shared CPU cores, no GPU; one torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from stagetrain import Curriculum, parse_config
from stagetrain.config import AutoLRConfig
from stagetrain.handoff import enter_stage, trainable_flags
from stagetrain.lr_search import LocalBackend, SearchData, pick_lr, search_lr
from stagetrain.lr_search.results import _Snapshot
from stagetrain.lr_search.rules import _margin, _start_level, smooth
from stagetrain.optim import apply_lr
from stagetrain.seeding import derive_seed

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "bench" / "lr-auto-dev"
RESULTS = Path(__file__).parent / "results"
GRID = list(range(-6, 6))
"""The swept LRs: the stage's hand LR x 2^k."""
FRACTIONS = [0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125,
             0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # fmt: skip
"""Horizons (fractions of the stage) at which the held-out loss is recorded."""
FIXED = [3, 5, 10, 20, 40, 80]
"""Horizons in steps, for fixed-length trials."""
RANGE_LENGTHS = [25, 50, 100, 200]
"""Range tests recorded (steps of the ramp from 1e-6 to 1)."""


def _teacher_config() -> dict[str, Any]:
    return {
        "name": "teacher", "seed": 0, "batch_size": 64,
        "model": {"builtin": "mlp", "args": {"in_features": 32, "hidden": [128], "out_features": 10}},
        "evals": [{"name": "valid", "data": {"factory": "dev_tasks:teacher",
                                             "args": {"size": 4000, "noise": 0.0, "split": "valid"}}}],
        "stages": [
            {"name": "cleaner", "duration": "400ba",
             "data": {"factory": "dev_tasks:teacher", "name": "noise-10%", "args": {"noise": 0.1}},
             "optimizer": {"name": "adam", "lr": 1e-3}},
            {"name": "noisier", "duration": "800ba",
             "data": {"factory": "dev_tasks:teacher", "name": "noise-30%",
                      "args": {"noise": 0.3, "split": "test"}}},
        ],
    }  # fmt: skip


def _regression_config() -> dict[str, Any]:
    return {
        "name": "noisy-regression", "seed": 0, "batch_size": 32,
        "model": {"builtin": "mlp", "args": {"in_features": 16, "hidden": [], "out_features": 1}},
        "stages": [
            {"name": "regression", "duration": "1000ba", "loss": "mse",
             "data": {"factory": "dev_tasks:noisy_regression", "name": "regression"},
             "optimizer": {"name": "sgd", "lr": 0.05}},
        ],
    }  # fmt: skip


def _yaml(name: str) -> Any:
    return lambda: yaml.safe_load((ROOT / "examples" / name).read_text())


TASKS = {
    "shapes": _yaml("shapes.yaml"),
    "addition": _yaml("addition.yaml"),
    "teacher": _teacher_config,
    "noisy-regression": _regression_config,
}


# --- sweeps ----------------------------------------------------------------------------------


def held_out(stage: Any, backend: LocalBackend, data: SearchData) -> float:
    """The stage's mean loss on the search's held-out slice (as the search scores it)."""
    total, chunk = 0.0, stage.batch_size
    for start in range(0, len(data.holdout), chunk):
        total += float(backend.eval_sum(stage.fetch(data.holdout[start : start + chunk])))
    return total / len(data.holdout)


def horizons(steps: int) -> list[int]:
    return sorted({max(1, round(f * steps)) for f in FRACTIONS} | {h for h in FIXED if h < steps})


def sweep_stage(
    stage: Any, model: torch.nn.Module, optimizer: Any, seed: int, hand: float
) -> dict[str, Any]:
    backend = LocalBackend(stage, model, optimizer)
    snapshot = _Snapshot(model, optimizer, backend)
    cfg = AutoLRConfig()
    data = SearchData(stage, cfg, seed, stage.steps)
    points = horizons(stage.steps)
    start = held_out(stage, backend, data)
    surface: dict[str, dict[str, float | None]] = {}
    for k in GRID:
        lr = hand * 2.0**k
        snapshot.restore()
        torch.manual_seed(derive_seed(seed, "dev", stage.index, k))
        apply_lr(optimizer, lr)
        curve: dict[str, float | None] = {}
        for step in range(stage.steps):
            loss = float(backend.train_step([stage.fetch(data.batch(step))]))
            if not math.isfinite(loss):
                break
            if step + 1 in points:
                value = held_out(stage, backend, data)
                if not math.isfinite(value) or value > cfg.divergence * start:
                    break  # diverged: the later horizons stay missing
                curve[str(step + 1)] = value
        surface[repr(lr)] = curve
    # The range test of the search (its ramp and stopping rule), without trials, at
    # several lengths.
    ranges = {}
    for length in RANGE_LENGTHS:
        if length + 1 > stage.steps:
            continue
        snapshot.restore()
        probe = AutoLRConfig(range_steps=length, candidates=1, trial_steps=1)
        result = search_lr(stage, model, optimizer, backend, seed=seed, cfg=probe)
        ranges[str(length)] = {"lrs": result.range_lrs, "losses": result.range_losses}
    snapshot.restore()
    return {
        "stage": stage.name,
        "index": stage.index,
        "steps": stage.steps,
        "hand_lr": hand,
        "optimizer": stage.config.optimizer.label,  # type: ignore[union-attr]
        "start": start,
        "surface": surface,
        "ranges": ranges,
    }


def train_hand(stage: Any, model: torch.nn.Module, optimizer: Any) -> None:
    """The stage at its hand-set LR on its own stream: the next stage's starting point."""
    backend = LocalBackend(stage, model, optimizer)
    for step in range(stage.steps):
        apply_lr(optimizer, stage.lr(step))
        backend.train_step([stage.batch(step)])


def task_config(task: str, seed: int) -> dict[str, Any]:
    config = TASKS[task]()
    return {**config, "seed": seed, "data_seed": seed}


def stage_starts(task: str, seed: int, on_stage: Any) -> None:
    """Calls ``on_stage(stage, model, optimizer, hand_lr)`` at every stage's start."""
    curriculum = Curriculum(parse_config(task_config(task, seed)), progress=False)
    torch.manual_seed(seed)
    model = curriculum.build_model()
    flags = trainable_flags(model)
    optimizer = None
    for stage in curriculum.stages:
        optimizer = enter_stage(stage.config, stage.index, model, optimizer, flags)
        hand = float(stage.config.optimizer.lr)  # type: ignore[union-attr, arg-type]
        on_stage(stage, model, optimizer, hand)
        if stage.index < len(curriculum.stages) - 1:
            train_hand(stage, model, optimizer)


def sweep(task: str, seed: int) -> None:
    path = RUNS / f"{task}-seed{seed}.json"
    done: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"stages": []}
    finished = {s["stage"] for s in done["stages"]}

    def on_stage(stage: Any, model: Any, optimizer: Any, hand: float) -> None:
        if stage.name in finished:
            return
        started = time.perf_counter()
        entry = sweep_stage(stage, model, optimizer, seed, hand)
        entry["wall_s"] = time.perf_counter() - started
        done["stages"].append(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done))
        print(f"  {task} seed {seed} stage {stage.name}: {entry['wall_s']:.0f} s", flush=True)

    stage_starts(task, seed, on_stage)


# --- rules simulated on the surfaces -----------------------------------------------------------


@dataclass
class Surface:
    """One stage's L(LR, horizon) on the grid."""

    lrs: np.ndarray
    steps: int
    start: float
    table: dict[int, np.ndarray]
    """horizon (steps) -> held-out loss per grid LR (nan: diverged)."""

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Surface:
        lrs = np.array([float(k) for k in entry["surface"]])
        points = horizons(entry["steps"])
        table = {
            h: np.array([entry["surface"][k].get(str(h), np.nan) for k in entry["surface"]])
            for h in points
        }
        return cls(lrs, entry["steps"], entry["start"], table)

    def horizon(self, steps: int) -> int:
        """The recorded horizon nearest to ``steps``."""
        return min(self.table, key=lambda h: abs(math.log(h / max(steps, 1))))

    def loss(self, lr: float, steps: int) -> float:
        """L(lr, steps): linear in log(LR) between grid LRs; nan when a neighbour diverged
        (beyond the grid: the nearest grid LR)."""
        row = self.table[self.horizon(steps)]
        x = np.log(self.lrs)
        t = math.log(lr)
        if t <= x[0]:
            return float(row[0])
        if t >= x[-1]:
            return float(row[-1])
        i = int(np.searchsorted(x, t)) - 1
        w = (t - x[i]) / (x[i + 1] - x[i])
        return float((1 - w) * row[i] + w * row[i + 1])

    def best(self, steps: int | None = None) -> tuple[float, float]:
        row = self.table[self.horizon(steps or self.steps)]
        i = int(np.nanargmin(row))
        return float(self.lrs[i]), float(row[i])

    def regret(self, lr: float) -> float:
        """Excess final loss of ``lr`` over the grid's best, as a share of the best's gain."""
        _, low = self.best()
        value = self.loss(lr, self.steps)
        if not math.isfinite(value):
            return 1.0
        return max(value - low, 0.0) / max(self.start - low, 1e-12)


@dataclass
class Variant:
    """A search rule: the range test's anchor, the candidate ladder, the trials' length."""

    name: str
    anchor: str
    """tenth (0.1 x edge), steepest, valley, edge."""
    ladder: str
    """centred (anchor x spread^-2..2) or below (anchor x spread^-k, k = 0..n-1)."""
    spread: float
    trial: float | int
    """First rung's length: steps (int) or a fraction of the stage (float)."""
    candidates: int = 5
    top: float = 1.0
    """The ladder's top as a fraction of the anchor."""


def range_test(entry: dict[str, Any], length: int) -> tuple[list[float], list[float | None]]:
    """The recorded range test of ``length`` steps (the longest that fits if none)."""
    ranges = entry["ranges"]
    key = str(length) if str(length) in ranges else max(ranges, key=int)
    return ranges[key]["lrs"], ranges[key]["losses"]


def valley_lr(lrs: list[float], losses: list[float], beta: float) -> float | None:
    """An anchor tried and not adopted (worse than a tenth of the edge in every variant
    below): the geometric midpoint of the range test's descent, from the LR where the
    smoothed loss has made a tenth of its fall to the one where it has made nine tenths
    (Smith's two bounds of a cyclical schedule); None on a plateau."""
    x = np.asarray(losses, dtype=np.float64)
    if len(x) < 2:
        return None
    curve = smooth(x, beta)
    start = _start_level(x)
    low = int(np.argmin(curve))
    drop = start - float(curve[low])
    if drop <= _margin(x, start):
        return None
    head = curve[: low + 1]
    begin = int(np.argmax(head < start - 0.1 * drop))
    end = int(np.argmax(head <= start - 0.9 * drop))
    return math.sqrt(float(lrs[begin]) * float(lrs[end]))


def anchor_lr(entry: dict[str, Any], how: str, length: int = 100) -> float:
    lrs, losses = range_test(entry, length)
    finite = []
    for value in losses:
        if value is None:
            break
        finite.append(value)
    if how == "valley":
        value = valley_lr(lrs, finite, AutoLRConfig().smoothing)
        return value if value is not None else pick_lr(lrs, finite, AutoLRConfig(fraction=0.1))[0]
    cfg = AutoLRConfig(rule="steepest" if how == "steepest" else "divergence", fraction=0.1)
    pick, edge, _ = pick_lr(lrs, finite, cfg)
    if how == "edge":
        return edge if edge is not None else pick
    return pick


def ladder(anchor: float, v: Variant) -> list[float]:
    top = anchor * v.top
    if v.ladder == "centred":
        first = -((v.candidates - 1) // 2)
        return [top * v.spread ** (first + i) for i in range(v.candidates)]
    return sorted(top * v.spread**-i for i in range(v.candidates))


def simulate(entry: dict[str, Any], surface: Surface, v: Variant) -> dict[str, Any]:
    """Successive halving (eta 2) on the surface: the chosen LR, its regret, the cost."""
    alive = ladder(anchor_lr(entry, v.anchor), v)
    first = v.trial if isinstance(v.trial, int) else max(1, round(v.trial * surface.steps))
    steps, count, cost = first, len(alive), 0
    while True:
        scores = [surface.loss(lr, steps) for lr in alive]
        cost += steps * len(alive)
        ranked = sorted((s, lr) for s, lr in zip(scores, alive, strict=True) if math.isfinite(s))
        count //= 2
        if count < 2 or not ranked:
            chosen = ranked[0][1] if ranked else min(alive)
            break
        alive = [lr for _, lr in ranked[:count]]
        steps *= 2
    best_lr, _ = surface.best()
    return {
        "lr": chosen,
        "ratio": chosen / best_lr,
        "regret": surface.regret(chosen),
        "cost": cost / surface.steps,
    }


VARIANTS = [
    # the rules as first shipped: a tenth of the edge, centred ladder, fixed-length trials
    Variant("tenth, centred x2, 20-step trials", "tenth", "centred", 2.0, 20),
    Variant("tenth, centred x2, trials 2% of the stage", "tenth", "centred", 2.0, 0.02),
    Variant("tenth, centred x2, trials 5% of the stage", "tenth", "centred", 2.0, 0.05),
    Variant("steepest, centred x2, 20-step trials", "steepest", "centred", 2.0, 20),
    Variant("steepest, centred x2, trials 2%", "steepest", "centred", 2.0, 0.02),
    Variant("valley, centred x2, 20-step trials", "valley", "centred", 2.0, 20),
    Variant("valley, centred x2, trials 2%", "valley", "centred", 2.0, 0.02),
    Variant("valley, centred x2, trials 5%", "valley", "centred", 2.0, 0.05),
    Variant("edge/2, below x3.16, 20-step trials", "edge", "below", 10**0.5, 20, top=0.5),
    Variant("edge/2, below x3.16, trials 1%", "edge", "below", 10**0.5, 0.01, top=0.5),
    Variant("edge/2, below x3.16, trials 2%", "edge", "below", 10**0.5, 0.02, top=0.5),
    Variant("edge/2, below x3.16, trials 5%", "edge", "below", 10**0.5, 0.05, top=0.5),
    Variant("edge/2, below x3.16, trials 10%", "edge", "below", 10**0.5, 0.1, top=0.5),
    Variant("tenth, below x2, 10-step trials", "tenth", "below", 2.0, 10),
    Variant("tenth, below x2, 20-step trials", "tenth", "below", 2.0, 20),
    Variant("tenth, below x2, trials 1%", "tenth", "below", 2.0, 0.01),
    Variant("tenth, below x2, trials 2%", "tenth", "below", 2.0, 0.02),
    Variant("tenth, below x2, trials 5%", "tenth", "below", 2.0, 0.05),
    Variant("tenth, below x2, 3 candidates, trials 2%", "tenth", "below", 2.0, 0.02, 3),
    Variant("tenth, below x3.16, trials 2%", "tenth", "below", 10**0.5, 0.02),
    Variant("tenth, centred x3.16, trials 2%", "tenth", "centred", 10**0.5, 0.02),
    Variant("valley, below x2 from 2x, trials 2%", "valley", "below", 2.0, 0.02, top=2.0),
    Variant("valley, below x2 from 2x, trials 5%", "valley", "below", 2.0, 0.05, top=2.0),
]


def load_sweeps() -> list[tuple[str, int, dict[str, Any]]]:
    out = []
    for path in sorted(RUNS.glob("*-seed*.json")):
        task, seed = path.stem.rsplit("-seed", 1)
        for entry in json.loads(path.read_text())["stages"]:
            out.append((task, int(seed), entry))
    return out


def horizon_rows(sweeps: list[tuple[str, int, dict[str, Any]]]) -> list[dict[str, Any]]:
    shown = [0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]
    rows = []
    for task, seed, entry in sweeps:
        surface = Surface.of(entry)
        bests = [surface.best(max(1, round(f * surface.steps)))[0] for f in shown]
        rows.append(
            {"task": task, "seed": seed, "stage": entry["stage"], "steps": entry["steps"],
             "optimizer": entry["optimizer"], "hand": entry["hand_lr"],
             "edge": anchor_lr(entry, "edge"), "best_by_horizon": dict(zip(map(str, shown), bests, strict=True))}
        )  # fmt: skip
    return rows


def report() -> dict[str, Any]:
    sweeps = load_sweeps()
    variants = []
    for v in VARIANTS:
        outcomes = [simulate(entry, Surface.of(entry), v) for _, _, entry in sweeps]
        regrets = np.array([o["regret"] for o in outcomes])
        ratios = np.array([o["ratio"] for o in outcomes])
        variants.append(
            {"name": v.name, "regret_median": float(np.median(regrets)),
             "regret_mean": float(np.mean(regrets)), "regret_max": float(np.max(regrets)),
             "within_2x": float(np.mean((ratios >= 0.5) & (ratios <= 2.0))),
             "log2_ratio_median": float(np.median(np.log2(ratios))),
             "cost_median": float(np.median([o["cost"] for o in outcomes])),
             "per_stage": [{"task": t, "seed": s, "stage": e["stage"], **o}
                           for (t, s, e), o in zip(sweeps, outcomes, strict=True)]}
        )  # fmt: skip
    checks = []
    check_path = RUNS / "check.json"
    if check_path.exists():
        stored = json.loads(check_path.read_text())
        surfaces = {(t, s, e["stage"]): Surface.of(e) for t, s, e in sweeps}
        for row in stored["stages"]:
            surface = surfaces.get((row["task"], row["seed"], row["stage"]))
            if surface is None:
                continue
            best_lr, _ = surface.best()
            checks.append({**row, "best_lr": best_lr, "ratio": row["lr"] / best_lr,
                           "regret": surface.regret(row["lr"])})  # fmt: skip
    return {
        "command": "python benchmarks/lr_auto_dev.py sweep && python benchmarks/lr_auto_dev.py check",
        "machine": f"{platform.machine()}, 2 CPU cores shared, no GPU, one torch thread, torch {torch.__version__}",
        "grid": GRID,
        "horizons": horizon_rows(sweeps),
        "variants": variants,
        "check": checks,
        "check_defaults": json.loads(check_path.read_text())["defaults"] if check_path.exists() else None,
    }  # fmt: skip


def render(data: dict[str, Any]) -> str:
    lines = [
        "### lr: auto — development set (shapes, addition, synthetic teacher and noisy regression)",
        "",
        f"Command: `{data['command']}`; tables: `python benchmarks/lr_auto_dev.py report`.",
        "",
        "Best constant LR (on the grid hand LR x 2^k) by the held-out loss after a share of "
        "the stage, from the stage's real starting point; `edge`: the range test's edge.",
        "",
    ]
    shown = list(data["horizons"][0]["best_by_horizon"]) if data["horizons"] else []
    lines.append("| task | seed | stage (steps, optimizer) | hand LR | edge | "
                 + " | ".join(f"best at {float(f):.0%}" for f in shown) + " |")  # fmt: skip
    lines.append("|---" * (5 + len(shown)) + "|")
    for row in data["horizons"]:
        bests = " | ".join(f"{row['best_by_horizon'][f]:.3g}" for f in shown)
        lines.append(
            f"| {row['task']} | {row['seed']} | {row['stage']} ({row['steps']}, {row['optimizer']}) "
            f"| {row['hand']:.3g} | {row['edge']:.3g} | {bests} |"
        )
    lines += [
        "",
        "Search rules simulated on those surfaces (successive halving with eta 2 over 5 "
        "candidates; trial losses read off the surfaces). Regret: the chosen LR's held-out "
        "loss at the stage's end above the grid's best, as a share of the best LR's gain "
        "over the stage's start (0: as good as the best grid LR; 1: no better than not "
        "training). Cost: the trials' steps as a share of the stage (the range test aside).",
        "",
        "| rule | regret median | mean | max | chosen within 2x of the best | median log2(chosen / best) | trial cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in data["variants"]:
        lines.append(
            f"| {v['name']} | {v['regret_median']:.3f} | {v['regret_mean']:.3f} | "
            f"{v['regret_max']:.3f} | {v['within_2x']:.0%} | {v['log2_ratio_median']:+.2f} | "
            f"{v['cost_median']:.0%} |"
        )
    if data["check"]:
        lines += [
            "",
            f"The library's search with its defaults ({data['check_defaults']}), run for real "
            "from the same starting points:",
            "",
            "| task | seed | stage | chosen LR | best grid LR | chosen / best | regret | search steps (share of the stage) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in data["check"]:
            lines.append(
                f"| {row['task']} | {row['seed']} | {row['stage']} | {row['lr']:.3g} | "
                f"{row['best_lr']:.3g} | {row['ratio']:.2f} | {row['regret']:.3f} | "
                f"{row['search_steps']} ({row['search_steps'] / row['steps']:.0%}) |"
            )
    lines += ["", f"Machine: {data['machine']}."]
    return "\n".join(lines)


def check(tasks: list[str], seeds: int) -> None:
    """The library's search with its current defaults from every stage's start."""
    rows: list[dict[str, Any]] = []

    for task in tasks:
        for seed in range(seeds):
            if not (RUNS / f"{task}-seed{seed}.json").exists():
                continue  # no surface to score the choice on

            def on_stage(
                stage: Any,
                model: Any,
                optimizer: Any,
                hand: float,
                task: str = task,
                seed: int = seed,
            ) -> None:
                backend = LocalBackend(stage, model, optimizer)
                cfg = AutoLRConfig()
                started = time.perf_counter()
                result = search_lr(stage, model, optimizer, backend, seed=seed, cfg=cfg)
                rows.append(
                    {"task": task, "seed": seed, "stage": stage.name, "steps": stage.steps,
                     "lr": result.lr, "edge": result.edge, "pick": result.pick,
                     "candidates": result.candidates, "search_steps": result.steps,
                     "wall_s": time.perf_counter() - started}
                )  # fmt: skip
                print(f"  check {task} seed {seed} {stage.name}: lr {result.lr:.3g}", flush=True)

            stage_starts(task, seed, on_stage)
    defaults = AutoLRConfig().model_dump(mode="json")
    (RUNS / "check.json").write_text(json.dumps({"defaults": defaults, "stages": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sweep", "report", "check"])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {list(TASKS)}")
    if args.what == "sweep":
        for task in tasks:
            for seed in range(args.seeds):
                sweep(task, seed)
    if args.what == "check":
        check(tasks, args.seeds)
    if args.what in ("report", "check"):
        data = report()
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "lr_auto_dev.json").write_text(json.dumps(data, indent=1))
        text = render(data)
        (RESULTS / "lr_auto_dev.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()

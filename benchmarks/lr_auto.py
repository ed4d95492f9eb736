"""`lr: auto` per stage against hand-set and grid-tuned learning rates, over seeds.

    python benchmarks/lr_auto.py [--quick] [--jobs 2] [--recipes noisy-digits,parity,charlm]
    python benchmarks/lr_auto.py --render      # results/lr_auto[-quick].md from the JSON

Per recipe, every arm trains the recipe's curriculum (same stages, data, budget,
schedules, hand-offs) and differs only in each stage's peak LR:

============== ==============================================================================
arm            peak LR of every stage
============== ==============================================================================
hand           the recipe's own (the Δ column's reference)
grid-single    one LR for all stages: the best of ``grid`` x the hand LR, tuned on the
               recipe's *baseline* arm (the target data only, `stagetrain.arms`)
grid-per-stage each stage its own: the best combination of ``grid`` x each stage's hand LR,
               tuned on the curriculum itself
auto           ``lr: auto`` in every stage; the search's samples are extra
auto-counted   ``lr: auto`` with ``count_budget: true``: every stage trains its duration
               minus its search, so the total equals the other arms' budget
============== ==============================================================================

Tuning runs use their own seeds (100, 101, ...: other initialisations, other data draws)
and the recipe's tuning metric, never the evaluation seeds; the evaluation runs use
seeds 0, 1, ... with the initialisation and data draw paired across arms. Every run
trains through `stagetrain.fit` in a persistent worker pool (`stagetrain.workers`);
a rerun skips finished runs (runs/bench/lr-auto[-quick]/). The JSON holds every
per-seed value, the chosen LRs per stage and seed, the search's cost and the grids'
scores; the Markdown table is rendered from it by the statistics of
``benchmarks/tables.py`` (exact paired sign-flip tests, BCa intervals).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from stagetrain import Curriculum, fit, parse_config
from stagetrain.arms import derive_arm
from stagetrain.config import AutoLRConfig
from stagetrain.workers import Job, JobResult, run_jobs

sys.path.insert(0, str(Path(__file__).parent))
from tables import STATISTICS_NOTE, table_markdown

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RESULTS = Path(__file__).parent / "results"
TUNE_SEED = 100


@dataclass
class Recipe:
    name: str
    config: Path
    metric: str
    """EVAL.KEY the evaluation seeds are compared on."""
    tune_metric: str
    """EVAL.KEY the grids are tuned on (on the tuning seeds)."""
    higher_is_better: bool
    auto: list[dict[str, Any]]
    """Each stage's ``optimizer.auto`` options (the search sized to the stage: trials of a
    few percent of it, the whole search 10-50 %)."""
    grid: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0])
    """Factors on the hand LR tried by the grids."""
    tune_seeds: int = 2
    durations: list[str] | None = None
    """Quick variants: shorter stages."""
    note: str = ""


FULL = {
    "noisy-digits": Recipe(
        "noisy-digits", EXAMPLES / "noisy_digits.yaml", "test.accuracy", "val.accuracy", True,
        [{"range_steps": 50, "trial_steps": 10, "holdout": 100},
         {"range_steps": 20, "trial_steps": 3, "holdout": 100}],
    ),
    "parity": Recipe(
        "parity", ROOT / "src/stagetrain/recipes/parity_demo.yaml", "test.accuracy",
        "test.accuracy", True,
        [{"range_steps": 60, "trial_steps": 10}, {"range_steps": 100, "trial_steps": 40}],
        note="the demo's parity (d = 50, k = 5; 1,000 + 4,000 steps), the full recipe's task at 5/12 of its budget",
    ),
    "charlm": Recipe(
        "charlm", EXAMPLES / "charlm.yaml", "val.loss", "val.loss", False,
        [{"range_steps": 30, "trial_steps": 5, "holdout": 64},
         {"range_steps": 20, "trial_steps": 3, "holdout": 64}],
        grid=[1 / 3, 1.0, 3.0], tune_seeds=1,
        note="grids of 3 factors and one tuning seed (a run takes minutes); tuned and evaluated on the same validation text",
    ),
    "shapes": Recipe(
        "shapes", EXAMPLES / "shapes.yaml", "test.accuracy", "valid.accuracy", True,
        [{"range_steps": 100, "trial_steps": 20}, {"range_steps": 100, "trial_steps": 20}],
    ),
}  # fmt: skip
DEFAULT_RECIPES = ["noisy-digits", "parity", "charlm"]
QUICK = {
    "noisy-digits": Recipe(
        "noisy-digits", EXAMPLES / "noisy_digits.yaml", "test.accuracy", "val.accuracy", True,
        FULL["noisy-digits"].auto, grid=[1 / 3, 1.0, 3.0], tune_seeds=1,
    ),
    "parity": Recipe(
        "parity", ROOT / "src/stagetrain/recipes/parity_demo.yaml", "test.accuracy",
        "test.accuracy", True, [{"range_steps": 30, "trial_steps": 5}] * 2, grid=[1 / 3, 1.0, 3.0],
        tune_seeds=1, durations=["200ba", "400ba"],
        note="the demo with its stages cut to 200 + 400 steps (from 1,000 + 4,000) and small grids: a check of the pipeline, not an evaluation",
    ),
}  # fmt: skip
ARMS = ["hand", "grid-single", "grid-per-stage", "auto", "auto-counted"]


def machine() -> str:
    return f"{platform.machine()}, 2 CPU cores shared, no GPU, one torch thread per run, torch {torch.__version__}"


# --- configs of the arms ----------------------------------------------------------------------


def base_config(recipe: Recipe) -> dict[str, Any]:
    config = yaml.safe_load(recipe.config.read_text())
    config["checkpoint"] = {"keep": 1}
    if recipe.durations is not None:
        for stage, duration in zip(config["stages"], recipe.durations, strict=True):
            stage["duration"] = duration
    return config


def stage_optimizers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stage's optimizer as resolved (inherited ones written out)."""
    resolved = parse_config(config).resolved_stages()
    return [s.optimizer.model_dump(mode="json", exclude_none=True) for s in resolved]  # type: ignore[union-attr]


def with_lrs(
    config: dict[str, Any], lrs: list[float | str], autos: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """``config`` with each stage's peak LR set (``"auto"``: with that stage's options)."""
    out = copy.deepcopy(config)
    optimizers = stage_optimizers(config)
    options = autos or [{} for _ in lrs]
    for stage, optimizer, lr, auto in zip(out["stages"], optimizers, lrs, options, strict=True):
        optimizer = {**optimizer, "lr": lr}
        optimizer.pop("auto", None)
        if lr == "auto":
            optimizer["auto"] = dict(auto)
        stage["optimizer"] = optimizer
    return out


def hand_lrs(config: dict[str, Any]) -> list[float]:
    return [float(o["lr"]) for o in stage_optimizers(config)]


def baseline_config(config: dict[str, Any]) -> dict[str, Any]:
    curriculum = Curriculum(parse_config(config), progress=False)
    return derive_arm(curriculum, "baseline").to_dict()


# --- running ---------------------------------------------------------------------------------


def _train(_shared: Any, payload: tuple[dict[str, Any], str]) -> None:
    config, run_dir = payload
    curriculum = Curriculum(parse_config(config), progress=False)
    model = curriculum.build_model()
    resume = (Path(run_dir) / "checkpoints" / "manifest.json").exists()
    fit(model, curriculum, teacher=curriculum.build_teacher(), run_dir=run_dir, resume=resume,
        progress=False, tensorboard=False, overwrite=not resume)  # fmt: skip


def run_all(runs: list[tuple[dict[str, Any], Path]], jobs: int) -> None:
    """Train every (config, run directory) without a summary yet."""
    todo = []
    for config, run_dir in runs:
        if (run_dir / "summary.json").exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        todo.append(Job(str(run_dir), (config, str(run_dir)), str(run_dir) + ".log"))
    done = {"n": 0}
    started = time.perf_counter()

    def report(result: JobResult) -> None:
        done["n"] += 1
        status = "ok" if result.ok else f"FAILED: {result.error}"
        print(f"  [{done['n']}/{len(todo)}] {Path(result.key).relative_to(ROOT)}: {status} "
              f"({result.elapsed_s:.1f} s; {time.perf_counter() - started:.0f} s so far)", flush=True)  # fmt: skip

    run_jobs(todo, _train, None, workers=jobs, threads=1, on_result=report)


def seeded(config: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**config, "seed": seed, "data_seed": seed}


def final(run_dir: Path, metric: str) -> float | None:
    """The metric at the run's end (None: the run failed)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    name, key = metric.split(".", 1)
    value = json.loads(path.read_text())["metrics"].get(name, {}).get(key)
    return None if value is None or not np.isfinite(value) else float(value)


def tune(
    recipe: Recipe, root: Path, configs: dict[str, dict[str, Any]], jobs: int
) -> dict[str, float | None]:
    """The median tuning metric of each named config over the tuning seeds."""
    seeds = [TUNE_SEED + i for i in range(recipe.tune_seeds)]
    runs = [(seeded(c, s), root / name / f"seed-{s}") for name, c in configs.items() for s in seeds]
    run_all(runs, jobs)
    scores: dict[str, float | None] = {}
    for name in configs:
        values = [final(root / name / f"seed-{s}", recipe.tune_metric) for s in seeds]
        kept = [v for v in values if v is not None]
        scores[name] = float(np.median(kept)) if len(kept) == len(values) else None
    return scores


def best(scores: dict[str, float | None], higher_is_better: bool) -> str:
    sign = 1.0 if higher_is_better else -1.0
    ok = {k: v for k, v in scores.items() if v is not None}
    return max(ok, key=lambda k: sign * ok[k])


def search_costs(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    state = json.loads(path.read_text())["state"]
    searches = state.get("lr_search", {})
    return {
        "lrs": {stage: s["lr"] for stage, s in searches.items()},
        "search_samples": sum(s["samples"] for s in searches.values()),
        "eval_samples": sum(s["eval_samples"] for s in searches.values()),
        "fallbacks": sum(bool(s["fallback"]) for s in searches.values()),
        "train_samples": state["samples"],
        "elapsed_s": state["elapsed_s"],
    }


def bench_recipe(recipe: Recipe, quick: bool, seeds: int, jobs: int) -> dict[str, Any]:
    root = ROOT / "runs" / "bench" / ("lr-auto-quick" if quick else "lr-auto") / recipe.name
    base = base_config(recipe)
    hand = hand_lrs(base)
    stages = [s["name"] for s in base["stages"]]
    print(f"== {recipe.name}: hand LRs {hand}; tuning {len(recipe.grid)} + "
          f"{len(recipe.grid) ** len(hand)} configs x {recipe.tune_seeds} seeds", flush=True)  # fmt: skip
    # (b) one LR for every stage, tuned on the baseline arm (the target data only)
    baseline = baseline_config(base)
    single = {f"x{f:.3g}": with_lrs(baseline, [hand[-1] * f] * len(hand)) for f in recipe.grid}
    single_scores = tune(recipe, root / "tune-single", single, jobs)
    single_factor = best(single_scores, recipe.higher_is_better)
    single_lr = hand[-1] * float(single_factor[1:])
    # (c) every stage its own LR, tuned on the curriculum
    combos = list(product(recipe.grid, repeat=len(hand)))
    per_stage = {
        "-".join(f"x{f:.3g}" for f in combo): with_lrs(base, [h * f for h, f in zip(hand, combo, strict=True)])
        for combo in combos
    }  # fmt: skip
    per_scores = tune(recipe, root / "tune-per-stage", per_stage, jobs)
    per_key = best(per_scores, recipe.higher_is_better)
    per_lrs = [h * float(p[1:]) for h, p in zip(hand, per_key.split("-"), strict=True)]
    arms = {
        "hand": base,
        "grid-single": with_lrs(base, [single_lr] * len(hand)),
        "grid-per-stage": with_lrs(base, list(per_lrs)),
        "auto": with_lrs(base, ["auto"] * len(hand), recipe.auto),
        "auto-counted": with_lrs(
            base, ["auto"] * len(hand), [{**a, "count_budget": True} for a in recipe.auto]
        ),
    }
    eval_seeds = list(range(seeds))
    print(f"   evaluating {len(arms)} arms x {seeds} seeds", flush=True)
    run_all([(seeded(c, s), root / arm / f"seed-{s}") for arm, c in arms.items() for s in eval_seeds], jobs)  # fmt: skip
    finals = {
        arm: [final(root / arm / f"seed-{s}", recipe.metric) for s in eval_seeds] for arm in arms
    }
    costs = {
        arm: [search_costs(root / arm / f"seed-{s}") for s in eval_seeds] for arm in ("auto", "auto-counted")
    }  # fmt: skip
    elapsed = {
        arm: [c["elapsed_s"] if (c := search_costs(root / arm / f"seed-{s}")) else None for s in eval_seeds]
        for arm in arms
    }  # fmt: skip
    budget = parse_config(base)
    planned_stages = Curriculum(budget, progress=False).stages
    planned = sum(s.context.samples(s.steps) for s in planned_stages)
    return {
        "recipe": recipe.name,
        "config": str(recipe.config.relative_to(ROOT)),
        "note": recipe.note,
        "stages": stages,
        "hand_lrs": hand,
        "grid": recipe.grid,
        "tune_seeds": [TUNE_SEED + i for i in range(recipe.tune_seeds)],
        "tune_metric": recipe.tune_metric,
        "single_scores": single_scores,
        "single_lr": single_lr,
        "per_stage_scores": per_scores,
        "per_stage_lrs": per_lrs,
        "auto_options": recipe.auto,
        "auto_defaults": AutoLRConfig().model_dump(mode="json"),
        "planned_samples": planned,
        "stage_steps": [s.steps for s in planned_stages],
        "table": {
            "title": recipe.name,
            "metric": recipe.metric,
            "higher_is_better": recipe.higher_is_better,
            "baseline": "hand",
            "target": None,
            "seeds": eval_seeds,
            "arms": {arm: {"final": finals[arm]} for arm in ARMS},
        },
        "search": costs,
        "elapsed_s": elapsed,
    }


# --- the report --------------------------------------------------------------------------------


def _lrs_text(values: list[float]) -> str:
    return " / ".join(f"{v:.3g}" for v in values)


def recipe_text(entry: dict[str, Any]) -> list[str]:
    stages = entry["stages"]
    lines = [f"#### {entry['recipe']} (`{entry['config']}`)", ""]
    if entry.get("note"):
        lines += [f"{entry['note'][0].upper()}{entry['note'][1:]}.", ""]
    table = entry["table"]
    lines += [f"Metric {table['metric']} ({'higher' if table['higher_is_better'] else 'lower'} is better) "
              f"after the recipe's budget; evaluation seeds {table['seeds']}.", "",
              table_markdown(table), ""]  # fmt: skip
    hib = table["higher_is_better"]
    sign = "max" if hib else "min"
    lines.append(
        f"Peak LR per stage ({' / '.join(stages)}): hand {_lrs_text(entry['hand_lrs'])}; "
        f"grid-single {entry['single_lr']:.3g} (grid {[f'{g:.3g}' for g in entry['grid']]} x the last "
        f"stage's hand LR on the baseline arm, {sign} median {entry['tune_metric']} over tuning seeds "
        f"{entry['tune_seeds']}); grid-per-stage {_lrs_text(entry['per_stage_lrs'])} "
        f"(best of {len(entry['per_stage_scores'])} combinations on the curriculum)."
    )
    steps = entry.get("stage_steps")  # absent from results of before trial_steps shares
    budgets = ", ".join(
        f"{stage} {AutoLRConfig(**opts).search_steps(steps[i]):,} steps ({opts})"
        if steps
        else f"{stage} ({opts})"
        for i, (stage, opts) in enumerate(zip(stages, entry["auto_options"], strict=True))
    )
    lines.append(f"Search budget per stage (`optimizer.auto`): {budgets}.")
    if "auto_defaults" in entry:
        shown = ("rule", "fraction", "ladder", "candidates", "spread", "eta")
        others = ", ".join(f"{k} {entry['auto_defaults'][k]}" for k in shown)
        lines.append(f"Other search options at the library's defaults: {others}.")
    for arm in ("auto", "auto-counted"):
        costs = [c for c in entry["search"][arm] if c is not None]
        if not costs:
            continue
        chosen = {stage: [c["lrs"][stage] for c in costs if stage in c["lrs"]] for stage in stages}
        spread = "; ".join(
            f"{stage} {np.median(v):.3g} (seeds: {', '.join(f'{x:.3g}' for x in v)})"
            for stage, v in chosen.items() if v
        )  # fmt: skip
        search = float(np.median([c["search_samples"] for c in costs]))
        train = float(np.median([c["train_samples"] for c in costs]))
        held = float(np.median([c["eval_samples"] for c in costs]))
        fallbacks = sum(c["fallbacks"] for c in costs)
        planned = entry["planned_samples"]
        lines.append(
            f"`{arm}` chose (median over seeds) {spread}. Its searches trained {search:,.0f} samples "
            f"per run ({search / planned:.1%} of the recipe's {planned:,} training samples) "
            f"plus {held:,.0f} held-out forward samples; the stages then trained {train:,.0f}"
            + (
                " (counted: search + training = the budget)"
                if arm == "auto-counted"
                else " (search not counted)"
            )
            + f"; fallbacks: {fallbacks}."
        )
    wall = {
        arm: np.median([v for v in values if v is not None])
        for arm, values in entry["elapsed_s"].items() if any(v is not None for v in values)
    }  # fmt: skip
    lines.append("Training seconds per run (median; the run's own clock, its searches included): "
                 + ", ".join(f"{arm} {w:.1f}" for arm, w in wall.items()) + ".")  # fmt: skip
    return [*lines, ""]


def render(data: dict[str, Any]) -> str:
    quick = data["quick"]
    lines = [f"### lr: auto against hand-set and grid-tuned LRs ({'quick' if quick else 'full'})", "",
             f"Command: `{data['command']}`.", ""]  # fmt: skip
    for entry in data["recipes"]:
        lines += recipe_text(entry)
    lines += [STATISTICS_NOTE, "", f"Machine: {data['machine']}."]
    return "\n".join(lines)


def write(data: dict[str, Any], quick: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "lr_auto-quick" if quick else "lr_auto"
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1, default=float))
    text = render(data)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--seeds", type=int, default=None, help="evaluation seeds (default 5, quick 2)"
    )
    parser.add_argument(
        "--recipes", default=None, help=f"comma-separated (default: {','.join(DEFAULT_RECIPES)})"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md from the stored JSON"
    )
    args = parser.parse_args()
    if args.render:
        for stem in ("lr_auto", "lr_auto-quick"):
            path = RESULTS / f"{stem}.json"
            if path.exists():
                (RESULTS / f"{stem}.md").write_text(render(json.loads(path.read_text())) + "\n")
        return
    table = QUICK if args.quick else FULL
    names = args.recipes.split(",") if args.recipes else [n for n in DEFAULT_RECIPES if n in table]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; choose from {list(table)}")
    seeds = args.seeds or (2 if args.quick else 5)
    torch.set_num_threads(1)  # workers fork from here (see stagetrain.workers)
    started = time.perf_counter()
    entries = [bench_recipe(table[n], args.quick, seeds, args.jobs) for n in names]
    command = "python benchmarks/lr_auto.py" + (" --quick" if args.quick else "")
    if args.recipes:
        command += f" --recipes {args.recipes}"
    if args.seeds:
        command += f" --seeds {args.seeds}"
    write({"quick": args.quick, "command": command, "machine": machine(),
           "wall_s": time.perf_counter() - started, "recipes": entries}, args.quick)  # fmt: skip


if __name__ == "__main__":
    main()

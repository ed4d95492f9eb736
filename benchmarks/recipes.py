"""Reproduce the published curricula with the built-in recipes, through `stagetrain compare`.

    python benchmarks/recipes.py RECIPE [--quick] [--jobs 2] [--shapes-epochs 32]
    RECIPE: parity | noisy-digits | shapes-sweep | shapes | addition | charlm | all

Each recipe runs its curriculum and controls over seeds (full: 10 seeds for the cheap
recipes and shapes, 5 for charlm; quick: 2 seeds), then writes
benchmarks/results/<recipe>[-quick].json with the per-seed values (final metric and
steps to the target per arm) and <recipe>[-quick].md, the table that
``benchmarks/tables.py`` renders from that JSON with stagetrain's own statistics and
verdicts (exact sign-flip tests and their inverted intervals, BCa intervals, censored
time to target). Runs live under runs/bench/; a rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from stagetrain.compare import Analysis, TargetMetric, compare, markdown_table, read_run
from stagetrain.workers import default_threads

sys.path.insert(0, str(Path(__file__).parent))
from tables import recipe_markdown

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RESULTS = Path(__file__).parent / "results"
JOBS = 2
THREADS: int | None = None
"""Torch threads per run (``--threads``; None: the cores // jobs, compare's default)."""
FLAGS = ""
"""The command-line options that shape the runs, as recorded in each result's command."""


def machine() -> str:
    threads = THREADS or default_threads(JOBS)
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared "
            f"with other jobs), no GPU, {JOBS} run(s) at a time, {threads} torch thread(s) per "
            f"run, torch {torch.__version__}")  # fmt: skip


def run_compare(
    config: Path,
    out: Path,
    *,
    arms: list[str],
    seeds: int,
    jobs: int,
    metric: str,
    target: float | None = None,
) -> Analysis:
    """``stagetrain.compare`` with the torch threads per run given by ``--threads``."""
    print(f"== {config.name}: arms {arms}, {seeds} seeds -> {out}", flush=True)
    return compare(
        config,
        out,
        arms=arms,
        seeds=seeds,
        jobs=jobs,
        metric=metric,
        target=target,
        threads=THREADS,
        echo=lambda line: print("  " + line, flush=True),
    )


def write_result(name: str, quick: bool, text: str, data: dict[str, Any]) -> None:
    """Write results/<name>[-quick].md (``text``) and .json (``data``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-quick" if quick else name
    (RESULTS / f"{stem}.md").write_text(text + f"\n\nMachine: {machine()}.\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1, default=float))
    print(text)


def write_recipe(name: str, quick: bool, description: str, tables: list[dict[str, Any]],
                 *, notes: Sequence[str] = (), extra: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Store a recipe's per-seed values and the table tables.py renders from them."""
    command = f"python benchmarks/recipes.py {name}{' --quick' if quick else ''}{FLAGS}"
    data = {"recipe": name, "quick": quick, "command": command, "machine": machine(),
            "description": description, "tables": tables, "notes": list(notes),
            "extra": extra or {}}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-quick" if quick else name
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1, default=float))
    text = recipe_markdown(data)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    print(text)


def table_of(
    analysis: Analysis, *, title: str = "", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """An analysis as stored per-seed values: final metric and steps to the target per arm
    (``None``: the run failed / never reached the target)."""
    hib = analysis.metric.higher_is_better
    arms: dict[str, dict[str, Any]] = {}
    for a in analysis.arms:
        entry: dict[str, Any] = {
            "final": [r.final if r.status == "completed" else None for r in a.runs]
        }
        if analysis.target is not None:
            entry["steps_to_target"] = [
                h["step"] if (h := r.time_to(analysis.target, hib)) else None for r in a.runs
            ]
        arms[(labels or {}).get(a.arm, a.arm)] = entry
    baseline = (labels or {}).get("baseline", "baseline")
    return {"title": title, "metric": str(analysis.metric), "higher_is_better": hib,
            "baseline": baseline if baseline in arms else next(iter(arms)),
            "target": analysis.target, "seeds": analysis.seeds,
            "data_seeds": analysis.data_seeds, "arms": arms}  # fmt: skip


def parity(quick: bool, jobs: int) -> None:
    config = EXAMPLES / ("../src/stagetrain/recipes/parity_demo.yaml" if quick else "parity.yaml")
    seeds = 2 if quick else 10
    out = ROOT / "runs" / "bench" / ("parity-quick" if quick else "parity")
    analysis = run_compare(
        config.resolve(),
        out,
        arms=["curriculum", "baseline"],
        seeds=seeds,
        jobs=jobs,
        metric="test.accuracy",
        target=0.95,
    )
    write_recipe("parity", quick, "Steps to 95 % test accuracy, and the final accuracy.",
                 [table_of(analysis)])  # fmt: skip


def noisy_digits(quick: bool, jobs: int) -> None:
    seeds = 2 if quick else 10
    out = ROOT / "runs" / "bench" / ("noisy-digits-quick" if quick else "noisy-digits")
    analysis = run_compare(
        EXAMPLES / "noisy_digits.yaml",
        out,
        arms=["curriculum", "baseline", "easy-only"],
        seeds=seeds,
        jobs=jobs,
        metric="test.accuracy",
    )
    write_recipe("noisy-digits", quick, "Clean test accuracy at the end of training.",
                 [table_of(analysis)])  # fmt: skip


def _early_stopped_test_error(out: Path, arm: str, seed: int) -> float | None:
    """Test error at the evaluation with the best validation accuracy (early stopping)."""
    val = read_run(out, arm, seed, TargetMetric("valid", "accuracy")).curve
    test = read_run(out, arm, seed, TargetMetric("test", "accuracy")).curve
    if not val or len(val) != len(test):
        return None
    best = int(np.argmax([p["value"] for p in val]))
    return 1.0 - test[best]["value"]


PAPER_EPOCHS = 256
PAPER_SWITCHES = [2, 4, 8, 16, 32, 64, 128]  # S = 0 is the baseline arm


def shapes(quick: bool, jobs: int, epochs: int = 32) -> None:
    """Switch-epoch sweep plus controls. The paper's budget (256 epochs) and switch epochs
    are scaled by ``epochs / 256`` (default 32: 1/8; ``--shapes-epochs 256`` runs the
    paper's own). The controls run beside the largest S (half the budget)."""
    base = yaml.safe_load((EXAMPLES / "shapes.yaml").read_text())
    total = epochs
    scaled_switches = [s * epochs / PAPER_EPOCHS for s in PAPER_SWITCHES]
    switches = scaled_switches[-1:] if quick else scaled_switches
    seeds = 2 if quick else 10
    name = "shapes" if epochs == 32 else f"shapes-{epochs}ep"
    root = ROOT / "runs" / "bench" / (f"{name}-quick" if quick else name)
    root.mkdir(parents=True, exist_ok=True)
    errors: dict[str, list[float | None]] = {}
    for s in switches:
        config = dict(base, name=f"shapes-S{s:g}")
        config["stages"] = [
            dict(base["stages"][0], duration=f"{s:g}ep"),
            dict(base["stages"][1], duration=f"{total - s:g}ep"),
        ]
        path = root / f"shapes-S{s:g}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        last = s == switches[-1]
        arms = ["curriculum", "baseline", "union", "easy-only"] if last else ["curriculum"]
        out = root / f"S{s:g}"
        analysis = run_compare(
            path, out, arms=arms, seeds=seeds, jobs=jobs, metric="valid.accuracy"
        )
        for arm in arms:
            label = {
                "curriculum": f"S={s:g}",
                "baseline": "S=0 (Geom only)",
                "union": "union",
                "easy-only": "Basic only",
            }[arm]
            errors[label] = [_early_stopped_test_error(out, arm, seed) for seed in analysis.seeds]
    order = ["S=0 (Geom only)"] + [f"S={s:g}" for s in switches] + ["union", "Basic only"]
    table = {"title": "", "metric": "early-stopped GeomShapes test error", "higher_is_better": False,
             "baseline": "S=0 (Geom only)", "target": None, "seeds": list(range(seeds)),
             "arms": {label: {"final": errors[label]} for label in order if label in errors}}  # fmt: skip
    description = (f"Budget {total} epochs (the paper's 256 × {epochs}/256); switch epochs S = the paper's "
                   "{2, 4, ..., 128} scaled alike; test error on GeomShapes test at the epoch of best "
                   f"GeomShapes validation accuracy (early stopping); {seeds} seeds.")  # fmt: skip
    if epochs != 32:
        description = f"(`--shapes-epochs {epochs}`) " + description
    write_recipe(name, quick, description, [table])


def shapes_sweep(quick: bool, jobs: int) -> None:
    """Tune LR and width for the baseline (GeomShapes only), as Bengio et al. did, by the
    median best validation accuracy over seeds; the chosen pair is then frozen for all arms."""
    base = yaml.safe_load((EXAMPLES / "shapes.yaml").read_text())
    seeds = 1 if quick else 2
    root = ROOT / "runs" / "bench" / ("shapes-sweep-quick" if quick else "shapes-sweep")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for width in (256, 512):
        for lr in (0.01, 0.03, 0.1):
            config = dict(base, name=f"shapes-w{width}-lr{lr}")
            config["model"] = {
                "builtin": "mlp",
                "args": {"in_features": 1024, "hidden": [width] * 3, "out_features": 3},
            }
            config["stages"] = [
                dict(base["stages"][0], optimizer={"name": "sgd", "lr": lr, "momentum": 0.9}),
                base["stages"][1],
            ]
            path = root / f"w{width}-lr{lr}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            analysis = run_compare(
                path,
                root / f"w{width}-lr{lr}",
                arms=["baseline"],
                seeds=seeds,
                jobs=jobs,
                metric="valid.accuracy",
            )
            best = [b for r in analysis.arms[0].runs if (b := r.best(True)) is not None]
            rows.append((width, lr, float(np.median(best)) if best else float("nan")))
    chosen = max(rows, key=lambda r: r[2])
    lines = [f"### shapes: baseline LR and width sweep ({'quick' if quick else 'full'})", "",
             f"Command: `python benchmarks/recipes.py shapes-sweep{' --quick' if quick else ''}`. GeomShapes only, 32 epochs, SGD momentum 0.9, {seeds} seeds; median of the best validation accuracy.", "",
             "| width | LR | best valid accuracy (median) |", "|---|---|---|"]  # fmt: skip
    lines += [f"| 3 x {w} | {lr} | {acc:.4f} |" for w, lr, acc in rows]
    lines += ["", f"Chosen for every arm: width 3 x {chosen[0]}, LR {chosen[1]}."]
    write_result("shapes-sweep", quick, "\n".join(lines), {"rows": rows, "chosen": chosen})


def addition(quick: bool, jobs: int) -> None:
    seeds = 2 if quick else 10
    root = ROOT / "runs" / "bench" / ("addition-quick" if quick else "addition")
    finals: dict[str, list[float | None]] = {}
    tables = []
    for name, config in [
        ("naive", "addition_naive.yaml"),
        ("combined", "addition.yaml"),
        ("mixed", "addition_mixed.yaml"),
    ]:
        # The naive config's derived baseline trains on its last stage's data, 4-digit sums
        # only; the combined config's last stage is a mixture, so it is not the baseline.
        arms = ["curriculum", "baseline"] if name == "naive" else ["curriculum"]
        analysis = run_compare(
            EXAMPLES / config,
            root / name,
            arms=arms,
            seeds=seeds,
            jobs=jobs,
            metric="test.exact_match",
        )
        for a in analysis.arms:
            finals[name if a.arm == "curriculum" else "baseline (4 digits only)"] = [
                r.final for r in a.runs
            ]
        tables.append(f"#### {name} (its own compare)\n\n" + markdown_table(analysis))
    table = {"title": "strategies against the 4-digit-only baseline", "metric": "test.exact_match",
             "higher_is_better": True, "baseline": "baseline (4 digits only)", "target": None,
             "seeds": list(range(seeds)),
             "arms": {k: {"final": finals[k]} for k in ["baseline (4 digits only)", "naive", "mixed", "combined"]}}  # fmt: skip
    description = ("A GRU reads each problem as text (a, +, b, = least significant digit first) and emits "
                   "the sum. Exact-match accuracy on 2,000 4-digit test sums after 3,000 steps (batch 64), "
                   f"{seeds} seeds; every strategy has the same budget and LR.")  # fmt: skip
    write_recipe("addition", quick, description, [table], notes=tables)


def charlm(quick: bool, jobs: int) -> None:
    seeds = 2 if quick else 5
    out = ROOT / "runs" / "bench" / ("charlm-quick" if quick else "charlm")
    analysis = run_compare(
        EXAMPLES / "charlm.yaml",
        out,
        arms=["curriculum", "baseline"],
        seeds=seeds,
        jobs=jobs,
        metric="val.loss",
    )
    from stagetrain.report import write_report

    html, _ = write_report(out)
    target = analysis.target
    assert target is not None
    hib = analysis.metric.higher_is_better
    tokens = {
        a.arm: [h["tokens"] if (h := r.time_to(target, hib)) else None for r in a.runs]
        for a in analysis.arms
    }
    wall = {
        a.arm: [round(r.curve[-1]["time"], 1) if r.curve else None for r in a.runs]
        for a in analysis.arms
    }
    notes = [
        f"Tokens to reach the long-only median final loss ({target:.4f}) per seed (None: not reached): {json.dumps(tokens)}",
        f"Wall-clock seconds per run: {json.dumps(wall)}",
        f"Plots against tokens and wall-clock: `{html.relative_to(ROOT)}`.",
    ]
    write_recipe("charlm", quick, "Validation loss at context 256 after an equal token budget.",
                 [table_of(analysis)], notes=notes, extra={"tokens_to_target": tokens, "wall_s": wall})  # fmt: skip


RECIPES = {
    "parity": parity,
    "noisy-digits": noisy_digits,
    "shapes-sweep": shapes_sweep,
    "shapes": shapes,
    "addition": addition,
    "charlm": charlm,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", choices=[*RECIPES, "all"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: cores // jobs)"
    )
    parser.add_argument(
        "--shapes-epochs",
        type=int,
        default=32,
        help="shapes: total epochs (the paper's 256 scaled down; default 32 = 1/8)",
    )
    args = parser.parse_args()
    global JOBS, THREADS, FLAGS
    JOBS, THREADS = args.jobs, args.threads
    FLAGS = f" --jobs {args.jobs}" + (f" --threads {args.threads}" if args.threads else "")
    for name, fn in RECIPES.items():
        if args.recipe in (name, "all"):
            if name == "shapes":
                shapes(args.quick, args.jobs, epochs=args.shapes_epochs)
            else:
                fn(args.quick, args.jobs)


if __name__ == "__main__":
    main()

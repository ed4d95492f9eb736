"""Reproduce the published curricula with the built-in recipes, through `stagetrain compare`.

    python benchmarks/recipes.py RECIPE [--quick] [--jobs 2] [--shapes-epochs 32]
    RECIPE: parity | noisy-digits | shapes-sweep | shapes | addition | charlm | all

Each recipe runs its curriculum and controls over seeds (full: 10 seeds for the cheap
recipes and shapes, 5 for charlm; quick: 2 seeds), then writes
benchmarks/results/<recipe>[-quick].md (a table: median and 95 % bootstrap interval
of the mean over seeds, paired differences with Wilcoxon p-values) and a .json with
the raw per-seed numbers. Runs live under runs/bench/; a rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from stagetrain.compare import Analysis, TargetMetric, compare, markdown_table, read_run
from stagetrain.stats import paired_difference, summarize

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available, torch {torch.__version__}"


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
    print(f"== {config.name}: arms {arms}, {seeds} seeds -> {out}", flush=True)
    return compare(
        config,
        out,
        arms=arms,
        seeds=seeds,
        jobs=jobs,
        metric=metric,
        target=target,
        echo=lambda line: print("  " + line, flush=True),
    )


def write_result(name: str, quick: bool, text: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-quick" if quick else name
    (RESULTS / f"{stem}.md").write_text(text + f"\n\nMachine: {machine()}.\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1, default=float))
    print(text)


def per_seed(analysis: Analysis) -> dict[str, list[float | None]]:
    return {a.arm: [r.final for r in a.runs] for a in analysis.arms}


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
    steps = {
        a.arm: [h["step"] if (h := r.time_to(0.95, True)) else None for r in a.runs]
        for a in analysis.arms
    }
    text = (
        f"### parity ({'quick' if quick else 'full'})\n\nCommand: `python benchmarks/recipes.py parity{' --quick' if quick else ''}`\n\n"
        + markdown_table(analysis)
    )
    text += (
        "\n\nSteps to 95 % test accuracy per seed (None: not reached within the budget): "
        + json.dumps(steps)
    )
    write_result("parity", quick, text, {"final": per_seed(analysis), "steps_to_95": steps})


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
    text = (
        f"### noisy-digits ({'quick' if quick else 'full'})\n\nCommand: `python benchmarks/recipes.py noisy-digits{' --quick' if quick else ''}`\n\n"
        + markdown_table(analysis)
    )
    write_result("noisy-digits", quick, text, {"final": per_seed(analysis)})


def _early_stopped_test_error(out: Path, arm: str, seed: int) -> float | None:
    """Test error at the evaluation with the best validation accuracy (early stopping)."""
    val = read_run(out, arm, seed, TargetMetric("valid", "accuracy")).curve
    test = read_run(out, arm, seed, TargetMetric("test", "accuracy")).curve
    if not val or len(val) != len(test):
        return None
    best = int(np.argmax([p["value"] for p in val]))
    return 1.0 - test[best]["value"]


def paired_rows(
    values: dict[str, list[float | None]],
    order: list[str],
    baseline: str,
    *,
    higher_is_better: bool,
) -> list[str]:
    """Table rows: median [IQR], mean [95% CI], paired difference to ``baseline`` and its p-value."""
    rows = []
    for label in order:
        present = [v for v in values.get(label, []) if v is not None]
        if not present:
            continue
        s = summarize(present)
        delta = p = "—"
        if label != baseline:
            pairs = [
                (a, b)
                for a, b in zip(values[label], values[baseline], strict=True)
                if a is not None and b is not None
            ]
            d = paired_difference(
                [a for a, _ in pairs], [b for _, b in pairs], higher_is_better=higher_is_better
            )
            delta, p = f"{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]", f"{d.p_value:.3g}"
        rows.append(
            f"| {label} | {s.median:.4f} [{s.q25:.4f}, {s.q75:.4f}] | {s.mean:.4f} [{s.ci_low:.4f}, {s.ci_high:.4f}] | {delta} | {p} |"
        )
    return rows


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
    lines = [f"### shapes ({'quick' if quick else 'full'})", "",
             f"Command: `python benchmarks/recipes.py shapes{' --quick' if quick else ''}{f' --shapes-epochs {epochs}' if epochs != 32 else ''}`. Budget {total} epochs (the paper's 256 × {epochs}/256); switch epochs S = the paper's {{2, 4, ..., 128}} scaled alike; test error on GeomShapes test at the epoch of best GeomShapes validation accuracy (early stopping); {seeds} seeds.", "",
             "| arm | test error median [IQR] | mean [95% CI] | Δ vs S=0 [95% CI] | Wilcoxon p |", "|---|---|---|---|---|"]  # fmt: skip
    order = ["S=0 (Geom only)"] + [f"S={s:g}" for s in switches] + ["union", "Basic only"]
    lines += paired_rows(errors, order, "S=0 (Geom only)", higher_is_better=False)
    write_result(name, quick, "\n".join(lines), {"test_error": errors})


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
        tables.append(f"#### {name}\n\n" + markdown_table(analysis))
    lines = [f"### addition ({'quick' if quick else 'full'})", "",
             f"Command: `python benchmarks/recipes.py addition{' --quick' if quick else ''}`. A GRU reads each problem as text (a, +, b, = least significant digit first) and emits the sum. Exact-match accuracy on 2,000 4-digit test sums after 3,000 steps (batch 64), {seeds} seeds; every strategy has the same budget and LR.", "",
             "| strategy | exact match median [IQR] | mean [95% CI] | Δ vs baseline [95% CI] | Wilcoxon p |", "|---|---|---|---|---|"]  # fmt: skip
    lines += paired_rows(
        finals,
        ["baseline (4 digits only)", "naive", "mixed", "combined"],
        "baseline (4 digits only)",
        higher_is_better=True,
    )
    write_result(
        "addition", quick, "\n".join(lines) + "\n\n" + "\n\n".join(tables), {"exact_match": finals}
    )


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
    text = (
        f"### charlm ({'quick' if quick else 'full'})\n\nCommand: `python benchmarks/recipes.py charlm{' --quick' if quick else ''}` (plots against tokens-equivalent steps and wall-clock: `{html.relative_to(ROOT)}`)\n\n"
        + markdown_table(analysis)
    )
    target = analysis.target
    assert target is not None
    tokens = {
        a.arm: [h["tokens"] if (h := r.time_to(target, False)) else None for r in a.runs]
        for a in analysis.arms
    }
    text += (
        f"\n\nTokens to reach the long-only median final loss ({target:.4f}) per seed (None: not reached): "
        + json.dumps(tokens)
    )
    wall = {
        a.arm: [r.curve[-1]["time"] if r.curve else None for r in a.runs] for a in analysis.arms
    }
    text += "\n\nWall-clock seconds per run: " + json.dumps(
        {k: [round(v, 1) if v else v for v in vs] for k, vs in wall.items()}
    )
    write_result("charlm", quick, text, {"final_val_loss": per_seed(analysis), "wall_s": wall})


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
        "--shapes-epochs",
        type=int,
        default=32,
        help="shapes: total epochs (the paper's 256 scaled down; default 32 = 1/8)",
    )
    args = parser.parse_args()
    for name, fn in RECIPES.items():
        if args.recipe in (name, "all"):
            if name == "shapes":
                shapes(args.quick, args.jobs, epochs=args.shapes_epochs)
            else:
                fn(args.quick, args.jobs)


if __name__ == "__main__":
    main()

"""Nemotron Elastic in miniature on the stdlib text: nested budgets, two-stage curriculum.

    python benchmarks/elastic.py [--quick] [--jobs 2] [--seeds 3]

1. trains the teacher (examples/elastic_teacher.yaml) unless runs/bench/elastic/teacher
   holds a finished run;
2. trains the nested parent twice with examples/elastic.yaml: stage 2 weighted toward
   the full model (0.5 / 0.3 / 0.2, as published) and stage 2 uniform (1/3 each);
   per-budget validation loss at context 256 after stage 1 and after stage 2 (the shape
   of the paper's Tables 4 and 5);
3. extracts mid and small zero-shot from the weighted run (`stagetrain extract`) and
   checks them against the masked parent;
4. distils each of mid and small on its own from the same teacher (pruned once by the
   same ranking to the sizes the router chose), on the nested run's schedule and on
   that schedule stretched to twice the tokens, and counts the tokens each needs to
   reach the nested model's validation loss for that budget: the token cost of
   separate training against nested training, as a ratio.

Steps 2-4 repeat for each seed (default 3; each run costs minutes on 2 CPU cores).
Writes benchmarks/results/elastic[-quick].md and .json; the quick version (one seed)
shrinks every budget ~8x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from recipes import EXAMPLES, ROOT, write_result

from stagetrain.elastic.export import extract_run
from stagetrain.logs import read_records

STAGETRAIN = [sys.executable, "-m", "stagetrain.cli"]


def scaled(duration: str, factor: float) -> str:
    number = float(duration.removesuffix("tok"))
    return f"{int(number * factor)}tok"


def threads_per_run(jobs: int) -> int:
    """One share of the cores per concurrent run: oversubscribed OpenMP threads slow
    every run several-fold."""
    return max(1, (os.cpu_count() or 1) // jobs)


def train(config: dict[str, Any], run_dir: Path, threads: int) -> float:
    """Run a config (skipping a finished run of the same config); returns its wall-clock
    seconds."""
    summary = run_dir / "summary.json"
    path = run_dir.parent / f"{run_dir.name}.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if path.exists() and path.read_text() != text:
        # The config changed since that run: it measures something else, start over.
        shutil.rmtree(run_dir, ignore_errors=True)
    if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
        return float(json.loads(summary.read_text())["state"]["elapsed_s"])
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    start = time.perf_counter()
    command = [*STAGETRAIN, "run", str(path), "--run-dir", str(run_dir), "--no-progress"]
    if (run_dir / "checkpoints" / "manifest.json").exists():
        command.append("--resume")
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return time.perf_counter() - start


def evals(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_records(run_dir / "metrics.jsonl") if r["type"] == "eval"]


def stage_ends(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_records(run_dir / "metrics.jsonl") if r["type"] == "stage_end"]


def loss_at(run_dir: Path, name: str, step: int) -> float:
    """Validation loss ``name`` at the last evaluation at or before ``step``."""
    records = [r for r in evals(run_dir) if r["name"] == name and r["step"] <= step]
    return float(records[-1]["loss"])


def tokens_to_reach(run_dir: Path, name: str, threshold: float) -> int | None:
    for record in evals(run_dir):
        if record["name"] == name and record["loss"] <= threshold:
            return int(record["tokens"])
    return None


def measure_seed(
    nested: dict[str, Any], teacher_dir: Path, root: Path, seed: int, jobs: int, factor: float
) -> dict[str, Any]:
    """Steps 2-4 of the module docstring for one seed: returns per-budget losses, the
    extraction reports and the separate-distillation token counts."""
    nested = dict(yaml.safe_load(yaml.safe_dump(nested)), seed=seed)
    uniform = yaml.safe_load(yaml.safe_dump(nested))
    for source in uniform["stages"][1]["data"]["sources"]:
        source["weight"] = 1
    runs = {"weighted": (nested, root / "weighted"), "uniform": (uniform, root / "uniform")}
    print(f"== seed {seed}: nested parents (stage 2 weighted / uniform) -> {root}", flush=True)
    seconds: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = {
            name: pool.submit(train, cfg, path, threads_per_run(jobs))
            for name, (cfg, path) in runs.items()
        }
        for name, future in done.items():
            seconds[name] = future.result()

    budgets = [b["name"] for b in nested["model"]["args"]["budgets"]]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, (_, path) in runs.items():
        end_1 = stage_ends(path)[0]
        table[name] = {
            b: {
                "stage1": loss_at(path, f"val_{b}", end_1),
                "stage2": loss_at(path, f"val_{b}", 10**12),
            }
            for b in budgets
        }
    nested_tokens = int(evals(root / "weighted")[-1]["tokens"])

    print(f"== seed {seed}: zero-shot extraction", flush=True)
    extracted = {}
    for b in budgets[1:]:
        # Measured, not enforced: the table reports how far the router's own choice is.
        report = extract_run(root / "weighted", b, root / f"extracted-{b}", allow_off_target=True)
        extracted[b] = report
        print("\n".join("  " + line for line in report.lines()), flush=True)

    print(f"== seed {seed}: separate distillation of each budget from the teacher", flush=True)
    # Each budget distilled on its own, on the nested run's own schedule (1x: same
    # tokens, contexts and LR per stage) and on that schedule stretched to twice the
    # tokens (2x), in case 1x does not reach the nested loss.
    separate_runs = {}
    for b in budgets[1:]:
        layout = extracted[b].layout
        for length, suffix in ((1.0, "-1x"), (2.0, "")):
            cfg = yaml.safe_load(yaml.safe_dump(nested))
            cfg["name"] = f"elastic-separate-{b}"
            cfg["model"] = {
                "builtin": "elastic_pruned",
                "args": {
                    "teacher": nested["model"]["args"]["teacher"],
                    "weights": str(teacher_dir),
                    "sizes": {"width": layout["width"], "heads": layout["heads"][0],
                              "ffn": layout["ffn"][0], "depth": len(layout["layers"])},
                },
            }  # fmt: skip
            cfg["evals"] = [{"name": "val", "max_samples": 128, "metrics": ["loss"],
                             "data": {"builtin": "stdlib_text", "args": {"split": "val", "context": 256}}}]  # fmt: skip
            cfg["eval_every"] = scaled("65536tok", factor)
            for stage in cfg["stages"]:
                stage["duration"] = scaled(stage["duration"], length)
                stage["data"] = {"builtin": "stdlib_text", "name": "stdlib-train",
                                 "args": {"split": "train", "context": 256}}  # fmt: skip
                stage["loss"] = [
                    {"name": "kl_distill", "weight": 1.0, "args": {"temperature": 1.0}}
                ]
            cfg["stages"][0]["optimizer"].pop("lr_multipliers", None)
            separate_runs[f"{b}{suffix}"] = (cfg, root / f"separate-{b}{suffix}")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = {
            k: pool.submit(train, cfg, path, threads_per_run(jobs))
            for k, (cfg, path) in separate_runs.items()
        }
        for k, future in done.items():
            seconds[f"separate-{k}"] = future.result()

    separate: dict[str, dict[str, Any]] = {}
    for b in budgets[1:]:
        target = table["weighted"][b]["stage2"]
        short, long = separate_runs[f"{b}-1x"][1], separate_runs[b][1]
        separate[b] = {
            "final_1x": loss_at(short, "val", 10**12),
            "reach_1x": tokens_to_reach(short, "val", target),
            "reach_2x": tokens_to_reach(long, "val", target),
            "cap": int(evals(long)[-1]["tokens"]),
        }
    needed = [
        next((t for t in (v["reach_1x"], v["reach_2x"]) if t is not None), v["cap"])
        for v in separate.values()
    ]
    return {
        "seed": seed, "table": table, "nested_tokens": nested_tokens, "extracted": extracted,
        "separate": separate, "separate_total": sum(needed),
        "lower_bound": any(v["reach_1x"] is None and v["reach_2x"] is None for v in separate.values()),
        "ratio": sum(needed) / nested_tokens, "seconds": seconds,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=None, help="default: 3 (quick: 1)")
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    factor = 0.125 if args.quick else 1.0
    root = ROOT / "runs" / "bench" / ("elastic-quick" if args.quick else "elastic")

    teacher_cfg = yaml.safe_load((EXAMPLES / "elastic_teacher.yaml").read_text())
    for stage in teacher_cfg["stages"]:
        stage["duration"] = scaled(stage["duration"], factor)
    teacher_dir = root / "teacher"
    print(f"== teacher -> {teacher_dir}", flush=True)
    seconds = {"teacher": train(teacher_cfg, teacher_dir, threads_per_run(args.jobs))}
    teacher_loss = loss_at(teacher_dir, "val", 10**12)

    nested = yaml.safe_load((EXAMPLES / "elastic.yaml").read_text())
    nested["model"]["args"]["weights"] = str(teacher_dir)
    nested["teacher"]["weights"] = str(teacher_dir)
    for stage in nested["stages"]:
        stage["duration"] = scaled(stage["duration"], factor)
    nested["model"]["args"]["router"]["anneal_forwards"] = max(
        20, int(nested["model"]["args"]["router"]["anneal_forwards"] * factor)
    )
    budgets = [b["name"] for b in nested["model"]["args"]["budgets"]]
    seeds = list(range(args.seeds))
    results = [measure_seed(nested, teacher_dir, root / f"seed{seed}", seed, args.jobs, factor)
               for seed in seeds]  # fmt: skip
    for result in results:
        seconds.update({f"{k} (seed {result['seed']})": v for k, v in result["seconds"].items()})

    def spread(values: list[float], digits: int = 4) -> str:
        """Median and the per-seed values (a small number of seeds: show them all)."""
        shown = ", ".join(f"{v:.{digits}f}" for v in values)
        return f"{statistics.median(values):.{digits}f} ({shown})" if len(values) > 1 else shown

    nested_tokens = results[0]["nested_tokens"]
    lines = [
        f"### elastic ({'quick' if args.quick else 'full'})", "",
        f"Command: `python benchmarks/elastic.py{' --quick' if args.quick else ''}`. Teacher: "
        f"a byte-level GPT (width 128, 4 heads, MLP 512, 4 layers; 891,904 parameters) trained on "
        f"{scaled('1.5e6tok', factor).removesuffix('tok')} tokens of the stdlib text, validation loss "
        f"{teacher_loss:.4f} at context 256. Nested parent: budgets full / mid (target 0.75) / small "
        f"(target 0.5), trained by distillation from the teacher for {nested_tokens:,} tokens: stage 1 "
        "at context 64 with budgets uniform, stage 2 at context 256 (half the batch) with budgets "
        f"0.5 / 0.3 / 0.2 (weighted) or 1/3 each (uniform). Seeds {seeds} (the parent's router "
        "initialisation, budget draws and data order; the teacher is shared); each cell is the "
        "median over seeds with the per-seed values in parentheses.", "",
        "Validation loss (bytes, context 256) per budget:", "",
        "| budget | after stage 1 | after stage 2, weighted | after stage 2, uniform | uniform − weighted | teacher |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip

    def per_seed(arm: str, b: str, when: str) -> list[float]:
        return [r["table"][arm][b][when] for r in results]

    for b in budgets:
        gap = [
            u - w
            for u, w in zip(
                per_seed("uniform", b, "stage2"), per_seed("weighted", b, "stage2"), strict=True
            )
        ]
        lines.append(
            f"| {b} | {spread(per_seed('weighted', b, 'stage1'))} | "
            f"{spread(per_seed('weighted', b, 'stage2'))} | {spread(per_seed('uniform', b, 'stage2'))} | "
            f"{spread(gap)} | {teacher_loss:.4f} |"
        )  # fmt: skip
    lines += ["", "Zero-shot extraction from each seed's weighted run (`stagetrain extract`):", "",
              "| seed | budget | sizes (width, heads, MLP, layers) | parameters | fraction of full | target | off target | max abs diff vs masked parent |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        for b, report in result["extracted"].items():
            z, status = report.layout, report.status
            lines.append(
                f"| {result['seed']} | {b} | {z['width']}, {z['heads'][0]}, {z['ffn'][0]}, "
                f"{len(z['layers'])} | {report.child_params:,} | {status.fraction:.3f} | "
                f"{status.target:.3f} | {status.off_target:+.1%} | {report.max_abs_diff:.1e} |"
            )
    lines += ["", f"Separate distillation: each of mid and small pruned from the teacher by the same ranking to the sizes that seed's router chose, then distilled alone on the nested run's schedule (1x: the same tokens, contexts and LR per stage) and on that schedule stretched to twice the tokens (2x). Tokens until its validation loss reaches the nested model's loss for that budget (evaluated every {int(65536 * factor):,} tokens):", "",
              "| seed | budget | nested loss | separate loss at 1x | tokens to reach, 1x schedule | tokens to reach, 2x schedule |", "|---|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        for b in budgets[1:]:
            v = result["separate"][b]
            shown = [
                f"{v[k]:,}" if v[k] is not None else "not reached" for k in ("reach_1x", "reach_2x")
            ]
            lines.append(
                f"| {result['seed']} | {b} | {result['table']['weighted'][b]['stage2']:.4f} | "
                f"{v['final_1x']:.4f} | {shown[0]} | {shown[1]} |"
            )  # fmt: skip
    ratios = [r["ratio"] for r in results]
    bound = "≥ " if any(r["lower_bound"] for r in results) else ""
    lines += [
        "",
        f"Token cost, separate (mid + small) / nested: {bound}{spread(ratios, 2)} x, from "
        + "; ".join(f"seed {r['seed']}: {r['separate_total']:,} / {r['nested_tokens']:,}" for r in results)
        + " (per budget the 1x count if it reached the nested loss, else the 2x count; a budget "
        "that never reached it counts at the 2x cap, so the ratio is then a lower bound; nested "
        "training also trains the full budget in the same tokens).",
        "",
        "Wall-clock seconds: " + json.dumps({k: round(v, 1) for k, v in seconds.items()}),
    ]  # fmt: skip
    data = {
        "teacher_val_loss": teacher_loss, "seeds": seeds,
        "per_seed": [
            {"seed": r["seed"], "table": r["table"], "nested_tokens": r["nested_tokens"],
             "extracted": {b: {"layout": e.layout, "params": e.child_params,
                               "fraction": e.status.fraction, "target": e.status.target,
                               "max_abs_diff": e.max_abs_diff}
                           for b, e in r["extracted"].items()},
             "separate": r["separate"], "ratio": r["ratio"]}
            for r in results
        ],
        "seconds": seconds,
    }  # fmt: skip
    write_result("elastic", args.quick, "\n".join(lines), data)


if __name__ == "__main__":
    main()

"""Nemotron Elastic on a Hugging Face Llama: budgets over seeds, exports loaded back.

    python benchmarks/elastic_llama.py [--quick] [--seeds 5] [--estimate]

1. trains the teacher, a ``LlamaForCausalLM`` from a ``LlamaConfig``
   (examples/elastic_llama_teacher.yaml), with ``stagetrain run`` unless
   runs/bench/elastic-llama[-quick]/teacher holds a finished run;
2. for each seed trains the nested parent (examples/elastic_llama.yaml: stage 1 context
   64 with budgets uniform, stage 2 context 256 with budgets 0.5 / 0.3 / 0.2) three
   times: ``paper`` — router loss weight 1 (the paper's ``task + 1.0 x router``), the
   router alone chooses; ``own`` — router loss weight 10 (as configured), the router
   alone chooses (``router.project`` off); ``projected`` — as configured: weight 10, and
   the router pins every budget to the nearest configuration within 5 % of its target
   when its anneal ends, training going on at those sizes;
3. per run and budget: the chosen configuration against its target (also after
   projecting it at the end, as ``stagetrain extract --project`` would), the
   validation loss at that budget, and the extraction of mid and small written as a
   Hugging Face directory, loaded back with ``AutoModelForCausalLM.from_pretrained``
   and compared with the masked parent.

The nested runs are the production path: :func:`stagetrain.fit` in-process (what
``stagetrain run examples/elastic_llama.yaml`` calls, without a new interpreter per run),
``elastic_text`` dict items ``{"input_ids", "labels", "budget"}`` called as
``model(**batch)``; each run directory is then read back as ``stagetrain extract`` reads
it (:func:`~stagetrain.elastic.load_elastic_run`) and mid and small are exported by
:func:`~stagetrain.elastic.extract_run` with ``format="hf"`` (``stagetrain extract
--format hf``; ``project`` when the router did not pin itself). ``--quick`` shrinks the
model (hidden 48, 2 layers) and every duration; ``--estimate`` times a few steps of the
full variant's configs and projects its training time
(benchmarks/results/elastic-llama-estimate.md). Writes
benchmarks/results/elastic-llama[-quick].md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from recipes import EXAMPLES, RESULTS, ROOT, write_result

from stagetrain import Curriculum, fit, parse_config
from stagetrain.elastic import check_budgets, extract_run, load_elastic_run
from stagetrain.logs import read_records
from stagetrain.recipes.elastic import validation_loss

QUICK_MODEL = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8}  # fmt: skip
# Widths: multiples of every heads choice, as in the example (a Hugging Face export).
QUICK_CHOICES = {"width": [24, 36, 48], "heads": [2, 4, 6],
                 "ffn": [32, 48, 64, 80, 96], "depth": [1, 2]}  # fmt: skip


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def teacher_config(quick: bool) -> dict[str, Any]:
    config = load("elastic_llama_teacher.yaml")
    if quick:
        config["model"]["args"]["config"].update(QUICK_MODEL)
        config.update(batch_size=16, eval_every="65536tok")
        config["stages"][0].update(duration="6.0e5tok")
        config["stages"][0]["optimizer"]["warmup"] = "10ba"
    return config


PATH = (
    "`stagetrain.fit` (dict items with the budget beside the tokens; exports by "
    "`stagetrain extract --format hf`)"
)
"""How the nested runs were trained, as the results state it."""

ARMS = {"paper": (False, 1.0), "own": (False, None), "projected": (True, None)}
"""Arm -> (router.project as configured, router loss weight: None = as configured)."""


def nested_config(
    quick: bool, teacher_dir: Path, seed: int, project: bool, weight: float | None = None
) -> dict[str, Any]:
    config = load("elastic_llama.yaml")
    config["seed"] = seed
    args = config["model"]["args"]
    args["weights"] = str(teacher_dir)
    config["teacher"]["args"]["weights"] = str(teacher_dir)
    if quick:
        args["config"].update(QUICK_MODEL)
        config["teacher"]["args"]["config"] = copy.deepcopy(args["config"])
        args["choices"] = QUICK_CHOICES
        args["router"].update(anneal_forwards=80)
        config["batch_size"] = 16
        for stage in config["stages"]:
            stage["duration"] = "1.0e5tok"
            if "batch_size" in stage:
                stage["batch_size"] = 8
        config["stages"][0]["optimizer"]["warmup"] = "5ba"
    if not project:
        args["router"].pop("project", None)
    if weight is not None:
        for stage in config["stages"]:
            for term in stage["loss"]:
                if term["name"].endswith("router_loss"):
                    term["weight"] = weight
    return config


def train_teacher(config: dict[str, Any], run_dir: Path) -> float:
    """Run the teacher (reusing a finished run of exactly this config); its seconds."""
    path = run_dir.parent / "teacher.yaml"
    done = run_dir.parent / "teacher.done"  # the config text, written once the run finished
    text = yaml.safe_dump(config, sort_keys=False)
    if done.exists() and done.read_text() == text:
        return float(json.loads((run_dir / "summary.json").read_text())["state"]["elapsed_s"])
    # Not run, changed, or interrupted: start over (it would measure something else).
    shutil.rmtree(run_dir, ignore_errors=True)
    done.unlink(missing_ok=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    start = time.perf_counter()
    command = [sys.executable, "-m", "stagetrain.cli", "run", str(path), "--run-dir",
               str(run_dir), "--no-progress"]  # fmt: skip
    with open(run_dir.parent / "teacher.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    done.write_text(text)
    return time.perf_counter() - start


def measure(config: dict[str, Any], run_dir: Path, context: int, samples: int) -> dict[str, Any]:
    """Train one nested run with :func:`stagetrain.fit` into ``run_dir`` and measure its
    budgets, losses and Hugging Face exports."""
    from transformers import AutoModelForCausalLM

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: it measures this config
    curriculum = Curriculum(parse_config(config), progress=False)
    model = curriculum.build_model()
    start = time.perf_counter()
    fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False)
    seconds = time.perf_counter() - start
    parent: Any = load_elastic_run(run_dir)  # the run as stagetrain extract reads it
    own = {s.name: s for s in check_budgets(parent, 0.05)}
    losses = {name: validation_loss(parent, budget=name, context=context, samples=samples)
              for name in own}  # fmt: skip
    was_pinned = bool((parent.router.pinned >= 0).all())
    final, exports = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in list(own)[1:]:
            out = Path(tmp) / name
            # stagetrain extract --format hf [--project]: checked, written, loaded back.
            report = extract_run(run_dir, name, out, format="hf", project=not was_pinned)
            final[name] = report.status
            loaded = AutoModelForCausalLM.from_pretrained(out).eval()
            exports[name] = {
                "layout": report.layout,
                "max_abs_diff": report.reloaded_diff,
                "val_loss": validation_loss(loaded, context=context, samples=samples),
            }
    return {
        "seconds": seconds,
        "own": {n: s.to_dict() for n, s in own.items()},
        "final": {n: s.to_dict() for n, s in final.items()},
        "projected_in_training": was_pinned,
        "val_loss": losses,
        "exports": exports,
    }


def spread(values: list[float], digits: int = 4) -> str:
    median = statistics.median(values)
    return f"{median:.{digits}f} ({min(values):.{digits}f} – {max(values):.{digits}f})"


def pct(values: list[float]) -> str:
    return (f"{statistics.median(values):+.1%} ({min(values):+.1%} – {max(values):+.1%}); "
            f"largest miss {max(abs(v) for v in values):.1%}")  # fmt: skip


def step_times(config: dict[str, Any], steps: int = 8) -> dict[str, float]:
    """Median seconds per training step of each stage of ``config`` (through
    :func:`stagetrain.fit`, ``steps`` steps per stage, no evaluations; the run's first
    logged step, which pays one-off costs, left out)."""
    config = copy.deepcopy(config)
    config.update(evals=[], log_every=1)
    for stage in config["stages"]:
        stage["duration"] = f"{steps}ba"
    with tempfile.TemporaryDirectory() as tmp:
        curriculum = Curriculum(parse_config(config), progress=False)
        model = curriculum.build_model()
        fit(model, curriculum, run_dir=Path(tmp) / "run", progress=False, tensorboard=False)
        records = read_records(Path(tmp) / "run" / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"][1:]
    return {
        stage["name"]: statistics.median(
            r["step_time"] for r in train if r["stage"] == stage["name"]
        )
        for stage in config["stages"]
    }


def estimate(seeds: int) -> None:
    """``--estimate``: the full variant's training time projected from timed steps of its
    configs (teacher and nested parent at the example's sizes, untrained weights)."""
    teacher = teacher_config(False)
    nested = nested_config(False, Path("unused"), 0, True)
    nested["model"]["args"]["weights"] = None
    nested["teacher"]["args"]["weights"] = None
    rows, total = [], 0.0
    for name, config, runs in (("teacher", teacher, 1), ("nested", nested, seeds * len(ARMS))):
        times = step_times(config)
        curriculum = Curriculum(parse_config(config), progress=False)
        seconds = sum(s.steps * times[s.name] for s in curriculum.stages)
        total += runs * seconds
        for s in curriculum.stages:
            rows.append(f"| {name} | {s.name} | {s.steps} | {times[s.name]:.2f} | {runs} |")
    lines = [
        "### elastic-llama (full): time estimate",
        "",
        "Command: `python benchmarks/elastic_llama.py --estimate`: 8 timed steps per stage of "
        f"the full variant's configs through `stagetrain.fit`, projected to {seeds} seeds x "
        f"{len(ARMS)} arms.",
        "",
        "| run | stage | steps | s per step (median) | runs |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Projected training time: {total / 60:.0f} min (evaluations, importance ranking and "
        "exports come on top).",
    ]
    write_result("elastic-llama-estimate", False, "\n".join(lines), {"total_s": total})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short runs")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 5 quick, 3 full)")
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite the Markdown from the saved JSON"
    )
    parser.add_argument(
        "--estimate", action="store_true", help="time a few steps, project the full run"
    )
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.estimate:
        estimate(args.seeds or 3)
        return
    stem = "elastic-llama-quick" if args.quick else "elastic-llama"
    if args.tables_only:
        data = json.loads((RESULTS / f"{stem}.json").read_text())
        write_result("elastic-llama", args.quick, render(data, args.quick), data)
        return
    seeds = list(range(args.seeds or (5 if args.quick else 3)))
    root = ROOT / "runs" / "bench" / ("elastic-llama-quick" if args.quick else "elastic-llama")
    context = 256
    samples = 64 if args.quick else 128
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"== teacher -> {root / 'teacher'}", flush=True)
    teacher_seconds = train_teacher(teacher_config(args.quick), root / "teacher")
    from stagetrain.elastic.hf import hf_causal_lm

    teacher_args = nested_config(args.quick, root / "teacher", 0, True)["teacher"]["args"]
    teacher = hf_causal_lm(**teacher_args).eval()
    teacher_loss = validation_loss(teacher, context=context, samples=samples)
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        for arm, (project, weight) in ARMS.items():
            print(f"== seed {seed}: nested, {arm}", flush=True)
            config = nested_config(args.quick, root / "teacher", seed, project, weight)
            result = measure(config, root / f"seed{seed}-{arm}", context, samples)
            result["seed"] = seed
            results[arm].append(result)
            for name, status in result["final"].items():
                print(
                    f"  {name}: {status['off_target']:+.1%} off, val {result['val_loss'][name]:.4f}"
                )
    data = {"teacher_val_loss": teacher_loss, "seeds": seeds, "results": results,
            "teacher_seconds": teacher_seconds, "teacher": teacher_args["config"],
            "context": context, "path": PATH}  # fmt: skip
    write_result("elastic-llama", args.quick, render(data, args.quick), data)


def render(data: dict[str, Any], quick: bool) -> str:
    """The Markdown of a result (``--tables-only`` redraws it from the JSON)."""
    results: dict[str, list[dict[str, Any]]] = data["results"]
    seeds, teacher_loss, context = data["seeds"], data["teacher_val_loss"], data["context"]
    teacher_seconds, sizes = data["teacher_seconds"], data["teacher"]
    budgets = list(results["own"][0]["own"])
    lines = [
        f"### elastic-llama ({'quick' if quick else 'full'})",
        "",
        f"Command: `python benchmarks/elastic_llama.py{' --quick' if quick else ''}`. "
        f"Teacher: LlamaForCausalLM (hidden {sizes['hidden_size']}, {sizes['num_attention_heads']} "
        f"query heads sharing {sizes['num_key_value_heads']} key/value heads of "
        f"{sizes['head_dim']}, SwiGLU {sizes['intermediate_size']}, "
        f"{sizes['num_hidden_layers']} layers; bytes as tokens), validation loss "
        f"{teacher_loss:.4f} at context {context}. Nested runs: the two-stage curriculum "
        f"of examples/elastic_llama.yaml{' (durations shrunk)' if quick else ''} through "
        f"{data.get('path', '`train_nested` (an own loop)')}; seeds {seeds}. Cells: median "
        "(min – max) over seeds.",
        "",
        "Budgets against their parameter targets (tolerance 5 %), off target = "
        "params / (target x full) - 1. `paper`: router loss weight 1, the router's own "
        "choice; `own`: weight 10 (as configured), own choice; `projected`: weight 10 and "
        "`router.project: 0.05` (pinned at the end of the anneal, then trained on); "
        "`+ extract --project`: the own choice projected after training:",
        "",
        "| budget | target | paper | paper + extract --project | own | own + extract --project | projected |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name in budgets[1:]:
        cells = []
        for arm in ARMS:
            cells.append(pct([r["own"][name]["off_target"] for r in results[arm]]))
            if arm != "projected":
                cells.append(pct([r["final"][name]["off_target"] for r in results[arm]]))
        target = results["own"][0]["own"][name]["target"]
        lines.append(f"| {name} | {target:.2f} | " + " | ".join(cells) + " |")
    for arm in ARMS:
        outside = sum(not r["own"][n]["ok"] for r in results[arm] for n in budgets[1:])
        lines.append("")
        lines.append(
            f"`{arm}`: the router's choice missed the 5 % tolerance in {outside} of "
            f"{len(seeds) * (len(budgets) - 1)} (seed, budget) cases"
            + ("." if arm == "projected" else "; `stagetrain extract` refuses those unless "
               "`--project` or `--allow-off-target`.")
        )  # fmt: skip
    lines += [
        "",
        "Validation loss per budget (context 256):",
        "",
        "| budget | " + " | ".join(ARMS) + " | teacher |",
        "|---|" + "---|" * len(ARMS) + "---|",
    ]
    for name in budgets:
        cells = [spread([r["val_loss"][name] for r in results[arm]]) for arm in ARMS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {teacher_loss:.4f} |")
    diffs = [
        e["max_abs_diff"] for arm in results.values() for r in arm for e in r["exports"].values()
    ]
    gaps = [
        abs(e["val_loss"] - r["val_loss"][n])
        for r in results["projected"]
        for n, e in r["exports"].items()
    ]
    lines += [
        "",
        "Exports: mid and small of every run written in the Hugging Face format "
        "(`stagetrain extract --format hf`) and loaded back with "
        f"`AutoModelForCausalLM.from_pretrained`: max |loaded − masked parent| logit "
        f"difference {max(diffs):.1e}; validation loss of the loaded model against the masked "
        f"parent at that budget: max difference {max(gaps):.1e}.",
        "",
        "Wall-clock seconds: teacher "
        f"{teacher_seconds:.0f}; nested runs "
        + ", ".join(f"{arm} {spread([r['seconds'] for r in rs], 0)}" for arm, rs in results.items())
        + ".",
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""The two-stage LLM recipe against two baselines at an equal token budget, over seeds.

    python benchmarks/llm.py [--jobs 1] [--threads N]   # examples/llm_two_stage.yaml, 5 seeds
    python benchmarks/llm.py --quick [--jobs 1]         # the quick variant, 2 seeds
    python benchmarks/llm.py --render                   # rewrite results/llm.md from llm.json

Arms (each from the recipe's config; same model, optimizer and tokens, and the same batch
size except in ``same-steps``' first stage):

* ``curriculum``: as declared: stage 1 code at context 64 (warmup, constant LR), stage 2
  70 % docs / 30 % code replay at context 256 (LR decaying linearly to 0);
* ``long-only``: the same two stages, both at context 256 (what the short context buys);
* ``mix``: one stage at context 256 on the curriculum's overall token mixture (code share
  ``(T1 + 0.3 T2) / (T1 + T2)``), with the same LR shape over tokens as one WSD schedule
  (warmup, stable, linear decay over the last ``T2 / (T1 + T2)``): what the staging buys;
* ``same-steps``: long-only with stage 1's batch cut by the context ratio (32 x 64 and
  8 x 256 tokens per step), so stage 1 takes the curriculum's optimizer steps: a control
  for the curriculum's 4x more (smaller) updates at an equal token budget.

These are not the arms :mod:`stagetrain.arms` derives (those keep every stage's length
and LR and change only its data); they are written here, so the comparison directory
is prepared the way :func:`stagetrain.compare.prepare` prepares one (``compare.json``,
``arms/*.yaml``, seed ``i`` varying the initialisation, batch order and data seed) and
trained by the same worker pool (:func:`stagetrain.compare.run_all`).

Metrics: validation loss on both domains at context 256 at the end of the run, per arm
(median, IQR, mean with a BCa interval), and the curriculum against each baseline with
the tool's statistics: the mean paired difference with the exact sign-flip test and its
inverted interval, and its verdict; the tokens the curriculum needs to reach each
baseline's median final loss, as censored data (fraction of seeds that reached it, the
median only when more than half did), with the paired test on tokens to that target.
Writes benchmarks/results/llm[-quick].{md,json} (the JSON holds the per-seed values the
table is computed from); the runs live in runs/bench/llm[-quick]/ (``stagetrain report``
reads it; a rerun skips finished runs). The token files are made first by
``examples/llm_prepare.sh`` (skipped when up to date).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from stagetrain.checkpoint import atomic_write_text
from stagetrain.compare import (
    VARY,
    CompareSpec,
    RunResult,
    TargetMetric,
    produced_metrics,
    read_run,
    run_all,
    time_verdict,
    verdict,
)
from stagetrain.config import CurriculumConfig, parse_config
from stagetrain.stats import paired_difference, paired_times, summarize, time_to_target
from stagetrain.time import Duration
from stagetrain.workers import default_threads

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
METRICS = ("val_docs.loss", "val_code.loss")
ARM_TEXT = {
    "curriculum": "the recipe as declared",
    "long-only": "both stages at context 256",
    "mix": "one stage at 256 on the overall token mixture, WSD over tokens",
    "same-steps": "long-only with stage 1's batch a quarter (the curriculum's stage-1 steps)",
}


def tokens_of(stage: dict[str, Any]) -> float:
    duration = Duration.parse(stage["duration"])
    assert duration.unit.value == "tok", "the recipe's stages are measured in tokens"
    return duration.value


def arm_configs(config: dict[str, Any]) -> dict[str, CurriculumConfig]:
    """The three arms' validated configs from the recipe's (see the module docstring)."""
    general, anneal = config["stages"]
    long = anneal["seq_len"]
    long_only = copy.deepcopy(config)
    first = long_only["stages"][0]
    first["seq_len"] = long
    first["data"]["args"]["seq_len"] = long
    t1, t2 = tokens_of(general), tokens_of(anneal)
    shares = {s["name"]: float(s["weight"]) for s in anneal["data"]["sources"]}
    total_share = sum(shares.values())
    docs_source = next(s for s in anneal["data"]["sources"] if s["name"] == "docs")
    code_source = copy.deepcopy(general["data"])
    code_source["args"]["seq_len"] = long
    code_source["weight"] = (t1 + t2 * shares["code-replay"] / total_share) / (t1 + t2)
    docs = copy.deepcopy(docs_source)
    docs["weight"] = t2 * shares["docs"] / total_share / (t1 + t2)
    optimizer = {k: v for k, v in general["optimizer"].items() if k != "warmup"}
    warmup = Duration.parse(general["optimizer"]["warmup"]).value * t1 / (t1 + t2)
    optimizer["schedule"] = {"kind": "wsd", "warmup": f"{warmup!r}dur",
                             "decay": f"{t2 / (t1 + t2)!r}dur", "end": 0.0}  # fmt: skip
    mix = copy.deepcopy(config)
    mix["stages"] = [{"name": "mix", "duration": f"{int(t1 + t2)}tok", "seq_len": long,
                      "data": {"sources": [code_source, docs]}, "optimizer": optimizer}]  # fmt: skip
    same_steps = copy.deepcopy(long_only)
    batch = general.get("batch_size", config["batch_size"])
    if batch * general["seq_len"] % long:
        raise SystemExit(f"stage 1's batch {batch} x {general['seq_len']} is not whole at {long}")
    same_steps["stages"][0]["batch_size"] = batch * general["seq_len"] // long
    arms = {"curriculum": config, "long-only": long_only, "mix": mix, "same-steps": same_steps}
    return {name: parse_config(arm, source=f"arm {name}") for name, arm in arms.items()}


def build_spec(configs: Mapping[str, CurriculumConfig], seeds: int) -> CompareSpec:
    """The comparison's description, as :func:`stagetrain.compare.prepare` makes one:
    run ``i`` uses seed ``seed + i`` and data seed ``data_seed + i`` (``--vary init,data``).

    The fingerprint covers every arm's config (the arms are defined here, not derived), so
    a directory of runs of other arm definitions is refused rather than reused."""
    config = configs["curriculum"]
    base_data = config.data_seed if config.data_seed is not None else config.seed
    labels = [config.seed + i for i in range(seeds)]
    fingerprints = {name: arm.fingerprint() for name, arm in configs.items()}
    text = json.dumps(fingerprints, sort_keys=True, separators=(",", ":"))
    return CompareSpec(
        arms=list(configs),
        seeds=labels,
        init_seeds=list(labels),
        data_seeds=[base_data + i for i in range(seeds)],
        vary=list(VARY),
        metric=METRICS[0],
        metrics=produced_metrics(config),
        fingerprint=hashlib.sha256(text.encode()).hexdigest(),
    )


def write_comparison(out: Path, configs: Mapping[str, CurriculumConfig], spec: CompareSpec) -> None:
    """The directory `stagetrain compare` would write, with our arms.

    An existing directory is reused when its runs stay valid: more or fewer seeds (seed i
    is seed i), and arms added beside arms whose definitions did not change."""
    spec_path = out / "compare.json"
    if spec_path.exists():
        old = CompareSpec.from_file(spec_path)
        shared = min(len(old.seeds), len(spec.seeds))
        same_seeds = old.seeds[:shared] == spec.seeds[:shared]
        same_data = old.data_seeds[:shared] == spec.data_seeds[:shared]
        if not (same_seeds and same_data) or not set(old.arms) <= set(configs):
            raise SystemExit(f"{out} holds another comparison; remove it")
        for name in old.arms:
            stored = yaml.safe_load((out / "arms" / f"{name}.yaml").read_text())
            if parse_config(stored).fingerprint() != configs[name].fingerprint():
                raise SystemExit(f"{out} holds another comparison (arm {name} differs); remove it")
    (out / "arms").mkdir(parents=True, exist_ok=True)
    for name, arm in configs.items():
        text = yaml.safe_dump(arm.to_dict(), sort_keys=False)
        atomic_write_text(out / "arms" / f"{name}.yaml", text)
    curriculum = yaml.safe_dump(configs["curriculum"].to_dict(), sort_keys=False)
    atomic_write_text(out / "config.yaml", curriculum)
    atomic_write_text(spec_path, json.dumps(spec.to_dict(), indent=1))


def prepare_data(quick: bool) -> None:
    command = ["bash", str(ROOT / "examples" / "llm_prepare.sh"), *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(command, cwd=ROOT, env=env, check=True)


# --- per-seed values -> the tables ----------------------------------------------------------


def collect(out: Path, spec: CompareSpec) -> dict[str, Any]:
    """The per-seed values the tables are computed from: each arm's final value per metric,
    and each run's evaluated curve (tokens, value) to find when it reached a target."""
    data: dict[str, Any] = {"seeds": spec.seeds, "data_seeds": spec.data_seeds, "metrics": {}}
    failed: list[str] = []
    for text in METRICS:
        name, _, key = text.rpartition(".")
        metric = TargetMetric(name, key)
        runs: dict[str, list[RunResult]] = {
            arm: [read_run(out, arm, s, metric) for s in spec.seeds] for arm in spec.arms
        }
        failed += [f"{a} seed {r.seed}: {r.status} {r.error or ''}".strip()
                   for a, rs in runs.items() for r in rs if r.status != "completed"]  # fmt: skip
        data["metrics"][text] = {
            arm: {
                "final": [r.final for r in rs],
                "curve": [[(p["tokens"], p["value"]) for p in r.curve] for r in rs],
            }
            for arm, rs in runs.items()
        }
    if failed:
        raise SystemExit(f"runs without results (rerun to resume them): {sorted(set(failed))}")
    docs = TargetMetric(*METRICS[0].split("."))
    data["wall_s"] = {arm: [read_run(out, arm, s, docs).curve[-1]["time"] for s in spec.seeds]
                      for arm in spec.arms}  # fmt: skip
    return data


def _interval(low: float, high: float, fmt: str) -> str:
    if math.isnan(low) or math.isnan(high):
        return "[—]"
    return f"[{low:{fmt}}, {high:{fmt}}]"


def _tokens_to(curves: list[list[list[float]]], target: float) -> list[float | None]:
    """Per run, the tokens at the first evaluation with a loss <= ``target`` (None: never)."""
    return [next((t for t, v in curve if v <= target), None) for curve in curves]


def _tokens_text(t: Any) -> str:
    reached = f"{t.reached}/{t.n} {_interval(t.reached_low, t.reached_high, '.2f')}"
    return reached + (f", median {t.median:,.0f}" if t.median is not None else ", median —")


def tables(data: dict[str, Any]) -> str:
    """The Markdown tables, every statistic computed here from the stored per-seed values
    with stagetrain's functions (lower loss is better)."""
    lines: list[str] = []
    for text, arms in data["metrics"].items():
        lines += [f"#### {text} at context 256 (lower is better)", "",
                  "| arm | final median [IQR] | final mean [95% CI] |", "|---|---|---|"]  # fmt: skip
        for arm, values in arms.items():
            s = summarize(values["final"])
            lines.append(f"| {arm} | {s.median:.4f} [{s.q25:.4f}, {s.q75:.4f}] | "
                         f"{s.mean:.4f} {_interval(s.ci_low, s.ci_high, '.4f')} |")  # fmt: skip
        lines += ["", "| curriculum vs | Δ final (curriculum − it) [95% CI] | verdict | "
                  "target: its median final | curriculum reached target [95% CI], median tokens | "
                  "it reached target, median tokens | tokens to target vs it |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        curriculum = arms["curriculum"]
        for arm in (a for a in arms if a != "curriculum"):
            d = paired_difference(curriculum["final"], arms[arm]["final"], higher_is_better=False)
            words = verdict(d, False).replace("than baseline", f"than {arm}")
            target = summarize(arms[arm]["final"]).median
            ours = _tokens_to(curriculum["curve"], target)
            theirs = _tokens_to(arms[arm]["curve"], target)
            versus = time_verdict(paired_times(ours, theirs))
            lines.append(
                f"| {arm} | {d.mean:+.4f} {_interval(d.ci_low, d.ci_high, '+.4f')} "
                f"(better on {d.wins}/{d.n} seeds) | {words} | {target:.4f} | "
                f"{_tokens_text(time_to_target(ours))} | {_tokens_text(time_to_target(theirs))} "
                f"| {versus} |"
            )
        lines.append("")
    totals = {arm: max(t for curve in v["curve"] for t, _ in curve) for arm, v in arms.items()}
    n = len(data["seeds"])
    lines += [
        "Tokens trained: "
        + ", ".join(f"{a} {t:,.0f}" for a, t in totals.items())
        + " (each stage's tokens rounded to whole steps); evaluations every "
        f"{data['eval_every']} and at each stage end. Δ: mean paired difference (run i of every "
        "arm has the same seed and data seed), its interval the exact "
        "sign-flip test inverted, so the verdict (p < 0.05) and the interval agree; means: "
        "BCa bootstrap intervals. Tokens to target: censored (a run that never reached it "
        "counts as slower than any that did); a median only when more than half reached it; "
        "the paired test ranks the two runs of each seed.",
    ]
    if 2 / 2**n >= 0.05:
        lines.append(
            f"With {n} seeds the smallest possible p is {2 / 2**n:.3g}: no test here can reach "
            "0.05, and the Δ intervals are unbounded."
        )
    wall = {k: [round(v, 1) for v in vs] for k, vs in data["wall_s"].items()}
    lines += ["", f"Wall-clock seconds per run (the run's own clock): {json.dumps(wall)}"]
    return "\n".join(lines)


def render(data: dict[str, Any]) -> str:
    """``results/llm[-quick].md`` from ``results/llm[-quick].json``."""
    ran = next(iter(data["metrics"].values()))
    arms = "; ".join(f"{k}: {ARM_TEXT[k]}" for k in ran)
    return (f"### llm-two-stage ({'quick' if data['quick'] else 'full'})\n\n"
            f"Command: `{data['command']}` ({data['elapsed_s'] / 60:.1f} min including data "
            f"preparation; a rerun skips finished runs, and the runs' own clocks add up to "
            f"{sum(map(sum, data['wall_s'].values())) / 60:.0f} min); config `{data['config']}`, seeds {data['seeds']} (data seeds "
            f"{data['data_seeds']}); arms: {arms}.\n\n" + tables(data)
            + f"\n\nMachine: {data['machine']}.\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: the cores // jobs)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=None, help="default: 5 (quick: 2)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the .md from the stored .json")  # fmt: skip
    args = parser.parse_args()
    name = "llm-quick" if args.quick else "llm"
    if args.render:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        (RESULTS / f"{name}.md").write_text(render(data))
        return
    os.chdir(ROOT)  # the recipe's token files are relative paths: data/llm...
    recipe = (
        ROOT / "examples" / ("llm_two_stage_quick.yaml" if args.quick else "llm_two_stage.yaml")
    )
    start = time.perf_counter()
    prepare_data(args.quick)
    config = yaml.safe_load(recipe.read_text())
    configs = arm_configs(config)
    spec = build_spec(configs, args.seeds or (2 if args.quick else 5))
    out = ROOT / "runs" / "bench" / name
    write_comparison(out, configs, spec)
    threads = args.threads or default_threads(args.jobs)
    torch.set_num_threads(1)  # the workers fork from here (see stagetrain.compare.driver)
    run_all(out, spec, configs, jobs=args.jobs, threads=threads,
            echo=lambda line: print("  " + line, flush=True))  # fmt: skip
    data = collect(out, spec)
    command = "python benchmarks/llm.py" + (" --quick" if args.quick else "") + (
        f" --jobs {args.jobs}" + (f" --threads {args.threads}" if args.threads else "")
        + (f" --seeds {args.seeds}" if args.seeds else ""))  # fmt: skip
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
               f"(shared with other jobs), no GPU, {threads} torch thread(s) per run, "
               f"torch {torch.__version__}, numpy {np.__version__}")  # fmt: skip
    data.update(quick=args.quick, command=command, machine=machine,
                config=str(recipe.relative_to(ROOT)), eval_every=config["eval_every"],
                elapsed_s=time.perf_counter() - start)  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    text = render(data)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

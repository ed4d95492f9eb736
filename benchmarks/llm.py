"""The two-stage LLM recipe against two baselines at an equal token budget, over seeds.

    python benchmarks/llm.py [--jobs 2]            # examples/llm_two_stage.yaml, 5 seeds
    python benchmarks/llm.py --quick [--jobs 2]    # the quick variant, 2 seeds

Arms (each from the recipe's config; same model, optimizer, batch size and tokens):

* ``curriculum``: as declared: stage 1 code at context 64 (warmup, constant LR), stage 2
  70 % docs / 30 % code replay at context 256 (LR decaying linearly to 0);
* ``long-only``: the same two stages, both at context 256 (what the short context buys);
* ``mix``: one stage at context 256 on the curriculum's overall token mixture (code share
  ``(T1 + 0.3 T2) / (T1 + T2)``), with the same LR shape over tokens as one WSD schedule
  (warmup, stable, linear decay over the last ``T2 / (T1 + T2)``): what the staging buys.

Metrics: validation loss on both domains at context 256 at the end of the run (median and
95 % bootstrap interval over seeds, paired differences against the curriculum with
Wilcoxon p-values), and the tokens the curriculum needs to reach each baseline's median
final loss. Writes benchmarks/results/llm[-quick].{md,json}; the runs live in
runs/bench/llm[-quick]/ (``stagetrain report`` reads it; a rerun skips finished runs).
The token files are made first by ``examples/llm_prepare.sh`` (skipped when up to date).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from stagetrain.checkpoint import atomic_write_text
from stagetrain.compare import CompareSpec, TargetMetric, read_run, run_all
from stagetrain.config import parse_config
from stagetrain.stats import paired_difference, summarize
from stagetrain.time import Duration

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
METRICS = ("val_docs.loss", "val_code.loss")


def tokens_of(stage: dict[str, Any]) -> float:
    duration = Duration.parse(stage["duration"])
    assert duration.unit.value == "tok", "the recipe's stages are measured in tokens"
    return duration.value


def arm_configs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The three arms' configs from the recipe's (see the module docstring)."""
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
    for arm in (long_only, mix):
        parse_config(arm)  # fail here, not in a subprocess
    return {"curriculum": config, "long-only": long_only, "mix": mix}


def prepare_data(quick: bool) -> None:
    command = ["bash", str(ROOT / "examples" / "llm_prepare.sh"), *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def write_comparison(out: Path, arms: dict[str, dict[str, Any]], seeds: list[int]) -> CompareSpec:
    """A directory `stagetrain compare` would write, with our three arms."""
    config = parse_config(arms["curriculum"])
    spec = CompareSpec(list(arms), seeds, METRICS[0], config.fingerprint())
    spec_path = out / "compare.json"
    if spec_path.exists() and json.loads(spec_path.read_text())["fingerprint"] != spec.fingerprint:
        raise SystemExit(f"{out} holds another comparison; remove it")
    (out / "arms").mkdir(parents=True, exist_ok=True)
    for name, arm in arms.items():
        atomic_write_text(out / "arms" / f"{name}.yaml", yaml.safe_dump(arm, sort_keys=False))
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(spec_path, json.dumps(spec.to_dict(), indent=1))
    return spec


def analyse(out: Path, spec: CompareSpec) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    data: dict[str, Any] = {"seeds": spec.seeds, "metrics": {}}
    for text in METRICS:
        name, key = text.split(".")
        metric = TargetMetric(name, key)
        runs = {arm: [read_run(out, arm, s, metric) for s in spec.seeds] for arm in spec.arms}
        finals = {arm: [r.final for r in rs] for arm, rs in runs.items()}
        if any(v is None for vs in finals.values() for v in vs):
            failed = [f"{a} seed {r.seed}: {r.status}" for a, rs in runs.items() for r in rs
                      if r.final is None]  # fmt: skip
            raise SystemExit(f"runs without results: {failed}")
        lines += [f"#### {text} at context 256 (lower is better)", "",
                  "| arm | final median [IQR] | mean [95% CI] | Δ vs curriculum [95% CI] | p (Wilcoxon) | this arm better on | tokens for the curriculum to reach this arm's median final (median over seeds) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        entry: dict[str, Any] = {"final": finals}
        for arm in spec.arms:
            values = [float(v) for v in finals[arm] if v is not None]
            s = summarize(values)
            row = (f"| {arm} | {s.median:.4f} [{s.q25:.4f}, {s.q75:.4f}] | "
                   f"{s.mean:.4f} [{s.ci_low:.4f}, {s.ci_high:.4f}] |")  # fmt: skip
            if arm == "curriculum":
                lines.append(row + " — | — | — | — |")
                continue
            curriculum = [float(v) for v in finals["curriculum"] if v is not None]
            d = paired_difference(values, curriculum, higher_is_better=False)
            hits = [r.time_to(s.median, False) for r in runs["curriculum"]]
            reached = sorted(h["tokens"] if h else float("inf") for h in hits)
            median = reached[len(reached) // 2] if len(reached) % 2 else (
                (reached[len(reached) // 2 - 1] + reached[len(reached) // 2]) / 2)  # fmt: skip
            total = runs[arm][0].curve[-1]["tokens"]
            reach = "not reached" if median == float("inf") else f"{median:,.0f} of {total:,}"
            lines.append(
                row + f" {d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}] | {d.p_value:.3g} | "
                f"{d.wins}/{d.n} seeds | {reach} |"
            )
            entry[f"{arm}_minus_curriculum"] = d.__dict__
            entry[f"curriculum_tokens_to_{arm}_median"] = [h["tokens"] if h else None for h in hits]
        lines.append("")
        data["metrics"][text] = entry
    wall = {arm: [read_run(out, arm, s, TargetMetric("val_docs", "loss")).curve[-1]["time"]
                  for s in spec.seeds] for arm in spec.arms}  # fmt: skip
    data["wall_s"] = wall
    lines.append("Wall-clock seconds per run (the run's own clock): " + json.dumps(
        {k: [round(v, 1) for v in vs] for k, vs in wall.items()}))  # fmt: skip
    return "\n".join(lines), data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=None, help="default: 5 (quick: 2)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the recipe's token files are relative paths: data/llm...
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    recipe = (
        ROOT / "examples" / ("llm_two_stage_quick.yaml" if args.quick else "llm_two_stage.yaml")
    )
    start = time.perf_counter()
    prepare_data(args.quick)
    arms = arm_configs(yaml.safe_load(recipe.read_text()))
    name = "llm-quick" if args.quick else "llm"
    out = ROOT / "runs" / "bench" / name
    spec = write_comparison(out, arms, seeds)
    run_all(out, spec, jobs=args.jobs, echo=lambda line: print("  " + line, flush=True))
    table, data = analyse(out, spec)
    elapsed = time.perf_counter() - start
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}, numpy {np.__version__}")  # fmt: skip
    text = (f"### llm-two-stage ({'quick' if args.quick else 'full'})\n\n"
            f"Command: `python benchmarks/llm.py{' --quick' if args.quick else ''} --jobs {args.jobs}` "
            f"({elapsed / 60:.1f} min including data preparation); config `{recipe.relative_to(ROOT)}`, "
            f"seeds {seeds}; arms: curriculum, long-only (both stages at context 256), mix (one "
            "stage at 256 on the overall token mixture, WSD over tokens).\n\n" + table
            + f"\n\nMachine: {machine}.\n")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps({**data, "elapsed_s": elapsed}, indent=1))
    print(text)


if __name__ == "__main__":
    main()

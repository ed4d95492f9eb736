"""The two-stage LLM recipe, quick variant, end to end: prepare, run, export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path) -> str:
    # The commands run in cwd: a relative PYTHONPATH (PYTHONPATH=src) must not break.
    paths = [
        str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(paths)}  # fmt: skip
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quick_llm_recipe_trains_both_stages_and_exports(tmp_path: Path) -> None:
    prepared = run(["bash", str(ROOT / "examples" / "llm_prepare.sh"), "--quick"], tmp_path)
    assert prepared.count("wrote data/llm-quick/") == 4
    again = run(["bash", str(ROOT / "examples" / "llm_prepare.sh"), "--quick"], tmp_path)
    assert again.count("up to date data/llm-quick/") == 4  # the tokenizer retrains identically
    side = json.loads((tmp_path / "data" / "llm-quick" / "docs-train.json").read_text())
    assert side["dtype"] == "uint16" and side["eos_id"] == 0 and side["max_token_id"] < 2048

    config = ROOT / "examples" / "llm_two_stage_quick.yaml"
    cli = [sys.executable, "-m", "stagetrain.cli"]
    run(
        [*cli, "run", str(config), "--run-dir", "runs/q", "--no-progress", "--device", "cpu"],
        tmp_path,
    )
    records = [json.loads(x) for x in (tmp_path / "runs/q/metrics.jsonl").read_text().splitlines()]
    starts = [(r["stage"], r["tokens"]) for r in records if r["type"] == "stage_start"]
    assert starts == [("general", 0), ("anneal", 120_832)]
    evals = {name: [r for r in records if r["type"] == "eval" and r["name"] == name]
             for name in ("val_code", "val_docs")}  # fmt: skip
    for name, points in evals.items():
        assert {r["stage"] for r in points} == {"general", "anneal"}, name
        assert all(math.isfinite(r["loss"]) for r in points)
        assert points[-1]["loss"] < points[0]["loss"] < math.log(2048) + 0.5, name
    lrs = [r["lr"] for r in records if r["type"] == "train" and r["stage"] == "anneal"]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.2 * 3e-3  # decaying to zero

    out = run([*cli, "export", "runs/q", "--format", "hf", "--out", "runs/q-hf"], tmp_path)
    assert "loaded back: max |logits - run's model|" in out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "runs/q-hf"), local_files_only=True)
    assert model.config.vocab_size == 2048 and model.config.n_positions == 256

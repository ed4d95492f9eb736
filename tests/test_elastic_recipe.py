"""The Llama recipe end to end, quick: a teacher pretrained with fit(), the nested parent
trained through the two-stage budget curriculum, a budget extracted, written as a
Hugging Face directory, loaded back by transformers and evaluated; and the
``stagetrain extract`` command on a Hugging Face run."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from stagetrain import Curriculum, fit, parse_config
from stagetrain.cli import main
from stagetrain.elastic import check_budgets, extract, save_hf
from stagetrain.recipes.elastic import train_nested, validation_loss

EXAMPLES = Path(__file__).parent.parent / "examples"
TINY = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 64}  # fmt: skip
TINY_CHOICES = {"width": [24, 32, 40, 48], "heads": [2, 4, 6], "ffn": [32, 64, 96],
                "depth": [1, 2]}  # fmt: skip


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def quick_teacher(run_dir: Path) -> dict[str, Any]:
    config = load("elastic_llama_teacher.yaml")
    config["model"]["args"]["config"].update(TINY)
    config.update(batch_size=16, log_every=10, eval_every=None)
    config["evals"][0]["data"]["args"]["context"] = 64
    config["evals"][0]["max_samples"] = 16
    stage = config["stages"][0]
    stage.update(duration="40ba", seq_len=64)
    stage["data"]["args"]["context"] = 64
    stage["optimizer"].update(warmup="5ba")
    return config


def quick_nested(teacher_dir: Path) -> dict[str, Any]:
    config = load("elastic_llama.yaml")
    args = config["model"]["args"]
    args["config"].update(TINY)
    args.update(weights=str(teacher_dir), choices=TINY_CHOICES)
    args["router"].update(hidden=32, anneal_forwards=30)
    args["calibration"] = {"batches": 2, "batch_size": 8, "seq_len": 64}
    config["teacher"]["args"] = {"config": copy.deepcopy(args["config"]),
                                 "weights": str(teacher_dir), "output": "logits"}  # fmt: skip
    config.update(batch_size=16, eval_every=None)
    for stage, (steps, seq) in zip(config["stages"], [("30ba", 32), ("30ba", 64)], strict=True):
        stage.update(duration=steps, seq_len=seq)
        if "batch_size" in stage:
            stage["batch_size"] = 8
        for source in stage["data"]["sources"]:
            source["args"]["args"]["context"] = 64
    config["stages"][0]["optimizer"]["warmup"] = "5ba"
    for ev in config["evals"]:
        ev["data"]["args"]["args"]["context"] = 64
        ev["max_samples"] = 16
    return config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("llama") / "teacher"
    torch.manual_seed(0)
    curriculum = Curriculum(parse_config(quick_teacher(run_dir)), progress=False)
    model = curriculum.build_model()
    fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False)
    return run_dir


def test_llama_recipe_quick(teacher_dir: Path, tmp_path: Path) -> None:
    config = quick_nested(teacher_dir)
    run = train_nested(config, log_every=10)
    parent = run.model
    # Stage 1 uniform, stage 2 weighted, as configured; the router was projected when
    # its anneal ended, so every budget is within 5 % of its target.
    statuses = check_budgets(parent, 0.05)
    assert all(s.ok and s.pinned for s in statuses), [s.line() for s in statuses]
    # The nested parent at the full budget still tracks the teacher, and each budget's
    # loss is finite and no better than the full one by much (they share the weights).
    losses = {s.name: validation_loss(parent, budget=s.name, context=64, samples=32)
              for s in statuses}  # fmt: skip
    teacher_loss = validation_loss(run.teacher, context=64, samples=32)
    assert losses["full"] < teacher_loss + 0.2
    assert losses["small"] > losses["full"] - 0.05
    # Extract, write a Hugging Face directory with the byte tokenizer, load it back.
    child = extract(parent, "small")
    out = tmp_path / "small"
    save_hf(child, parent.family, out, tokenizer="bytes")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "def main():\n    return 0\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == list(text.encode())
    with torch.no_grad():
        masked = parent(input_ids=ids, budget="small")
        assert (loaded(ids).logits - masked).abs().max() < 1e-5
    assert validation_loss(loaded, context=64, samples=32) == pytest.approx(
        losses["small"], abs=1e-4
    )
    assert sum(p.numel() for p in loaded.parameters()) == child.params


def test_extract_command_on_a_hugging_face_run(
    teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fit() on pair batches trains the full budget only (the budget reaches the model
    once fit passes dict batches); the extract command's plumbing is the same."""
    config = quick_nested(teacher_dir)
    for stage in config["stages"]:
        stage["duration"] = "2ba"
        stage["loss"] = [stage["loss"][0]]  # no router loss without budgets
        for source in stage["data"]["sources"]:
            source["builtin"], source["args"] = "stdlib_text", source["args"]["args"]
    config["evals"] = []
    curriculum = Curriculum(parse_config(config), progress=False)
    model = curriculum.build_model()
    run_dir = tmp_path / "run"
    fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False)
    out = tmp_path / "small"
    base = ["extract", str(run_dir), "--budget", "small", "--out", str(out), "--format", "hf"]
    # Two steps without budgets leave the router untrained: refused with a way out.
    code = main([*base, "--tolerance", "0.001"])
    err = capsys.readouterr().err
    assert code == 2 and "off its parameter target" in err and "--project" in err
    assert not out.exists()
    assert main([*base, "--project"]) == 0
    printed = capsys.readouterr()
    assert "max |reloaded - masked parent|" in printed.out
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    huge = ["extract", str(run_dir), "--budget", "huge", "--out", str(tmp_path / "huge")]
    assert main(huge) == 2
    assert "no budget 'huge'" in capsys.readouterr().err


def test_llama_recipe_through_fit_with_dict_batches(teacher_dir: Path, tmp_path: Path) -> None:
    """The production path (`stagetrain run examples/elastic_llama.yaml`): dict items
    {"input_ids", "labels", "budget"} called as model(**batch)."""
    config = quick_nested(teacher_dir)
    curriculum = Curriculum(parse_config(config), progress=False)
    model = curriculum.build_model()
    run_dir = tmp_path / "nested"
    fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False)
    statuses = check_budgets(model, 0.05)  # type: ignore[arg-type]
    assert all(s.ok and s.pinned for s in statuses), [s.line() for s in statuses]
    out = tmp_path / "small"
    assert main(["extract", str(run_dir), "--budget", "small", "--out", str(out),
                 "--format", "hf"]) == 0  # fmt: skip
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"

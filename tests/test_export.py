"""`stagetrain export`: a run's checkpoint as safetensors or a from_pretrained directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers_sources import token_file

from stagetrain.checkpoint import CheckpointStore
from stagetrain.cli import main
from stagetrain.config import ModelConfig
from stagetrain.modelio import logits_of
from stagetrain.registry import build_model, load_weights


def lm_run(tmp_path: Path, model: dict[str, Any], name: str) -> Path:
    """Train a few steps on a token file through `stagetrain run`; return the run directory."""
    config = {
        "name": name, "seed": 0, "batch_size": 4, "log_every": 2,
        "checkpoint": {"every": "3ba", "keep": 5}, "model": model,
        "stages": [{"name": "lm", "duration": "6ba", "seq_len": 8,
                    "optimizer": {"name": "adamw", "lr": 0.01},
                    "data": {"builtin": "tokens", "args": {
                        "files": token_file(tmp_path / "t.bin"), "dtype": "uint16", "seq_len": 8}}}],
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "runs" / name
    assert (
        main(["run", str(path), "--run-dir", str(run_dir), "--no-progress", "--device", "cpu"]) == 0
    )
    return run_dir


def trained(run_dir: Path, step: int | None = None) -> torch.nn.Module:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = build_model(ModelConfig(**config["model"]), seed=config["seed"])
    store = CheckpointStore(run_dir / "checkpoints")
    entries = store.entries()
    entry = entries[-1] if step is None else next(e for e in entries if e.step == step)
    model.load_state_dict(torch.load(store.directory / entry.file, weights_only=True)["model"])
    return model.eval()


IDS = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_hf_export_loads_with_from_pretrained_and_gives_the_same_logits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    model = {"factory": "stagetrain.recipes.hf_models:gpt2_lm",
             "args": {"vocab_size": 32, "n_positions": 16, "n_embd": 16, "n_layer": 1, "n_head": 2}}  # fmt: skip
    run_dir = lm_run(tmp_path, model, "gpt2")
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exported step 6 (stage 'lm')" in printed and "loaded back: max |logits" in printed
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        expected = logits_of(trained(run_dir)(IDS))
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=0, atol=1e-6)
    assert (
        loaded.get_input_embeddings().weight.data_ptr()
        == loaded.get_output_embeddings().weight.data_ptr()
    )
    provenance = json.loads((out / "export.json").read_text())
    assert provenance["step"] == 6 and provenance["format"] == "hf"
    # an earlier checkpoint, exported over the previous export
    assert (
        main(["export", str(run_dir), "--format", "hf", "--out", str(out), "--checkpoint", "3"])
        == 0
    )
    again = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=IDS).logits, logits_of(trained(run_dir, 3)(IDS)), rtol=0, atol=1e-6
        )
        assert not torch.allclose(again(input_ids=IDS).logits, expected)


@pytest.mark.slow
def test_safetensors_export_with_tied_weights_rebuilds_the_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run_dir = lm_run(
        tmp_path, {"factory": "helpers_sources:tied_lm", "args": {"vocab": 32}}, "tied"
    )
    out = tmp_path / "st"
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == {"embed.weight", "head.weight"}  # both keys, stored separately
    assert torch.equal(tensors["embed.weight"], tensors["head.weight"])
    assert json.loads((out / "export.json").read_text())["tied"] == [
        ["embed.weight", "head.weight"]
    ]
    rebuild = json.loads((out / "model.json").read_text())
    assert rebuild["factory"] == "helpers_sources:tied_lm" and Path(rebuild["weights"]).is_file()
    model = build_model(
        ModelConfig(**rebuild), seed=123
    ).eval()  # the weights, not the seed, decide
    with torch.no_grad():
        assert torch.equal(model(IDS), trained(run_dir)(IDS))
    assert load_weights(str(out / "model.safetensors"), field="w").keys() == tensors.keys()


@pytest.mark.slow
def test_export_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = lm_run(
        tmp_path, {"factory": "helpers_sources:tied_lm", "args": {"vocab": 32}}, "plain"
    )

    def error(*args: str) -> str:
        assert main(["export", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    out = str(tmp_path / "x")
    assert error(str(run_dir), "--format", "hf", "--out", out).startswith(
        "stagetrain: error: --format: hf needs a transformers model, but "
    )
    assert error(str(run_dir), "--format", "safetensors", "--out", out, "--checkpoint", "4") == (
        f"stagetrain: error: --checkpoint: {run_dir} has no checkpoint at step 4; kept steps: 3, 6"
    )
    assert error(str(tmp_path), "--format", "safetensors", "--out", out) == (
        f"stagetrain: error: RUN: {tmp_path} is not a run directory (no config.yaml)"
    )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert error(str(run_dir), "--format", "safetensors", "--out", str(busy)) == (
        f"stagetrain: error: --out: {busy} exists and is not an earlier export; remove it or choose another"
    )
    assert (busy / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left over

"""The Llama recipe end to end on the production path, quick: the teacher and the nested
parent trained by ``stagetrain run`` from shrunk copies of
examples/elastic_llama_teacher.yaml and examples/elastic_llama.yaml (dict items
``{"input_ids", "labels", "budget"}`` called as ``model(**batch)``), every budget
checked, extracted by ``stagetrain extract --format hf`` and ``--format stagetrain``,
loaded back and evaluated; resume mid stage 2; what the teacher makes of the budget."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers_for_tests import StopAt

from stagetrain import Curriculum, StageTrainError, fit, parse_config
from stagetrain.cli import main
from stagetrain.elastic import check_budgets, load_elastic_run, load_extracted
from stagetrain.elastic.hf import CausalLM, hf_causal_lm
from stagetrain.logs import read_records
from stagetrain.recipes.elastic import validation_loss

pytest.importorskip("transformers")  # the hf extra: absent where the dependency floors run
from transformers import AutoModelForCausalLM, AutoTokenizer

EXAMPLES = Path(__file__).parent.parent / "examples"
TINY = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 64}  # fmt: skip
TINY_CHOICES = {"width": [24, 36, 48], "heads": [2, 4, 6], "ffn": [32, 64, 96],
                "depth": [1, 2]}  # fmt: skip
ROUTER_TERM = "stagetrain.elastic.losses:router_loss"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def quick_teacher() -> dict[str, Any]:
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
    config.update(batch_size=16, eval_every=None, log_every=10)
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


def stagetrain_run(config: dict[str, Any], run_dir: Path) -> None:
    """``stagetrain run CONFIG --run-dir RUN_DIR`` (in-process)."""
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["run", str(path), "--run-dir", str(run_dir), "--no-progress"]) == 0


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("llama") / "teacher"
    stagetrain_run(quick_teacher(), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def nested_dir(teacher_dir: Path) -> Path:
    run_dir = teacher_dir.parent / "nested"
    stagetrain_run(quick_nested(teacher_dir), run_dir)
    return run_dir


def test_llama_recipe_quick(teacher_dir: Path, nested_dir: Path, tmp_path: Path) -> None:
    records = read_records(nested_dir / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    # Both loss terms are trained and logged; every budget is evaluated at its own size.
    assert all(f"loss/{ROUTER_TERM}" in r and "loss/kl_distill" in r for r in train)
    assert train[-1][f"loss/{ROUTER_TERM}"] < 0.05  # projected: within 5 % of every target
    names = {r["name"] for r in records if r["type"] == "eval"}
    assert names == {"val_full", "val_mid", "val_small"}
    parent: Any = load_elastic_run(nested_dir)
    assert int(parent.router.forwards) == 60  # one per training step
    # The router was projected when its anneal ended: every budget within 5 % of its target.
    statuses = check_budgets(parent, 0.05)
    assert all(s.ok and s.pinned for s in statuses), [s.line() for s in statuses]
    # The nested parent at the full budget still tracks the teacher, and each budget's
    # loss is finite and no better than the full one by much (they share the weights).
    losses = {s.name: validation_loss(parent, budget=s.name, context=64, samples=32)
              for s in statuses}  # fmt: skip
    teacher = hf_causal_lm(**quick_nested(teacher_dir)["teacher"]["args"]).eval()
    assert losses["full"] < validation_loss(teacher, context=64, samples=32) + 0.2
    assert losses["small"] > losses["full"] - 0.05
    # stagetrain extract --format hf: a folder transformers loads, byte tokenizer included.
    out = tmp_path / "small"
    assert main(["extract", str(nested_dir), "--budget", "small", "--format", "hf",
                 "--out", str(out)]) == 0  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
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
    small = next(s for s in statuses if s.name == "small")
    assert sum(p.numel() for p in loaded.parameters()) == small.params
    # stagetrain extract --format stagetrain: the same child in our format.
    assert (
        main(["extract", str(nested_dir), "--budget", "mid", "--out", str(tmp_path / "mid")]) == 0
    )
    with torch.no_grad():
        mid = load_extracted(tmp_path / "mid")(ids).logits
        want = parent(input_ids=ids, budget="mid")
        assert (mid - want).abs().max() < 1e-5


def test_extract_command_on_a_barely_trained_run(
    teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = quick_nested(teacher_dir)
    del config["model"]["args"]["router"]["project"]
    for stage in config["stages"]:
        stage["duration"] = "2ba"
    config["evals"] = []
    run_dir = tmp_path / "run"
    stagetrain_run(config, run_dir)
    capsys.readouterr()
    out = tmp_path / "small"
    base = ["extract", str(run_dir), "--budget", "small", "--out", str(out), "--format", "hf"]
    # Four steps do not train the router: its choice is refused at a tolerance below its
    # miss (a one-line error with a way out), and --project pins it within 5 %.
    parent: Any = load_elastic_run(run_dir)
    assert int(parent.router.forwards) == 4
    small = next(s for s in check_budgets(parent) if s.name == "small")
    assert small.off_target != 0, small.line()
    code = main([*base, "--tolerance", f"{abs(small.off_target) / 2}"])
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


def fit_run(config: dict[str, Any], run_dir: Path, **kwargs: Any) -> torch.nn.Module:
    curriculum = Curriculum(parse_config(config), progress=False)
    model = curriculum.build_model()
    fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False, **kwargs)
    return model


def test_nested_llama_resumes_bitwise_mid_stage_two(teacher_dir: Path, tmp_path: Path) -> None:
    config = quick_nested(teacher_dir)
    config["checkpoint"] = {"every": "10ba", "keep": 2}
    # The anneal ends (and the router projects) at step 50, after the resume point.
    config["model"]["args"]["router"]["anneal_forwards"] = 50
    full = fit_run(config, tmp_path / "full")
    fit_run(config, tmp_path / "cut", callbacks=[StopAt(45)])  # checkpoint at step 40
    resumed = fit_run(config, tmp_path / "cut", resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert int(b["router.forwards"]) == 60
    assert bool((b["router.pinned"] >= 0).all())  # projected after resuming, as uninterrupted


class StrictLlamaForCausalLM(torch.nn.Module):
    """A Hugging Face Llama behind the explicit forward signature transformers had up to
    4.4x (no ``**kwargs``), where an unknown keyword such as ``budget=`` is a TypeError."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_the_teacher_gets_the_students_batch_and_never_uses_the_budget(
    teacher_dir: Path, tmp_path: Path
) -> None:
    config = quick_nested(teacher_dir)
    for stage in config["stages"]:
        stage["duration"] = "3ba"
    config["evals"] = []
    curriculum = Curriculum(parse_config(config), progress=False)
    ours = curriculum.build_teacher()
    assert isinstance(ours, CausalLM)
    raw = ours.model.eval()  # the LlamaForCausalLM inside
    batch = curriculum.stages[0].batch(0, 0, 1)
    call = {k: v for k, v in batch.items() if k != "labels"}  # what the loop passes
    assert set(call) == {"input_ids", "budget"}
    with torch.no_grad():
        plain = raw(input_ids=batch["input_ids"]).logits
        assert torch.equal(ours.eval()(**call), plain)  # ours ignores the budget
        with pytest.raises(TypeError, match="budget"):
            StrictLlamaForCausalLM(raw)(**call)
        try:  # transformers 5 swallows unknown keywords; it must not compute anything else
            swallowed = raw(**call).logits
        except TypeError:
            swallowed = None
        assert swallowed is None or torch.equal(swallowed, plain)
    # Through fit: a teacher that cannot take the batch is named before step 0 ...
    strict = StrictLlamaForCausalLM(copy.deepcopy(raw))
    with pytest.raises(StageTrainError, match=r"stages\[0\]: the teacher cannot run.*budget"):
        fit_run(config, tmp_path / "strict", teacher=strict)
    # ... and the plain Hugging Face model as the teacher trains exactly as ours does: its
    # logits are aligned with the student's (no causal shift of its own).
    torch.manual_seed(0)
    with_ours = fit_run(config, tmp_path / "ours")
    with_raw = fit_run(config, tmp_path / "raw", teacher=copy.deepcopy(raw))
    a, b = with_ours.state_dict(), with_raw.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key

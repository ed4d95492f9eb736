"""Real PyTorch code runs unchanged (issue 17): any batch, any model output, your losses,
metrics and optimizers, seeds that reach factories, and logs a user can act on.

The reference workload is a ``transformers`` GPT-2 trained on variable-length documents
given as dict rows (``input_ids``, ``labels``) — padded by collation, with attention
masks, ``loss: model`` — next to a one-logit binary classifier.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config_dict

from stagetrain import ConfigError, Curriculum, TensorPairDataset, fit, parse_config
from stagetrain.logs import read_records

transformers = pytest.importorskip("transformers")

TESTS = Path(__file__).parent


def gpt2_config(**overrides: Any) -> dict[str, Any]:
    docs = {"factory": "helpers_for_tests:documents", "args": {"count": 300}}
    config: dict[str, Any] = {
        "name": "gpt2-docs",
        "seed": 0,
        "batch_size": 8,
        "log_every": 5,
        "eval_every": "10ba",
        "checkpoint": {"every": "10ba", "keep": 3},
        "model": {"factory": "helpers_for_tests:tiny_gpt2"},
        "evals": [
            {
                "name": "val",
                "data": {
                    "factory": "helpers_for_tests:documents",
                    "args": {"count": 48, "split": "val"},
                },
                "metrics": ["loss", "perplexity", "token_accuracy"],
                "batch_size": 16,
            }
        ],
        "stages": [
            {
                "name": "short",
                "duration": "15ba",
                "seq_len": 16,
                "loss": "model",
                "data": {**docs, "name": "docs"},
                "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1, "warmup": "3ba"},
            },
            {"name": "long", "duration": "15ba", "data": {**docs, "name": "docs"}},
        ],
    }
    config.update(overrides)
    return config


def run(config: dict[str, Any], run_dir: Path, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    curriculum = Curriculum(parse_config(config), progress=False)
    model = curriculum.build_model()
    result = fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False, **kwargs)
    return model, result


# --- the reference workload ----------------------------------------------------------------


def test_gpt2_trains_on_padded_dict_rows_with_its_own_loss(tmp_path: Path) -> None:
    model, result = run(gpt2_config(), tmp_path / "r")
    assert result.completed and result.state.step == 30
    val = result.metrics["val"]
    assert all(math.isfinite(v) for v in val.values())
    train = [r for r in read_records(tmp_path / "r" / "metrics.jsonl") if r["type"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    # Real tokens exclude padding: strictly fewer than the padded positions trained on.
    assert train[-1]["tokens_real"] > 0
    assert all(r["padded_tokens_per_s"] > r["tokens_per_s"] > 0 for r in train)

    # Perplexity and token accuracy are pad-aware and use the causal shift: recompute both
    # by hand from the model's own (shifted, -100-ignoring) loss on every token.
    from stagetrain.collate import collate

    curriculum = Curriculum(parse_config(gpt2_config()), progress=False)
    dataset = curriculum.eval_dataset(curriculum.config.evals[0])
    items = [dataset[i] for i in range(len(dataset))]
    nll_sum, tokens, correct = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), 16):
            batch = collate(items[start : start + 16])
            out = model(**batch)
            logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
            keep = labels != -100
            nll_sum += float(
                torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
            )
            tokens += int(keep.sum())
            correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
    assert val["perplexity"] == pytest.approx(math.exp(nll_sum / tokens), rel=1e-4)
    assert val["token_accuracy"] == pytest.approx(correct / tokens, rel=1e-6)


def test_cross_entropy_on_causal_lm_labels_equals_the_models_own_loss() -> None:
    curriculum = Curriculum(parse_config(gpt2_config()), progress=False)
    model = curriculum.build_model().eval()
    long = curriculum.stages[1]  # default cross_entropy... inherited: 'model'
    batch = long.batch(0)
    ce = Curriculum(
        parse_config(gpt2_config(stages=[{**gpt2_config()["stages"][0], "loss": "cross_entropy"}])),
        progress=False,
    ).stages[0]
    with torch.no_grad():
        own = long.loss(long.io.predict(model, batch), model=model)[0]
        ours = ce.loss(ce.io.predict(model, batch), model=model)[0]
    assert long.config.loss[0].name == "model"  # stage 2 inherited stage 1's loss
    assert float(ours) == pytest.approx(float(own), rel=1e-5)


def test_gpt2_run_killed_and_resumed_is_bitwise(tmp_path: Path) -> None:
    config = gpt2_config()
    config["model"]["args"] = {"kill_at": 22}  # inside stage 2, after the checkpoint at 20
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "stagetrain.cli", "run", str(path), "--no-progress"]
    path_env = f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path_env}
    subprocess.run([*cli, "--run-dir", str(tmp_path / "full")], check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip
    killed = subprocess.run(
        [*cli, "--run-dir", str(tmp_path / "cut")],
        env={**env, "STAGETRAIN_TEST_KILL": "1"},
        capture_output=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "summary.json").exists()
    subprocess.run([*cli, "--run-dir", str(tmp_path / "cut"), "--resume"], check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip
    full = torch.load(tmp_path / "full" / "checkpoints" / "ckpt-00000030.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "ckpt-00000030.pt", weights_only=True)
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    keys = ("step", "stage", "loss", "lr", "tokens_real")
    strip = lambda rs: [tuple(r.get(k) for k in keys) for r in rs if r["type"] == "train"]  # noqa: E731
    assert strip(read_records(tmp_path / "cut" / "metrics.jsonl")) == strip(
        read_records(tmp_path / "full" / "metrics.jsonl")
    )


# --- binary classifiers with one logit -----------------------------------------------------


def _binary_data(n: int = 256) -> TensorPairDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=generator)
    y = ((x[:, 0] + 0.5 * x[:, 1]) > 0.4).long()  # unbalanced: about a third positive
    return TensorPairDataset(x, y)


@pytest.mark.parametrize("loss", ["hinge", "bce_with_logits"])
def test_one_logit_binary_classifier(tmp_path: Path, loss: str) -> None:
    data = _binary_data()
    config = {
        "batch_size": 32,
        "model": {"builtin": "mlp", "args": {"in_features": 6, "hidden": [], "out_features": 1}},
        "evals": [{"name": "val", "data": "@data", "metrics": ["accuracy", "error"]}],
        "stages": [
            {
                "name": "only",
                "duration": "60ba",
                "data": "@data",
                "loss": loss,
                "optimizer": {"name": "sgd", "lr": 0.5},
            }
        ],
    }
    curriculum = Curriculum(parse_config(config), datasets={"data": data}, progress=False)
    model = curriculum.build_model()
    result = fit(model, curriculum, run_dir=tmp_path / "r", progress=False, tensorboard=False)
    with torch.no_grad():
        true = float(((model(data.inputs).squeeze(-1) > 0).long() == data.targets).float().mean())
    assert result.metrics["val"]["accuracy"] == pytest.approx(true)
    assert result.metrics["val"]["error"] == pytest.approx(1 - true)
    assert true > 0.85


def test_cross_entropy_refuses_a_one_logit_model_by_name(tmp_path: Path) -> None:
    data = _binary_data()
    config = {
        "model": {"builtin": "mlp", "args": {"in_features": 6, "hidden": [], "out_features": 1}},
        "stages": [{"name": "only", "duration": "2ba", "data": "@data"}],
    }
    curriculum = Curriculum(parse_config(config), datasets={"data": data}, progress=False)
    with pytest.raises(Exception, match="bce_with_logits"):
        fit(curriculum.build_model(), curriculum, run_dir=tmp_path / "r", progress=False)


# --- batches and sources of any shape ---------------------------------------------------------


def test_accuracy_skips_ignored_targets() -> None:
    from stagetrain.metrics import BuiltinMetric
    from stagetrain.modelio import Prediction

    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]]])  # predicts 0,1,0,0
    target = torch.tensor([[0, 1, 1, -100]])
    pred = Prediction(logits, target, None, logits, {"labels": target})
    metric, sums = BuiltinMetric("accuracy", {}), {}
    metric.update(pred, sums)
    assert metric.compute(sums)["accuracy"] == pytest.approx(2 / 3)  # not 2/4


class _DictInputModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(2, 2)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.a(x["dense"]) + self.b(x["extra"])


class _DictInputs:
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {
            "dense": torch.randn(3, generator=g),
            "extra": torch.randn(2, generator=g),
        }, torch.tensor(i % 2)


def test_pairs_whose_inputs_are_dicts(tmp_path: Path) -> None:
    config = {"batch_size": 8, "stages": [{"name": "s", "duration": "5ba", "data": "@d"}]}
    curriculum = Curriculum(parse_config(config), datasets={"d": _DictInputs()}, progress=False)
    result = fit(_DictInputModel(), curriculum, run_dir=tmp_path / "r", progress=False)
    assert result.completed and result.state.step == 5


def _token_pairs(length: int, n: int = 64) -> TensorPairDataset:
    tokens = torch.arange(n * (length + 1)).reshape(n, length + 1) % 256
    return TensorPairDataset(tokens[:, :-1], tokens[:, 1:])


def test_sources_of_different_lengths_share_a_stage_and_replay(tmp_path: Path) -> None:
    config = {
        "batch_size": 8,
        "model": {"builtin": "gpt", "args": {"context": 32, "width": 16, "layers": 1, "heads": 2}},
        "stages": [
            {"name": "short", "duration": "4ba", "data": "@short"},
            {
                "name": "long",
                "duration": "6ba",
                "data": {"sources": ["@short", "@long"], "replay": 0.3},
            },
        ],
    }
    data = {"short": _token_pairs(16), "long": _token_pairs(32)}
    curriculum = Curriculum(parse_config(config), datasets=data, progress=False)
    batch = curriculum.stages[1].batch(0)
    assert batch[0].shape == (8, 32) and (batch[1] == -100).any()  # short rows padded
    result = fit(curriculum.build_model(), curriculum, run_dir=tmp_path / "r", progress=False)
    assert result.completed


def test_sources_whose_items_cannot_share_a_batch_are_refused_by_plan() -> None:
    from stagetrain import make_plan

    config = {
        "stages": [{"name": "mix", "duration": "2ba", "data": {"sources": ["@pairs", "@dicts"]}}]
    }
    pairs = TensorPairDataset(torch.zeros(8, 4), torch.zeros(8).long())
    dicts = [{"x": torch.zeros(4), "labels": torch.tensor(0)}] * 8
    curriculum = Curriculum(parse_config(config), datasets={"pairs": pairs, "dicts": dicts})
    with pytest.raises(Exception, match=r"stages\[0\]\.data"):
        make_plan(curriculum)


# --- losses, metrics, optimizers -------------------------------------------------------------


def test_a_python_callable_is_a_loss_and_a_metric(tmp_path: Path) -> None:
    calls = {"loss": 0}

    def my_loss(output: torch.Tensor, target: torch.Tensor, *, scale: float) -> torch.Tensor:
        calls["loss"] += 1
        return scale * torch.nn.functional.cross_entropy(output, target)

    def margin(outputs: torch.Tensor, batch: Any) -> dict[str, float]:
        top2 = outputs.topk(2, dim=-1).values
        return {"margin": float((top2[:, 0] - top2[:, 1]).mean())}

    config = tiny_config_dict()
    config["stages"][0]["loss"] = [{"name": my_loss, "args": {"scale": 2.0}}]
    config["evals"][0]["metrics"] = [
        "accuracy",
        margin,
        {"name": "top_k_accuracy", "args": {"k": 1}},
    ]
    _, result = run(config, tmp_path / "r")
    assert calls["loss"] > 30  # stage 1 and, inherited, stage 2
    test = result.metrics["test"]
    assert test["margin"] > 0 and test["top1_accuracy"] == pytest.approx(test["accuracy"])
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["stages"][0]["loss"][0]["name"].endswith("my_loss")


def test_an_evaluation_loss_by_import_path(tmp_path: Path) -> None:
    config = tiny_config_dict()
    config["evals"][0]["loss"] = "torch.nn.functional:cross_entropy"
    _, result = run(config, tmp_path / "r")
    assert math.isfinite(result.metrics["test"]["loss"])


def test_torchmetrics_metric(tmp_path: Path) -> None:
    torchmetrics = pytest.importorskip("torchmetrics")
    metric = torchmetrics.classification.MulticlassAccuracy(num_classes=2, average="micro")
    config = tiny_config_dict()
    config["evals"][0]["metrics"] = ["accuracy", {"name": metric, "key": "tm_accuracy"}]
    _, result = run(config, tmp_path / "r")
    test = result.metrics["test"]
    assert test["tm_accuracy"] == pytest.approx(test["accuracy"], abs=1e-6)


def test_any_torch_optimizer_by_name_and_no_decay_groups() -> None:
    from stagetrain.config import OptimizerConfig
    from stagetrain.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    rms = build_optimizer(model.named_parameters(), OptimizerConfig(name="RMSprop", momentum=0.5))
    assert isinstance(rms, torch.optim.RMSprop) and rms.param_groups[0]["momentum"] == 0.5
    adamw = build_optimizer(model.named_parameters(), OptimizerConfig(weight_decay=0.1))
    decays = {g["decay"]: {p.dim() for p in g["params"]} for g in adamw.param_groups}
    assert decays == {True: {2}, False: {1}}  # biases and LayerNorm weights are not decayed
    assert {g["weight_decay"] for g in adamw.param_groups} == {0.1, 0.0}
    by_path = build_optimizer(
        model.named_parameters(),
        OptimizerConfig(name="torch.optim:Adagrad", kwargs={"lr_decay": 0.1}),
    )
    assert isinstance(by_path, torch.optim.Adagrad) and by_path.defaults["lr_decay"] == 0.1
    with pytest.raises(Exception, match="unknown optimizer 'adamq'"):
        OptimizerConfig(name="adamq")


# --- seeds reach factories ------------------------------------------------------------------


def test_factories_get_the_same_data_on_every_run() -> None:
    config = {
        "stages": [{"name": "s", "duration": "1ba", "data": "helpers_for_tests:random_features"}]
    }
    first = Curriculum(parse_config(config)).stages[0].data.datasets[0].inputs
    torch.manual_seed(123)  # whatever ran before
    np.random.seed(7)
    second = Curriculum(parse_config(config)).stages[0].data.datasets[0].inputs
    assert torch.equal(first, second)
    other = Curriculum(parse_config({**config, "seed": 1})).stages[0].data.datasets[0].inputs
    assert not torch.equal(first, other)  # the run's seed reaches the draw


# --- logs and callbacks ---------------------------------------------------------------------


def test_logged_loss_is_the_interval_mean(tmp_path: Path) -> None:
    run(tiny_config_dict(log_every=1), tmp_path / "a")
    run(tiny_config_dict(log_every=5), tmp_path / "b")
    ones = [r for r in read_records(tmp_path / "a" / "metrics.jsonl") if r["type"] == "train"]
    fives = [r for r in read_records(tmp_path / "b" / "metrics.jsonl") if r["type"] == "train"]
    by_step = {r["step"]: r["loss"] for r in ones}
    for record in fives[:6]:  # stage 1: steps 5..30
        window = [by_step[s] for s in range(record["step"] - 4, record["step"] + 1)]
        assert record["loss"] == pytest.approx(sum(window) / 5, rel=1e-5)
        assert {"grad_norm", "samples_per_s", "step_time", "lr"} <= record.keys()


def test_callbacks_see_loss_lr_grad_norm_and_resumes(tmp_path: Path) -> None:
    from helpers_for_tests import StopAt

    seen: list[tuple[str, Any]] = []

    class Probe:
        def on_log(self, run: Any, record: dict[str, Any]) -> None:
            seen.append(("log", (run.loss, run.lr, run.grad_norm)))

        def on_stage_start(self, run: Any) -> None:
            seen.append(("stage", (run.stage.name, run.resumed)))

    config = tiny_config_dict()
    run(config, tmp_path / "r", callbacks=[Probe(), StopAt(45)])
    assert ("stage", ("easy", False)) in seen and ("stage", ("target", False)) in seen
    logs = [v for k, v in seen if k == "log"]
    assert logs and all(loss is not None and lr > 0 and norm > 0 for loss, lr, norm in logs)
    seen.clear()
    run(config, tmp_path / "r", resume=True, callbacks=[Probe()])
    assert seen[0] == ("stage", ("target", True))


def test_plain_lines_off_a_terminal_and_evaluations_without_progress(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict()))
    cli = [sys.executable, "-m", "stagetrain.cli", "run", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*cli, "--run-dir", str(tmp_path / "a")], capture_output=True,
                         text=True, env=env, timeout=300, check=True)  # fmt: skip
    assert "\r" not in out.stdout + out.stderr
    assert "step 5 [easy] loss" in out.stdout and "test: loss" in out.stdout
    quiet = subprocess.run([*cli, "--run-dir", str(tmp_path / "b"), "--no-progress"],
                           capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    assert "step 5 [easy] loss" not in quiet.stdout
    assert "step 20 [easy] test: loss" in quiet.stdout and "stage 'easy' ended" in quiet.stdout


def test_unknown_loss_name_is_refused_with_the_field() -> None:
    config = tiny_config_dict()
    config["stages"][1]["loss"] = "crossentropy"
    with pytest.raises(ConfigError, match=r"stages\[1\]\.loss\[0\]\.name: .*unknown loss"):
        parse_config(config)


def test_dict_batches_move_to_the_device_whole() -> None:
    from stagetrain.batch import to_device

    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "meta": {"w": torch.ones(2)}}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["meta"]["w"].shape == (2,) and moved["input_ids"].dtype == torch.long


def test_the_cli_imports_the_users_module_from_the_working_directory(tmp_path: Path) -> None:
    """``factory: mymodels:build`` beside the config failed under the ``stagetrain`` console
    script (only ``python -m`` and ``torchrun -m`` put the working directory on the path)."""
    (tmp_path / "mymodels.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(8, 2))\n"
    )
    config = tiny_config_dict()
    config["model"] = {"factory": "mymodels:build"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    script = Path(sys.executable).with_name("stagetrain")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(script), "run", "c.yaml", "--run-dir", "r", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "mymodels" not in done.stderr


def test_the_cli_prints_stagetrains_warnings_as_one_line() -> None:
    """A resume warning printed the library's file, line number and source line."""
    import stagetrain
    from stagetrain.console import format_warning

    fit_file = str(Path(stagetrain.__file__).parent / "train" / "fit.py")
    ours = format_warning(UserWarning("re-seeded"), UserWarning, fit_file, 193)
    assert ours == "stagetrain: warning: re-seeded\n"
    theirs = format_warning(UserWarning("x"), UserWarning, torch.__file__, 7)
    assert torch.__file__ in theirs and ":7:" in theirs

"""The Keras 3 adapter on the torch backend: the same batches, LR, hand-offs, stage
timeline and logs as stagetrain's own loop, the loss mapping, the refusals, and exact
resume after an exception and after SIGKILL. The TensorFlow backend is compared in a
separate interpreter (``STAGETRAIN_TF_PYTHON``)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config_dict

try:
    import keras
except ImportError:
    # CI installs stagetrain[keras] (it is in the dev extra): a missing keras is an error
    # there, and only a developer machine without the extra skips.
    if os.environ.get("CI") or os.environ.get("STAGETRAIN_REQUIRE_KERAS"):
        raise
    pytest.skip("keras is not installed: pip install 'stagetrain[keras]'", allow_module_level=True)
if keras.backend.backend() != "torch":
    pytest.skip(
        f"these tests run on the torch backend (KERAS_BACKEND is {keras.backend.backend()!r})",
        allow_module_level=True,
    )

from keras_script import RecordLR, mlp

from stagetrain import (
    CheckpointError,
    ConfigError,
    Curriculum,
    DataError,
    StageTrainError,
    TrainingError,
    fit,
    parse_config,
)
from stagetrain.checkpoint import CheckpointStore, load_checkpoint
from stagetrain.data import TensorPairDataset
from stagetrain.integrations.keras import (
    KERAS_LOSSES,
    CurriculumLR,
    StageDataset,
    StageKerasLoss,
    apply_keras_freeze,
    batch_to_numpy,
    build_keras_optimizer,
    fit_keras,
    keras_stage_loss,
)
from stagetrain.logs import read_records
from stagetrain.losses import BUILTIN_LOSS_FNS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("keras_script.py")


def keras_config(**overrides: Any) -> dict[str, Any]:
    """The tiny two-stage parity curriculum without its (torch) model section."""
    config = tiny_config_dict(**overrides)
    config.pop("model")
    return config


def new_model(seed: int = 0, dropout: float = 0.0) -> Any:
    return mlp(8, [16], 2, dropout=dropout, seed=seed)


def run_keras(config: dict[str, Any], run_dir: Path, model: Any = None, **kwargs: Any):
    model = new_model() if model is None else model
    result = fit_keras(
        model, Curriculum(parse_config(config)), run_dir=run_dir, progress=False, **kwargs
    )
    return model, result


def weights_equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def timeline_of(run_dir: Path) -> list[tuple[str, int, str]]:
    return [
        (r["type"], r["step"], r["stage"])
        for r in read_records(run_dir / "metrics.jsonl")
        if r["type"] in ("stage_start", "stage_end")
    ]


def skeleton(run_dir: Path) -> list[tuple[Any, ...]]:
    """Every record's kind and position (and an eval's name): what must match across loops."""
    return [
        (r["type"], r["step"], r["stage"], r["stage_step"], r.get("name"), r.get("reason"))
        for r in read_records(run_dir / "metrics.jsonl")
    ]


# --- data --------------------------------------------------------------------------------


def test_stage_dataset_items_are_the_curriculum_batches() -> None:
    curriculum = Curriculum(parse_config(keras_config()))
    stage = curriculum.stages[1]
    data = StageDataset(stage, start=7)
    assert len(data) == stage.steps - 7
    for i in (0, 1, len(data) - 1):
        x, y = data[i]
        inputs, targets = stage.batch(7 + i)
        assert isinstance(x, np.ndarray) and np.array_equal(x, inputs.numpy())
        assert np.array_equal(y, targets.numpy())
    with pytest.raises(IndexError):
        data[len(data)]


class RecordInputs(keras.layers.Layer):
    """Passes its input through, keeping a copy of every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[np.ndarray] = []

    def call(self, x: Any, training: bool | None = None) -> Any:
        if training:
            self.seen.append(keras.ops.convert_to_numpy(x))
        return x


def test_batches_other_than_pairs_are_refused() -> None:
    parts = (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(
        DataError, match=r"the Keras adapter trains on \(inputs, targets\) pairs, got a tuple of 3"
    ):
        batch_to_numpy(parts)
    with pytest.raises(DataError, match="got dict"):
        batch_to_numpy({"input_ids": parts[0], "labels": parts[2]})


def test_fit_trains_on_exactly_the_curriculum_batches_in_order(tmp_path: Path) -> None:
    config = keras_config()
    config["stages"][1]["data"]["replay"] = 0.25  # a mixture with the first stage's data
    recorder = RecordInputs()
    model = keras.Sequential([keras.Input((8,)), recorder, keras.layers.Dense(2)])
    run_keras(config, tmp_path / "r", model=model)
    expected = [s.batch()[0].numpy() for s in Curriculum(parse_config(config)).steps()]
    assert len(recorder.seen) == len(expected) == 70
    assert all(
        np.array_equal(a, b) for a, b in zip(recorder.seen, expected, strict=True)
    )  # never shuffled


# --- the same training as a hand-written Keras loop --------------------------------------


def reference_run(config: dict[str, Any], model: Any) -> list[np.ndarray]:
    """The curriculum trained step by step with ``train_on_batch``, written out by hand."""
    curriculum = Curriculum(parse_config(config))
    trainable = list(model.trainable_weights)
    optimizer = None
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)
    for info in curriculum.steps():
        cfg = info.stage.config
        if info.stage_step == 0:
            opt = cfg.optimizer
            assert opt is not None and opt.name == "adamw"
            if optimizer is None or cfg.handoff == "reset":
                optimizer = keras.optimizers.AdamW(
                    learning_rate=opt.lr, weight_decay=opt.weight_decay, beta_1=opt.betas[0],
                    beta_2=opt.betas[1], epsilon=opt.eps, global_clipnorm=opt.grad_clip,
                )  # fmt: skip
                if opt.weight_decay > 0:  # stagetrain's default no_decay: fewer than 2 dims
                    optimizer.exclude_from_weight_decay(
                        var_list=[v for v in trainable if len(v.shape) < 2]
                    )
                optimizer.build(trainable)
            else:  # carry / rewarm: the kept optimizer takes the stage's hyperparameters
                optimizer.beta_1, optimizer.beta_2 = opt.betas
                optimizer.epsilon, optimizer.weight_decay = opt.eps, opt.weight_decay
                optimizer.global_clipnorm = opt.grad_clip
            for variable in trainable:
                variable.trainable = not any(
                    fnmatch.fnmatchcase(variable.path, p) for p in cfg.freeze
                )
            model.compile(optimizer=optimizer, loss=loss)
        optimizer.learning_rate = info.lr
        x, y = info.batch()
        model.train_on_batch(x.numpy(), y.numpy())
    return model.get_weights()


def handoff_config(kind: str) -> dict[str, Any]:
    config = keras_config(eval_every="15ba")
    config["stages"][0]["optimizer"] = {
        "name": "adamw", "lr": 0.02, "warmup": "5ba", "weight_decay": 0.01,
        "schedule": {"kind": "cosine", "end": 0.1},
    }  # fmt: skip
    target = config["stages"][1]
    target["handoff"] = kind
    target["optimizer"] = {
        "name": "adamw",
        "lr": 0.01,
        "warmup": "8ba",
        "betas": [0.8, 0.99],
        "grad_clip": 0.5,
    }
    if kind == "rewarm":
        config["stages"][0]["freeze"] = ["*head*"]  # trains only the hidden layer first
    return config


@pytest.mark.parametrize("kind", ["carry", "rewarm", "reset"])
def test_fit_keras_equals_a_hand_written_keras_loop(tmp_path: Path, kind: str) -> None:
    config = handoff_config(kind)
    model, _ = run_keras(config, tmp_path / "r")
    expected = reference_run(config, new_model())
    assert weights_equal(model.get_weights(), expected)


class Iterations(keras.callbacks.Callback):
    """The optimizer's step count before every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.seen.append(int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))


def test_reset_starts_a_fresh_optimizer_and_carry_keeps_its_state(tmp_path: Path) -> None:
    steps = {}
    for kind in ("carry", "reset"):
        iterations = Iterations()
        run_keras(handoff_config(kind), tmp_path / kind, callbacks=[iterations])
        steps[kind] = iterations.seen[30]  # the optimizer's step count at stage 2's first step
    assert steps == {"carry": 30, "reset": 0}


# --- the same run as stagetrain's own loop -----------------------------------------------


def test_logs_match_stagetrain_fit_record_for_record(tmp_path: Path) -> None:
    """Same records at the same steps (train, eval, stage boundaries) and the same LR."""
    config = handoff_config("rewarm")
    config["stages"][0]["freeze"] = []
    config["log_every"] = 1
    torch_config = tiny_config_dict(**{k: v for k, v in config.items() if k != "model"})
    curriculum = Curriculum(parse_config(torch_config))
    fit(
        curriculum.build_model(),
        curriculum,
        run_dir=tmp_path / "torch",
        progress=False,
        tensorboard=False,
    )
    recorder = RecordLR()
    run_keras(config, tmp_path / "keras", callbacks=[recorder])
    assert skeleton(tmp_path / "keras") == skeleton(tmp_path / "torch")
    train = [r for r in read_records(tmp_path / "keras" / "metrics.jsonl") if r["type"] == "train"]
    theirs = [r for r in read_records(tmp_path / "torch" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["lr"] for r in train] == [r["lr"] for r in theirs]  # the same Python floats
    # ...and the optimizer really used them (its LR variable is float32).
    assert np.array_equal(np.float32(recorder.lrs), np.float32([r["lr"] for r in train]))
    assert all(np.isfinite(r["loss"]) for r in train)
    # Same fields in every train record, but the gradient norm (Keras' fit does not show it).
    assert set(train[0]) == set(theirs[0]) - {"grad_norm"}


def test_curriculum_lr_callback_sets_every_step(tmp_path: Path) -> None:
    config = handoff_config("rewarm")
    stage = Curriculum(parse_config(config)).stages[1]
    model = new_model()
    model.compile(
        optimizer=build_keras_optimizer(stage.config.optimizer), loss=keras_stage_loss(stage)
    )
    recorder = RecordLR()
    model.fit(StageDataset(stage, start=3), epochs=1, shuffle=False, verbose=0,
              callbacks=[CurriculumLR(stage, start=3), recorder])  # fmt: skip
    assert np.array_equal(
        np.float32(recorder.lrs), np.float32([stage.lr(s) for s in range(3, stage.steps)])
    )


# --- advance rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        # Reached at the first evaluation once min_duration has passed, whatever the model.
        {"metric": "test.loss", "threshold": 1.0e9, "min_duration": "12ba"},
        # Never improves by 10: ends after 2 evaluations without improvement.
        {"metric": "test.accuracy", "patience": 2, "delta": 10.0},
    ],
    ids=["threshold", "plateau"],
)
def test_advance_rules_end_the_stage_where_stagetrain_fit_does(
    tmp_path: Path, rule: dict[str, Any]
) -> None:
    config = keras_config(eval_every="5ba")
    config["stages"][0]["advance"] = rule
    run_keras(config, tmp_path / "keras")
    torch_config = tiny_config_dict(eval_every="5ba")
    torch_config["stages"][0]["advance"] = rule
    curriculum = Curriculum(parse_config(torch_config))
    fit(
        curriculum.build_model(),
        curriculum,
        run_dir=tmp_path / "torch",
        progress=False,
        tensorboard=False,
    )
    ends = [
        r for r in read_records(tmp_path / "keras" / "metrics.jsonl") if r["type"] == "stage_end"
    ]
    assert ends[0]["reason"] == ("threshold" if "threshold" in rule else "plateau")
    assert ends[0]["step"] == 15  # evals at 5, 10, 15: the third decides either way
    assert skeleton(tmp_path / "keras") == skeleton(tmp_path / "torch")


# --- freeze, grad_clip ---------------------------------------------------------------------


def test_freeze_keeps_matched_variables_fixed_for_the_stage(tmp_path: Path) -> None:
    config = keras_config(checkpoint={"every": "10ba", "keep": 10})
    config["stages"][0]["freeze"] = ["mlp/hidden0/*"]
    config["stages"][1]["freeze"] = ["*.head.bias"]  # the dotted form matches too
    model = new_model()
    start = model.get_weights()
    run_keras(config, tmp_path / "r", model=model)
    boundary = load_checkpoint(tmp_path / "r" / "checkpoints" / "ckpt-00000030.pt")["keras"][
        "model"
    ]
    at_30 = [np.frombuffer(d.numpy().tobytes(), dtype=np.float32).reshape(s)
             for d, s in zip(boundary["data"], boundary["shapes"], strict=True)]  # fmt: skip
    end = model.get_weights()
    # order: hidden0 kernel, hidden0 bias, head kernel, head bias
    assert np.array_equal(at_30[0], start[0]) and np.array_equal(at_30[1], start[1])
    assert not np.array_equal(at_30[2], start[2])
    assert not np.array_equal(end[0], at_30[0]) and np.array_equal(end[3], at_30[3])
    assert all(v.trainable for v in model.weights)  # fit_keras undoes its freezes


def test_freeze_pattern_matching_nothing_is_an_error(tmp_path: Path) -> None:
    config = keras_config()
    config["stages"][1]["freeze"] = ["encoder.*"]
    with pytest.raises(
        ConfigError,
        match=r"stages\[1\]\.freeze\[0\]: pattern 'encoder\.\*' matches no trainable Keras variable; paths look like \['mlp/hidden0/kernel'",
    ):
        run_keras(config, tmp_path / "r")
    with pytest.raises(ConfigError, match=r"freeze\[0\]"):
        apply_keras_freeze(new_model().trainable_weights, ["nothing"])


def test_grad_clip_bounds_the_global_gradient_norm(tmp_path: Path) -> None:
    config = keras_config(log_every=1)
    config["stages"][0]["optimizer"] = {"name": "sgd", "lr": 1.0, "grad_clip": 1.0e-3}
    config["stages"][0]["duration"] = "1ba"
    model = new_model()
    start = model.get_weights()
    after_first = WeightsAfterFirstBatch()
    run_keras(config, tmp_path / "r", model=model, callbacks=[after_first])
    delta = np.sqrt(
        sum(float(np.sum((a - b) ** 2)) for a, b in zip(after_first.weights, start, strict=True))
    )
    assert delta == pytest.approx(1.0e-3, rel=1e-4)  # lr 1 * the clipped norm
    assert build_keras_optimizer(parse_config(config).stages[0].optimizer).global_clipnorm == 1.0e-3


class WeightsAfterFirstBatch(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.weights: list[np.ndarray] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if not self.weights:
            self.weights = self.model.get_weights()


class StopAfterFirstBatch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.model.stop_training = True


def test_a_user_callback_stopping_training_leaves_a_resumable_run(tmp_path: Path) -> None:
    config = keras_config()
    _, stopped = run_keras(config, tmp_path / "r", callbacks=[StopAfterFirstBatch()])
    assert stopped.status == "stopped" and stopped.state.step == 1
    model, resumed = run_keras(config, tmp_path / "r", resume=True)
    full, _ = run_keras(config, tmp_path / "full")
    assert resumed.status == "completed" and resumed.state.step == 70
    assert weights_equal(model.get_weights(), full.get_weights())


# --- losses ----------------------------------------------------------------------------------


def _classes(
    g: torch.Generator, shape: tuple[int, ...], classes: int, ignored: float = 0.0
) -> torch.Tensor:
    labels = torch.randint(0, classes, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < ignored, -100, labels)


# name -> (output shape, target maker, args)
LOSS_CASES: dict[str, tuple[tuple[int, ...], Any, dict[str, Any]]] = {
    "cross_entropy": ((6, 5), lambda g: _classes(g, (6,), 5), {}),
    "cross_entropy/sequence+ignored": ((3, 4, 7), lambda g: _classes(g, (3, 4), 7, 0.3), {}),
    "cross_entropy/label_smoothing": (
        (3, 4, 7),
        lambda g: _classes(g, (3, 4), 7, 0.3),
        {"label_smoothing": 0.1},
    ),
    "cross_entropy/ignore_index": (
        (6, 5),
        lambda g: torch.tensor([0, 1, 2, 3, 4, 0]),
        {"ignore_index": 0},
    ),
    "nll/ignored": ((3, 4, 7), lambda g: _classes(g, (3, 4), 7, 0.3), {}),
    "bce_with_logits/one logit": ((6, 1), lambda g: torch.randint(0, 2, (6,), generator=g), {}),
    "bce_with_logits/labels+ignored": ((6, 3), lambda g: _classes(g, (6, 3), 2, 0.3), {}),
    "hinge/binary 0-1": ((6, 1), lambda g: torch.randint(0, 2, (6,), generator=g), {}),
    "hinge/binary signs+ignored": (
        (8,),
        lambda g: torch.tensor([1, -1, -1, 1, -100, 1, -1, 1]),
        {"margin": 0.5},
    ),
    "hinge/multi-class": ((3, 4, 5), lambda g: _classes(g, (3, 4), 5, 0.3), {"margin": 2.0}),
    "mse": ((6, 1), lambda g: torch.randn(6, generator=g), {}),  # target reshaped to the output
    "l1": ((6, 2), lambda g: torch.randn(6, 2, generator=g), {}),
    "smooth_l1": ((6, 2), lambda g: 2 * torch.randn(6, 2, generator=g), {"beta": 0.5}),
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_keras_losses_equal_stagetrain_losses(case: str) -> None:
    """The Keras version of each built-in against stagetrain's torch function."""
    name = case.split("/")[0]
    shape, make_target, args = LOSS_CASES[case]
    g = torch.Generator().manual_seed(0)
    output = torch.randn(*shape, generator=g)
    if name == "nll":
        output = torch.log_softmax(output, dim=-1)
    target = make_target(g)
    loss = StageKerasLoss([(name, 1.0, args)])
    value = float(keras.ops.convert_to_numpy(loss(target.numpy(), output.numpy())))
    expected = float(BUILTIN_LOSS_FNS[name](output, target, **args))
    assert value == pytest.approx(expected, rel=1e-5)


def test_every_keras_loss_is_a_stagetrain_builtin() -> None:
    assert set(KERAS_LOSSES) == set(BUILTIN_LOSS_FNS) - {"kl_distill", "model"}
    assert {c.split("/")[0] for c in LOSS_CASES} == set(KERAS_LOSSES)  # each one checked


def test_cross_entropy_refuses_one_logit() -> None:
    loss = StageKerasLoss([("cross_entropy", 1.0, {})])
    with pytest.raises(ConfigError, match="one logit per sample"):
        loss(np.array([0, 1]), np.zeros((2, 1), dtype="float32"))


def test_weighted_terms_are_summed() -> None:
    config = keras_config()
    config["stages"][0]["loss"] = [
        {"name": "cross_entropy", "weight": 0.25},
        {"name": "cross_entropy", "weight": 2.0},
    ]
    stage = Curriculum(parse_config(config)).stages[0]
    output, target = (
        np.random.default_rng(0).standard_normal((4, 2)).astype("float32"),
        np.array([0, 1, 1, 0]),
    )
    value = float(keras.ops.convert_to_numpy(keras_stage_loss(stage)(target, output)))
    single = float(
        BUILTIN_LOSS_FNS["cross_entropy"](torch.from_numpy(output), torch.from_numpy(target))
    )
    assert value == pytest.approx(2.25 * single, rel=1e-5)


def test_losses_without_a_keras_counterpart_are_refused_or_overridden(tmp_path: Path) -> None:
    config = keras_config()
    config["stages"][1]["loss"] = "helpers_for_tests:by_first_feature"
    with pytest.raises(
        ConfigError,
        match=r"stages\[1\]\.loss\[0\]\.name: 'helpers_for_tests:by_first_feature' has no Keras version in the Keras adapter .*fit_keras\(losses=\{'target': <a keras.losses.Loss>\}\)",
    ):
        run_keras(config, tmp_path / "a")
    config["stages"][1]["loss"] = {"name": "cross_entropy", "args": {"reduction": "sum"}}
    with pytest.raises(
        ConfigError,
        match=r"stages\[1\]\.loss\[0\]\.args: \['reduction'\] not supported by the Keras version of cross_entropy \(it takes \['ignore_index', 'label_smoothing'\]\)",
    ):
        run_keras(config, tmp_path / "b")
    smoothed = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"no stage named \['nope'\]"):
        run_keras(config, tmp_path / "c", losses={"nope": smoothed})
    with pytest.raises(ConfigError, match=r"expected a keras.losses.Loss instance, got function"):
        run_keras(config, tmp_path / "d", losses={"target": keras.losses.mean_squared_error})
    # A Keras loss of the user's own replaces the stage's: here it sees one-hot targets.
    config["stages"][1]["data"] = "@onehot"
    x = torch.from_numpy(np.random.default_rng(0).choice([-1.0, 1.0], (64, 8)).astype("float32"))
    onehot = F.one_hot((x[:, 0] * x[:, 1] > 0).long(), 2).float()
    curriculum = Curriculum(parse_config(config), datasets={"onehot": TensorPairDataset(x, onehot)})
    result = fit_keras(
        new_model(), curriculum, run_dir=tmp_path / "e", progress=False, losses={"target": smoothed}
    )
    assert result.state.step == 70


# --- refusals --------------------------------------------------------------------------------


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = config
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("precision", "bf16", r"precision: 'bf16' is not supported by fit_keras"),
        (
            "compile",
            True,
            r"compile: torch.compile does not apply; use fit_keras\(jit_compile=...\)",
        ),
        ("nonfinite", {"policy": "skip"}, r"nonfinite.policy: 'skip' needs stagetrain.fit"),
        (
            "stages.1.grad_accum",
            2,
            r"stages\[1\]\.grad_accum: gradient accumulation is not supported",
        ),
        (
            "stages.0.optimizer.lr_multipliers",
            {"*head*": 0.1},
            r"stages\[0\]\.optimizer\.lr_multipliers: per-parameter LR",
        ),
        (
            "data_workers",
            2,
            r"data_workers: 2 worker threads would reorder the batches in Keras' PyDataset enqueuer",
        ),
        ("stages.0.optimizer.name", "adam", None),  # allowed: no weight decay
        ("stages.0.optimizer.weight_decay", 0.1, None),  # allowed: adamw
        (
            "evals.0.loss",
            "model",
            r"evals\[0\]\.loss: 'model' \(the model's own loss\) is not available from a Keras model",
        ),
        ("evals.0.loss", "hinge", None),  # computed by stagetrain's own evaluation code
        (
            "stages.0.optimizer.name",
            "rmsprop",
            r"stages\[0\]\.optimizer\.name: 'rmsprop' is not supported by the Keras adapter \(one of \['adam', 'adamw', 'sgd'\]\)",
        ),
        (
            "stages.0.optimizer.kwargs",
            {"amsgrad": True},
            r"stages\[0\]\.optimizer\.kwargs: \['amsgrad'\] not supported for Keras adamw",
        ),
        (
            "batch",
            {"forward": "helpers_for_tests:by_first_feature"},
            r"batch\.forward: a torch forward function cannot call a Keras model",
        ),
    ],
)
def test_unsupported_settings_are_refused_by_name(
    tmp_path: Path, path: str, value: Any, message: str | None
) -> None:
    config = keras_config()
    set_path(config, path, value)
    if message is None:
        run_keras(config, tmp_path / "r")
        return
    with pytest.raises(ConfigError, match=message):
        run_keras(config, tmp_path / "r")


def test_coupled_weight_decay_is_refused(tmp_path: Path) -> None:
    config = keras_config()
    config["stages"][0]["optimizer"] = {"name": "adam", "lr": 0.01, "weight_decay": 0.1}
    with pytest.raises(
        ConfigError,
        match=r"stages\[0\]\.optimizer\.weight_decay: adam adds weight decay to the gradient \(L2\) in stagetrain, Keras decays decoupled; use name: adamw",
    ):
        run_keras(config, tmp_path / "r")


@pytest.mark.parametrize(
    ("no_decay", "decayed"),
    [
        (None, ["mlp/hidden0/kernel", "mlp/head/kernel"]),
        ([], "all"),
        (["*head*"], ["mlp/hidden0/kernel", "mlp/hidden0/bias"]),
    ],
)
def test_no_decay_picks_the_variables_weight_decay_skips(
    no_decay: list[str] | None, decayed: Any
) -> None:
    config = keras_config()
    config["stages"][0]["optimizer"] = {"name": "adamw", "weight_decay": 0.1, "no_decay": no_decay}
    cfg = parse_config(config).stages[0].optimizer
    model = new_model()
    optimizer = build_keras_optimizer(cfg, model.trainable_weights)
    paths = [v.path for v in model.trainable_weights]
    # Keras' own test of whether a variable decays, the one its update step uses.
    assert [v.path for v in model.trainable_weights if optimizer._use_weight_decay(v)] == (
        paths if decayed == "all" else decayed
    )


def test_a_kept_sgd_cannot_gain_momentum(tmp_path: Path) -> None:
    config = keras_config()
    config["stages"][0]["optimizer"] = {"name": "sgd", "lr": 0.1}
    config["stages"][1]["optimizer"] = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    with pytest.raises(
        ConfigError,
        match=r"stages\[1\]\.optimizer\.momentum: the kept Keras SGD was built without momentum .*use handoff: reset",
    ):
        run_keras(config, tmp_path / "carry")
    config["stages"][1]["handoff"] = "reset"
    _, result = run_keras(config, tmp_path / "reset")
    assert result.state.step == 70


def test_a_config_model_section_is_ignored_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(
        UserWarning, match="model: the config's model section is ignored by fit_keras"
    ):
        run_keras(tiny_config_dict(), tmp_path / "r")


def test_a_non_finite_loss_stops_the_run(tmp_path: Path) -> None:
    config = keras_config()
    config["stages"][1]["data"] = "@nan"
    x = torch.full((32, 8), float("nan"))
    curriculum = Curriculum(
        parse_config(config),
        datasets={"nan": TensorPairDataset(x, torch.zeros(32, dtype=torch.long))},
    )
    with pytest.raises(
        TrainingError, match=r"non-finite loss at step 30 in stage 'target' \(stage step 0\)"
    ):
        fit_keras(new_model(), curriculum, run_dir=tmp_path / "r", progress=False)


# --- resume ------------------------------------------------------------------------------------


class Crash(keras.callbacks.Callback):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.done = at, 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.done += 1
        if self.done == self.at:
            raise RuntimeError("crash")


@pytest.mark.parametrize("handoff", ["carry", "reset"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path, handoff: str) -> None:
    config = keras_config()
    config["stages"][1]["handoff"] = handoff
    full, _ = run_keras(config, tmp_path / "full", model=new_model(dropout=0.25))
    with pytest.raises(RuntimeError, match="crash"):
        run_keras(config, tmp_path / "cut", model=new_model(dropout=0.25), callbacks=[Crash(55)])
    resumed, result = run_keras(
        config, tmp_path / "cut", model=new_model(seed=9, dropout=0.25), resume=True
    )
    assert result.state.step == 70
    assert weights_equal(resumed.get_weights(), full.get_weights())  # bitwise, dropout included
    assert skeleton(tmp_path / "cut") == skeleton(tmp_path / "full")  # the log continues exactly
    assert [(s.stage, s.start, s.end) for s in result.timeline] == [
        ("easy", 0, 30),
        ("target", 30, 70),
    ]


def test_resume_refusals(tmp_path: Path) -> None:
    config = keras_config()
    run_keras(config, tmp_path / "r")
    with pytest.raises(StageTrainError, match=r"not empty \(holds .*pass --resume"):
        run_keras(config, tmp_path / "r")
    _, again = run_keras(config, tmp_path / "r", overwrite=True)  # the old files moved aside
    assert again.state.step == 70 and list((tmp_path / "r").glob(".replaced-*/checkpoints"))
    changed = keras_config()
    changed["stages"][1]["duration"] = "50ba"
    with pytest.raises(
        CheckpointError,
        match=r"the curriculum changed since the checkpoint: stages\[1\]\.duration: '40ba' -> '50ba'",
    ):
        run_keras(changed, tmp_path / "r", resume=True)
    with pytest.raises(RuntimeError, match="crash"):
        run_keras(config, tmp_path / "cut", callbacks=[Crash(55)])
    _, longer = run_keras(changed, tmp_path / "cut", resume=True, on_change="keep-position")
    assert [(s.stage, s.start, s.end) for s in longer.timeline] == [
        ("easy", 0, 30),
        ("target", 30, 80),
    ]
    with pytest.raises(CheckpointError, match="no such run directory to resume"):
        run_keras(config, tmp_path / "absent", resume=True)
    curriculum = Curriculum(parse_config(tiny_config_dict()))
    fit(
        curriculum.build_model(),
        curriculum,
        run_dir=tmp_path / "torch",
        progress=False,
        tensorboard=False,
    )
    with pytest.raises(CheckpointError, match=r"written by stagetrain\.fit, not fit_keras"):
        run_keras(config, tmp_path / "torch", resume=True)
    store = CheckpointStore(tmp_path / "r" / "checkpoints")
    payload, entry = store.load_latest()
    store.save({**payload, "backend": "tensorflow"}, step=entry.step + 1, stage=entry.stage)
    with pytest.raises(
        CheckpointError, match=r"written on the Keras tensorflow backend; this process runs torch"
    ):
        run_keras(config, tmp_path / "r", resume=True)
    store.save(payload, step=entry.step + 2, stage=entry.stage)
    with pytest.raises(
        CheckpointError, match=r"checkpoint model: 4 variables saved, this model has 6"
    ):
        run_keras(config, tmp_path / "r", model=mlp(8, [16, 16], 2), resume=True)


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def backend_python(backend: str) -> str:
    """The interpreter that runs ``backend``: this one for torch, else a separate venv's.

    ``STAGETRAIN_TF_PYTHON`` names a Python with tensorflow-cpu and keras (default
    ``.venv-tf/bin/python``); ``STAGETRAIN_JAX_PYTHON`` one with jax and keras (default:
    the TensorFlow one). TensorFlow never goes into the main venv.
    """
    if backend == "torch":
        return sys.executable
    default = os.environ.get("STAGETRAIN_TF_PYTHON") or str(ROOT / ".venv-tf" / "bin" / "python")
    python = os.environ.get("STAGETRAIN_JAX_PYTHON", default) if backend == "jax" else default
    if not Path(python).exists():
        variable = "STAGETRAIN_JAX_PYTHON" if backend == "jax" else "STAGETRAIN_TF_PYTHON"
        pytest.skip(
            f"no {backend} interpreter at {python}: set {variable} to a Python with {backend}, "
            "keras and stagetrain's dependencies"
        )
    return python


def script(
    *args: str, backend: str = "torch", timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """``tests/keras_script.py ARGS`` on ``backend``; skips when its interpreter lacks it."""
    python = backend_python(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run(
        [python, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    missing = re.search(r"No module named '(tensorflow|jax|keras)'", proc.stderr)
    if proc.returncode == 1 and missing:
        pytest.skip(f"{python} cannot import {missing.group(1)}")
    if "--kill-at" not in args:  # a killed run is checked by its caller
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"backend {backend}" in proc.stdout
    return proc


def kill_config() -> dict[str, Any]:
    config = tiny_config_dict(checkpoint={"every": "10ba", "keep": 2})
    config["model"]["args"]["dropout"] = 0.25  # keras_script's model: the seed state resumes too
    config["stages"][1]["handoff"] = "rewarm"
    config["stages"][1]["optimizer"] = {
        "name": "adamw",
        "lr": 0.005,
        "warmup": "10ba",
        "schedule": {"kind": "cosine"},
    }
    return config


BACKENDS = ["torch", "tensorflow", "jax"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_mid_stage_two_then_resume_gives_the_same_weights(
    tmp_path: Path, backend: str
) -> None:
    path = write_config(tmp_path, kill_config())
    killed = script(str(path), str(tmp_path / "cut"), "--kill-at", "55", backend=backend)
    assert killed.returncode == -9, killed.stderr[-2000:]
    records = read_records(tmp_path / "cut" / "metrics.jsonl")
    assert records[-1]["step"] == 55 and records[-1]["stage"] == "target"  # died mid stage 2
    script(
        str(path),
        str(tmp_path / "cut"),
        "--resume",
        "--out",
        str(tmp_path / "resumed.npz"),
        backend=backend,
    )
    script(str(path), str(tmp_path / "full"), "--out", str(tmp_path / "full.npz"), backend=backend)
    a, b = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "full.npz")
    names = [n for n in b.files if n.startswith("w")]
    assert all(np.array_equal(a[n], b[n]) for n in names)  # bitwise, dropout included
    assert skeleton(tmp_path / "cut") == skeleton(tmp_path / "full")
    # The resumed process set the curriculum's LR from the checkpoint's step (50) on.
    assert np.array_equal(a["lrs"], b["lrs"][50:])


# --- TensorFlow and JAX against torch ----------------------------------------------------------


def backend_config() -> dict[str, Any]:
    config = kill_config()
    config["log_every"] = 1
    config["eval_every"] = "5ba"
    config["model"]["args"]["dropout"] = 0.0  # the backends draw different dropout masks
    config["stages"][0]["advance"] = {
        "metric": "test.loss",
        "threshold": 1.0e9,
        "min_duration": "12ba",
    }
    return config


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_other_backends_give_the_same_timeline_and_lr(tmp_path: Path, backend: str) -> None:
    path = write_config(tmp_path, backend_config())
    started = time.perf_counter()
    script(
        str(path),
        str(tmp_path / backend),
        "--out",
        str(tmp_path / f"{backend}.npz"),
        backend=backend,
    )
    seconds = time.perf_counter() - started
    script(str(path), str(tmp_path / "torch"), "--out", str(tmp_path / "torch.npz"))
    assert timeline_of(tmp_path / backend) == timeline_of(tmp_path / "torch") == [
        ("stage_start", 0, "easy"), ("stage_end", 15, "easy"), ("stage_start", 15, "target"), ("stage_end", 55, "target"),
    ]  # fmt: skip
    assert skeleton(tmp_path / backend) == skeleton(tmp_path / "torch")
    theirs, ours = (
        [r for r in read_records(tmp_path / name / "metrics.jsonl") if r["type"] == "train"]
        for name in (backend, "torch")
    )
    assert [r["lr"] for r in theirs] == [r["lr"] for r in ours]
    assert np.array_equal(
        np.load(tmp_path / f"{backend}.npz")["lrs"], np.load(tmp_path / "torch.npz")["lrs"]
    )
    # Same start, same batches: the losses agree up to float32 kernel differences.
    their_loss, our_loss = [r["loss"] for r in theirs], [r["loss"] for r in ours]
    assert their_loss[0] == pytest.approx(our_loss[0], rel=1e-5)
    assert np.allclose(their_loss, our_loss, rtol=1e-3, atol=1e-4)
    print(f"{backend} run: {seconds:.1f} s")


# --- the example -------------------------------------------------------------------------------


@pytest.mark.slow
def test_keras_example_runs_on_the_torch_backend(tmp_path: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "keras_two_stage.py"), "--run-dir", str(tmp_path / "r"), "--quick"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "stage 'easy': steps 0-300 (duration)\nstage 'target': steps 300-600 (duration)"
        in proc.stdout
    )
    accuracy = float(proc.stdout.split("test accuracy")[1])
    assert accuracy >= 0.9  # 600 steps are enough to learn the 5 relevant bits (0.956 here)

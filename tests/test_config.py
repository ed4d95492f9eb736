"""Config loading and validation: YAML, TOML and Python agree; bad input gets one clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from stagetrain import (
    CheckpointError,
    ConfigError,
    Curriculum,
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    SourceConfig,
    StageConfig,
    load_checkpoint,
    load_config,
    parse_config,
)
from stagetrain.errors import DataError

TOML = """
name = "tiny"
seed = 3
batch_size = 16
log_every = 5
eval_every = "20ba"

[checkpoint]
every = "10ba"
keep = 3

[model]
builtin = "mlp"
args = { in_features = 8, hidden = [16], out_features = 2 }

[[evals]]
name = "test"
data = { builtin = "parity", args = { n_bits = 8, k = 2, size = 256, split = "test" } }

[[stages]]
name = "easy"
duration = "30ba"
data = { builtin = "parity", name = "biased", args = { n_bits = 8, k = 2, bias = 0.8, size = 400 } }
optimizer = { name = "adamw", lr = 0.01, warmup = "5ba" }

[[stages]]
name = "target"
duration = "40ba"
handoff = "carry"
data = { builtin = "parity", name = "uniform", args = { n_bits = 8, k = 2, size = 400 } }
"""


def python_config() -> CurriculumConfig:
    def parity(**args: Any) -> dict[str, Any]:
        return {"n_bits": 8, "k": 2, **args}

    return CurriculumConfig(
        name="tiny",
        seed=3,
        batch_size=16,
        log_every=5,
        eval_every="20ba",
        checkpoint={"every": "10ba", "keep": 3},  # type: ignore[arg-type]
        model=ModelConfig(
            builtin="mlp", args={"in_features": 8, "hidden": [16], "out_features": 2}
        ),
        evals=[
            EvalConfig(
                name="test",
                data=SourceConfig(builtin="parity", args=parity(size=256, split="test")),
            )
        ],
        stages=[
            StageConfig(
                name="easy",
                duration="30ba",
                data=DataConfig(
                    sources=[
                        SourceConfig(
                            builtin="parity", name="biased", args=parity(bias=0.8, size=400)
                        )
                    ]
                ),
                optimizer=OptimizerConfig(name="adamw", lr=0.01, warmup="5ba"),
            ),
            StageConfig(
                name="target",
                duration="40ba",
                handoff="carry",
                data=DataConfig(
                    sources=[SourceConfig(builtin="parity", name="uniform", args=parity(size=400))]
                ),
            ),
        ],
    )


def test_yaml_toml_python_give_equal_curricula(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config))
    (tmp_path / "c.toml").write_text(TOML)
    from_yaml = load_config(tmp_path / "c.yaml")
    from_toml = load_config(tmp_path / "c.toml")
    from_python = python_config()
    assert from_yaml == from_toml == from_python
    assert from_yaml.fingerprint() == from_toml.fingerprint() == from_python.fingerprint()


def test_stage_inherits_optimizer_and_batch_size(tiny_config: dict[str, Any]) -> None:
    resolved = parse_config(tiny_config).resolved_stages()
    assert resolved[1].optimizer == resolved[0].optimizer
    assert resolved[1].batch_size == 16


def test_a_partial_optimizer_block_inherits_the_fields_it_does_not_name(
    tiny_config: dict[str, Any],
) -> None:
    """A later stage that names only its LR and schedule keeps the earlier stage's weight
    decay, betas and clipping (they were silently reset to the defaults)."""
    tiny_config["stages"][0]["optimizer"] = {
        "name": "adamw", "lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
    }  # fmt: skip
    tiny_config["stages"][1]["optimizer"] = {"lr": 1e-4, "schedule": {"kind": "linear"}}
    first, second = parse_config(tiny_config).resolved_stages()
    assert second.optimizer is not None and first.optimizer is not None
    assert second.optimizer.lr == 1e-4 and second.optimizer.schedule.kind == "linear"
    assert second.optimizer.weight_decay == 0.1 and second.optimizer.grad_clip == 1.0
    assert second.optimizer.betas == (0.9, 0.95) and second.optimizer.name == "adamw"
    # Naming the same class in another spelling still inherits; another class starts afresh.
    tiny_config["stages"][1]["optimizer"] = {"name": "AdamW", "lr": 1e-4}
    assert parse_config(tiny_config).resolved_stages()[1].optimizer.grad_clip == 1.0  # type: ignore[union-attr]
    tiny_config["stages"][1]["optimizer"] = {"name": "sgd", "lr": 1e-2}
    tiny_config["stages"][1]["handoff"] = "reset"
    other = parse_config(tiny_config).resolved_stages()[1].optimizer
    assert other is not None and other.weight_decay == 0.0 and other.grad_clip is None


@pytest.mark.parametrize("handoff", ["carry", "rewarm"])
def test_lr_multipliers_changed_where_the_optimizer_is_kept_are_refused(
    tiny_config: dict[str, Any], handoff: str
) -> None:
    """A carry/rewarm stage keeps the earlier optimizer and its parameter groups, so new
    lr_multipliers there were silently ignored (found by a user); now refused, while the
    same multipliers, inherited or repeated, and a reset stage's own are fine."""
    tiny_config["stages"][0]["optimizer"] = {"name": "adam", "lr": 1e-2, "lr_multipliers": {"1.*": 0.1}}  # fmt: skip
    tiny_config["stages"][1]["handoff"] = handoff
    tiny_config["stages"][1]["optimizer"] = {"lr": 5e-3, "lr_multipliers": {"1.*": 0.5}}
    message = _error(tiny_config)
    assert "stages[1].optimizer.lr_multipliers" in message and "reset" in message
    tiny_config["stages"][1]["optimizer"] = {"lr": 5e-3, "lr_multipliers": {"1.*": 0.1}}
    parse_config(tiny_config)
    tiny_config["stages"][1]["optimizer"] = {"lr": 5e-3}
    assert parse_config(tiny_config).resolved_stages()[1].optimizer.lr_multipliers == {"1.*": 0.1}  # type: ignore[union-attr]
    tiny_config["stages"][1]["handoff"] = "reset"
    tiny_config["stages"][1]["optimizer"] = {"lr": 5e-3, "lr_multipliers": {"1.*": 0.5}}
    parse_config(tiny_config)


def test_fingerprint_changes_with_the_curriculum(tiny_config: dict[str, Any]) -> None:
    base = parse_config(tiny_config).fingerprint()
    tiny_config["stages"][1]["duration"] = "41ba"
    assert parse_config(tiny_config).fingerprint() != base
    tiny_config["stages"][1]["duration"] = "40ba"
    tiny_config["log_every"] = 7  # log cadence is not part of the curriculum
    assert parse_config(tiny_config).fingerprint() == base


def _error(config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(config, source="cfg.yaml")
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def test_unknown_field(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["durration"] = "10ba"
    assert "cfg.yaml: stages[0].durration: unknown field" in _error(tiny_config)


def test_wrong_type(tiny_config: dict[str, Any]) -> None:
    tiny_config["batch_size"] = "big"
    message = _error(tiny_config)
    assert "batch_size:" in message and "'big'" in message


@pytest.mark.parametrize("duration", ["0ba", "-3ba", "0sp"])
def test_zero_or_negative_duration(tiny_config: dict[str, Any], duration: str) -> None:
    tiny_config["stages"][1]["duration"] = duration
    message = _error(tiny_config)
    assert message.startswith("cfg.yaml: stages[1].duration:")


def test_empty_stage_list(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"] = []
    assert "stages: List should have at least 1 item" in _error(tiny_config)


def test_unknown_loss_name(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["loss"] = "cross_entropyy"
    message = _error(tiny_config)
    assert "stages[0].loss[0].name" in message and "unknown loss 'cross_entropyy'" in message


def test_duplicate_stage_names(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][1]["name"] = "easy"
    assert "stage names must be distinct" in _error(tiny_config)


def test_fraction_needs_total(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["duration"] = "0.5dur"
    assert "stages[0].duration" in _error(tiny_config)


def test_carry_across_optimizer_change(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][1]["optimizer"] = {"name": "sgd", "lr": 0.1}
    assert "stages[1].handoff" in _error(tiny_config)


def test_data_source_that_cannot_be_imported(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][1]["data"] = "no_such_package.data:make"
    config = parse_config(tiny_config)
    with pytest.raises(
        ConfigError,
        match=r"stages\[1\]\.data\.sources\[0\]: cannot import module 'no_such_package.data'",
    ):
        Curriculum(config)


def test_unknown_builtin_source(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["data"] = "parityy"
    with pytest.raises(
        ConfigError, match=r"stages\[0\]\.data\.sources\[0\]: unknown built-in dataset 'parityy'"
    ):
        Curriculum(parse_config(tiny_config))


def test_missing_in_memory_dataset(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["data"] = "@mine"
    with pytest.raises(DataError, match="no in-memory dataset named 'mine'"):
        Curriculum(parse_config(tiny_config))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("stages: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(path)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "ckpt.pt")


def test_corrupted_checkpoint_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupted or not a checkpoint"):
        load_checkpoint(path)


def test_binary_config_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x80\x04\x95PK\x03\x04\xff\xfe" + bytes(range(256)))
    with pytest.raises(
        ConfigError, match=r"weights\.yaml: not a text file \(not valid UTF-8 at byte 0\)"
    ):
        load_config(path)


def test_unreadable_config_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found|cannot read"):
        load_config(tmp_path)  # a directory


def test_huge_duration_in_a_config_is_a_field_error(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["duration"] = "1e400ba"
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.duration: .*at most 1e\+12 steps"):
        parse_config(tiny_config)

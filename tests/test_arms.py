"""Control arms: each keeps the curriculum's stage structure and changes only the data.

For every arm, one test states what it keeps (stage lengths, optimizers, LR per step,
hand-offs, freezing, gradient clipping, batch sizes) and what it changes (the data).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from stagetrain import ConfigError, Curriculum, CurriculumConfig, parse_config
from stagetrain.arms import ARMS, derive_arm, parse_arms
from stagetrain.data import IndexSubset, TensorPairDataset

SCORED = {"scorer": "callable", "fn": "helpers_for_tests:by_first_feature"}


@pytest.fixture
def rich_config(tiny_config: dict[str, Any]) -> dict[str, Any]:
    """Two stages that differ in everything a hand-off can carry: the hardest case."""
    tiny_config["stages"][0]["optimizer"] = {
        "name": "adamw", "lr": 0.01, "warmup": "5ba", "weight_decay": 0.0, "betas": [0.9, 0.999],
    }  # fmt: skip
    tiny_config["stages"][1].update(
        handoff="reset",
        freeze=["1.*"],
        optimizer={
            "name": "adamw", "lr": 0.003, "warmup": "4ba", "weight_decay": 0.1,
            "betas": [0.8, 0.95], "grad_clip": 0.5, "schedule": {"kind": "cosine", "end": 0.1},
        },
    )  # fmt: skip
    return tiny_config


def structure(config: CurriculumConfig) -> list[tuple[Any, ...]]:
    """Everything an arm must keep, position by position."""
    built = Curriculum(config)
    return [
        (s.name, s.optimizer, s.handoff, s.freeze, s.batch_size, s.grad_accum, s.advance, b.steps)
        for s, b in zip(config.resolved_stages(), built.stages, strict=True)
    ]


def lrs(config: CurriculumConfig) -> list[float]:
    return [step.lr for step in Curriculum(config).steps()]


def data(config: CurriculumConfig) -> list[tuple[Any, ...]]:
    """What an arm may change, position by position: sources, replay, pacing, seq_len, loss."""
    return [
        (
            [(s.label, s.builtin, s.args, s.select) for s in stage.data.sources],
            stage.data.replay,
            stage.pacing,
            stage.seq_len,
            stage.loss,
        )
        for stage in config.resolved_stages()  # inherited losses filled in
    ]


def test_every_arm_is_listed() -> None:
    assert ARMS == ("curriculum", "baseline", "union", "anti", "easy-only", "random-order")


def test_curriculum_arm_is_the_config(rich_config: dict[str, Any]) -> None:
    config = parse_config(rich_config)
    assert derive_arm(Curriculum(config), "curriculum") == config


def test_baseline_keeps_structure_and_trains_the_final_data(rich_config: dict[str, Any]) -> None:
    config = parse_config(rich_config)
    arm = derive_arm(Curriculum(config), "baseline")
    # keeps: both stages with their lengths, optimizers (weight decay, betas, clipping),
    # the reset hand-off and the freeze of stage 2, and so the LR of every step
    assert structure(arm) == structure(config)
    assert lrs(arm) == lrs(config)
    # changes: every stage trains on the final stage's data
    final = data(config)[-1]
    assert data(arm) == [final, final]


def test_easy_only_keeps_structure_and_trains_the_first_data(rich_config: dict[str, Any]) -> None:
    config = parse_config(rich_config)
    arm = derive_arm(Curriculum(config), "easy-only")
    assert structure(arm) == structure(config)
    assert lrs(arm) == lrs(config)
    first = data(config)[0]
    assert data(arm) == [first, first]


def test_anti_keeps_structure_and_reverses_the_data(rich_config: dict[str, Any]) -> None:
    config = parse_config(rich_config)
    arm = derive_arm(Curriculum(config), "anti")
    assert structure(arm) == structure(config)
    assert lrs(arm) == lrs(config)
    assert data(arm) == list(reversed(data(config)))


def test_anti_reverses_pacing_inside_a_stage(rich_config: dict[str, Any]) -> None:
    rich_config["stages"][1]["data"]["difficulty"] = SCORED
    rich_config["stages"][1]["pacing"] = {"kind": "linear", "a": 0.5, "b": 0.3}
    config = parse_config(rich_config)
    arm = derive_arm(Curriculum(config), "anti")
    assert structure(arm) == structure(config)
    # the paced data moves to the first position and is revealed hardest first
    assert arm.stages[0].pacing is not None and arm.stages[0].pacing.order == "anti"
    assert arm.stages[0].pacing.kind == "linear" and arm.stages[1].pacing is None
    # a one-stage paced curriculum: anti = the same stage, hardest first
    one = dict(rich_config, stages=[rich_config["stages"][1] | {"handoff": "carry"}])
    one_config = parse_config(one)
    one_arm = derive_arm(Curriculum(one_config), "anti")
    assert one_arm.stages[0].pacing is not None and one_arm.stages[0].pacing.order == "anti"
    assert lrs(one_arm) == lrs(one_config)
    again = derive_arm(Curriculum(one_arm), "anti")
    assert again.stages[0].pacing == one_config.stages[0].pacing


def test_union_keeps_structure_and_weights_every_sample_once(rich_config: dict[str, Any]) -> None:
    config = parse_config(rich_config)
    arm = derive_arm(Curriculum(config), "union")
    assert structure(arm) == structure(config)
    assert lrs(arm) == lrs(config)
    for stage in arm.stages:
        # 400 samples each: equal weights = every one of the 800 samples equally likely
        assert sorted((s.label, s.weight) for s in stage.data.sources) == [
            ("biased", 400.0), ("uniform", 400.0),
        ]  # fmt: skip
        assert stage.pacing is None and stage.data.replay == 0


def test_union_tells_sources_apart_by_identity_not_label(tiny_config: dict[str, Any]) -> None:
    # two stages on the same built-in with different arguments and no 'name': same label
    for stage, size in zip(tiny_config["stages"], (300, 500), strict=True):
        del stage["data"]["name"]
        stage["data"]["args"]["size"] = size
    arm = derive_arm(Curriculum(parse_config(tiny_config)), "union")
    sources = arm.stages[0].data.sources
    assert sorted((s.args["size"], s.weight) for s in sources) == [(300, 300.0), (500, 500.0)]


def test_union_counts_a_selected_subset_of_a_source_once(tiny_config: dict[str, Any]) -> None:
    # stage 1: the easiest 30 % of the uniform data; stage 2: all of it
    uniform = tiny_config["stages"][1]["data"]
    tiny_config["stages"][0]["data"] = dict(
        uniform, name="easiest", difficulty=SCORED, select={"easiest": 0.3}
    )
    arm = derive_arm(Curriculum(parse_config(tiny_config)), "union")
    (source,) = arm.stages[0].data.sources
    assert source.args == uniform["args"] and source.select is None and source.weight == 400.0


def _probabilities(config: CurriculumConfig) -> dict[int, float]:
    """Probability of drawing each underlying sample in the first stage of ``config``."""
    stage = Curriculum(config).stages[0]
    weights = [w(0) for w in stage.weights]
    total = sum(weights)
    out: dict[int, float] = {}
    for dataset, weight in zip(stage.data.datasets, weights, strict=True):
        indices = dataset.indices if isinstance(dataset, IndexSubset) else np.arange(len(dataset))
        for i in indices.tolist():
            assert i not in out, "a sample appears in two sources of the union"
            out[i] = weight / total / len(indices)
    return out


@pytest.mark.parametrize(
    ("selects", "expected"),
    [
        ([{"easiest": 0.3}, {"hardest": 0.3}], 240),  # disjoint: 120 + 120
        ([{"easiest": 0.6}, {"hardest": 0.6}], 400),  # overlapping, covering all: the source
        ([{"easiest": 0.3}, {"easiest": 0.5}], 200),  # nested: the larger one
        ([{"quantiles": [0.1, 0.4]}, {"quantiles": [0.3, 0.7]}], 240),  # overlapping ranges
    ],
)
def test_union_of_selections_of_one_source(
    tiny_config: dict[str, Any], selects: list[dict[str, Any]], expected: int
) -> None:
    base = tiny_config["stages"][1]["data"]
    for i, (stage, select) in enumerate(zip(tiny_config["stages"], selects, strict=True)):
        stage["data"] = dict(base, name=f"part{i}", difficulty=SCORED, select=select)
    config = parse_config(tiny_config)
    curriculum = Curriculum(config)
    arm = derive_arm(curriculum, "union")
    probabilities = _probabilities(arm)
    chosen = set()
    for stage in curriculum.stages:
        chosen |= set(stage.data.datasets[0].indices.tolist())
    assert set(probabilities) == chosen and len(chosen) == expected
    assert np.allclose(list(probabilities.values()), 1 / expected)


def test_random_order_changes_only_the_pacing_order(rich_config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="'random-order' needs a stage with pacing"):
        derive_arm(Curriculum(parse_config(rich_config)), "random-order")
    rich_config["stages"][1]["data"]["difficulty"] = SCORED
    rich_config["stages"][1]["pacing"] = {"kind": "step", "a": 0.5, "b": 0.3}
    config = parse_config(rich_config)
    arm = derive_arm(Curriculum(config), "random-order")
    assert structure(arm) == structure(config)
    assert lrs(arm) == lrs(config)
    assert arm.stages[0] == config.stages[0]
    assert arm.stages[1].pacing is not None and arm.stages[1].pacing.order == "random"
    assert arm.stages[1].model_copy(update={"pacing": config.stages[1].pacing}) == config.stages[1]


def test_arms_keep_advance_rules_and_drop_replay(rich_config: dict[str, Any]) -> None:
    rich_config["stages"][0]["advance"] = {"metric": "test.accuracy", "threshold": 0.9}
    rich_config["stages"][1]["data"] = {
        "sources": [rich_config["stages"][1]["data"]],
        "replay": 0.25,
    }
    config = parse_config(rich_config)
    for name in ("baseline", "union", "easy-only"):
        arm = derive_arm(Curriculum(config), name)
        assert structure(arm) == structure(config)
        assert all(s.data.replay == 0 for s in arm.stages)
    anti = derive_arm(Curriculum(config), "anti")
    # replay is a property of the position: anti's second stage replays what anti trained first
    assert [s.data.replay for s in anti.stages] == [0.0, 0.25]


def _token_dataset(n: int, length: int) -> TensorPairDataset:
    tokens = torch.randint(0, 16, (n, length + 1), generator=torch.Generator().manual_seed(0))
    return TensorPairDataset(tokens[:, :-1], tokens[:, 1:])


def test_token_budget_arms_keep_tokens_and_the_lr_by_token_fraction() -> None:
    # short context (4 tokens) then long (16): arms on long samples take fewer steps for
    # the same tokens, and follow the curriculum's LR at the same fraction of each stage
    text = _token_dataset(200, 16)
    config = CurriculumConfig(
        name="tokens",
        batch_size=8,
        stages=[
            {"name": "short", "duration": "40ba", "seq_len": 4,
             "data": {"sources": [{"dataset": text, "name": "text"}]},
             "optimizer": {"name": "adamw", "lr": 0.01, "warmup": "8ba"}},
            {"name": "long", "duration": "20ba", "seq_len": 16, "handoff": "reset",
             "data": {"sources": [{"dataset": text, "name": "text"}]},
             "optimizer": {"name": "adamw", "lr": 0.002, "warmup": "4ba",
                           "schedule": {"kind": "cosine", "end": 0.0}}},
        ],
    )  # fmt: skip
    curriculum = Curriculum(config)
    lr = lrs(config)
    tokens = [s.context.tokens(s.steps) for s in curriculum.stages]
    for name, steps, ratio in [("baseline", [10, 20], [4, 1]), ("anti", [10, 80], [4, 0.25])]:
        arm = Curriculum(derive_arm(curriculum, name))
        assert [s.steps for s in arm.stages] == steps
        assert [s.context.tokens(s.steps) for s in arm.stages] == tokens
        arm_lr = lrs(arm.config)
        for k, (stage, r) in enumerate(zip(arm.stages, ratio, strict=True)):
            start, orig_start = arm.start_steps[k], curriculum.start_steps[k]
            for t in range(stage.steps):
                if (t * r) == int(t * r):
                    assert arm_lr[start + t] == pytest.approx(lr[orig_start + int(t * r)])
    union = Curriculum(derive_arm(curriculum, "union"))
    assert [s.context.tokens(s.steps) for s in union.stages] == tokens
    assert [s.config.seq_len for s in union.stages] == [16, 16]


def test_unusable_arms_are_clear_errors(tiny_config: dict[str, Any]) -> None:
    one = dict(tiny_config, stages=tiny_config["stages"][:1])
    curriculum = Curriculum(parse_config(one))
    for name in ("anti", "union", "easy-only", "baseline"):
        with pytest.raises(ConfigError, match=f"'{name}'"):
            derive_arm(curriculum, name)
    with pytest.raises(ConfigError, match="unknown arm 'antii'"):
        derive_arm(curriculum, "antii")


def test_parse_arms_refuses_duplicates_and_unknown_names() -> None:
    assert parse_arms("curriculum, baseline") == ["curriculum", "baseline"]
    with pytest.raises(ConfigError, match="arms: 'curriculum' is listed twice"):
        parse_arms("curriculum,curriculum")
    with pytest.raises(ConfigError, match="unknown arm 'bogus'"):
        parse_arms(["bogus"])
    with pytest.raises(ConfigError, match="give at least one arm"):
        parse_arms(",")

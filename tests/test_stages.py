"""Stage features: replay, in-memory datasets, multi-term losses with distillation, TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stagetrain import ConfigError, Curriculum, fit, parse_config
from stagetrain.data import TensorPairDataset


def test_replay_fraction_of_earlier_stages(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][1]["data"] = {
        "sources": [tiny_config["stages"][1]["data"]],
        "replay": 0.25,
    }
    curriculum = Curriculum(parse_config(tiny_config))
    target = curriculum.stages[1]
    assert [(s.label, s.share, s.replay) for s in target.sources] == [
        ("uniform", 0.75, False),
        ("easy/biased", 0.25, True),
    ]
    counts = target.sampler.counts.sum(axis=0)
    assert counts.tolist() == [480, 160]  # 40 steps x 16: exactly 3/4 and 1/4
    drawn = np.concatenate([target.indices(t) for t in range(40)])
    assert (drawn >= 400).sum() == 160  # indices past the first source are replayed samples


def test_replay_in_first_stage_is_an_error(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["data"] = {
        "sources": [tiny_config["stages"][0]["data"]],
        "replay": 0.5,
    }
    with pytest.raises(
        ConfigError, match=r"stages\[0\]\.data\.replay: the first stage has no earlier stage"
    ):
        Curriculum(parse_config(tiny_config))


def test_in_memory_datasets(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    easy = TensorPairDataset(x, (x[:, 0] > 0).long())
    tiny_config["stages"][0]["data"] = "@easy"
    curriculum = Curriculum(parse_config(tiny_config), datasets={"easy": easy})
    assert len(curriculum.stages[0].data) == 64
    inputs, targets = curriculum.stages[0].batch(0)
    assert inputs.shape == (16, 8) and targets.shape == (16,)


def test_weighted_loss_terms_with_distillation(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][1]["loss"] = [
        {"name": "cross_entropy", "weight": 1.0},
        {"name": "kl_distill", "weight": 0.5, "args": {"temperature": 2.0}},
    ]
    config = parse_config(tiny_config)
    with pytest.raises(ConfigError, match=r"stages\[1\]\.loss: kl_distill needs a teacher model"):
        Curriculum(config)
    curriculum = Curriculum(config, has_teacher=True)
    teacher = curriculum.build_model()
    model = curriculum.build_model()
    fit(
        model,
        curriculum,
        run_dir=tmp_path / "r",
        teacher=teacher,
        progress=False,
        tensorboard=False,
    )
    import json

    records = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["type"] == "train" and r["stage"] == "target"]
    assert all("loss/kl_distill" in r and "loss/cross_entropy" in r for r in train)
    for r in train:
        assert r["loss"] == pytest.approx(
            r["loss/cross_entropy"] + 0.5 * r["loss/kl_distill"], rel=1e-5
        )


def test_kl_distill_is_zero_against_itself() -> None:
    from stagetrain.losses import kl_distill

    logits = torch.randn(4, 5)
    assert kl_distill(
        logits, torch.zeros(4), teacher_output=logits, temperature=2.0
    ).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_distill(logits, torch.zeros(4), teacher_output=-logits).item() > 0


def test_tensorboard_events_are_written(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    pytest.importorskip("tensorboard")
    curriculum = Curriculum(parse_config(tiny_config))
    fit(curriculum.build_model(), curriculum, run_dir=tmp_path / "r", progress=False)
    events = list((tmp_path / "r" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

"""Difficulty scorers, the score cache, selection by difficulty, and their bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helpers_for_tests
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from stagetrain import ConfigError, Curriculum, DataError, TensorPairDataset, parse_config
from stagetrain.config import DifficultyConfig, SelectConfig
from stagetrain.difficulty import DifficultyScorer, ScoreCache, select_indices


def toy_dataset(n: int = 40) -> TensorPairDataset:
    inputs = torch.arange(n, dtype=torch.float32).reshape(n, 1).repeat(1, 4)
    return TensorPairDataset(inputs, (torch.arange(n) % 2).long())


def scorer(tmp_path: Path, **kwargs: Any) -> DifficultyScorer:
    return DifficultyScorer(seed=0, cache=ScoreCache(tmp_path / "cache"), progress=False, **kwargs)


def test_cache_is_hit_on_the_second_run(tmp_path: Path) -> None:
    cfg = DifficultyConfig(
        scorer="callable", fn="helpers_for_tests:by_first_feature", batch_size=16
    )
    before = helpers_for_tests.CALLS["count"]
    first = scorer(tmp_path).scores(toy_dataset(), cfg, identity="toy", field="src")
    calls_first = helpers_for_tests.CALLS["count"] - before
    assert calls_first == 3  # 40 samples in batches of 16
    again = scorer(tmp_path)  # a new process would start like this: a fresh scorer, same cache
    second = again.scores(toy_dataset(), cfg, identity="toy", field="src")
    assert helpers_for_tests.CALLS["count"] - before == calls_first  # not called again
    assert again.computed == 0
    assert np.array_equal(first, second) and first.tolist() == list(range(40))
    # a different dataset (or scorer) is a different key
    scorer(tmp_path).scores(toy_dataset(41), cfg, identity="toy", field="src")
    assert helpers_for_tests.CALLS["count"] - before > calls_first


def test_length_scorer(tmp_path: Path) -> None:
    tokens = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 0], [5, 0, 0, 0]])
    data = TensorPairDataset(tokens, tokens)
    cfg = DifficultyConfig(scorer="length", pad_id=0)
    assert scorer(tmp_path).scores(data, cfg, identity="t", field="s").tolist() == [2.0, 3.0, 1.0]


def test_transfer_loss_and_confidence(tmp_path: Path) -> None:
    # A reference "model" that is confident in class 0: samples labelled 1 are harder.
    class Reference(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([2.0, 0.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(len(x), 2)

    data = toy_dataset(6)
    s = scorer(tmp_path, models={"ref": Reference()})
    loss = s.scores(data, DifficultyConfig(scorer="loss", model="@ref"), identity="t", field="s")
    conf = s.scores(
        data, DifficultyConfig(scorer="confidence", model="@ref"), identity="t", field="s"
    )
    p0 = float(torch.tensor([2.0, 0.0]).softmax(0)[0])
    assert loss[0] == pytest.approx(-np.log(p0)) and loss[1] == pytest.approx(-np.log(1 - p0))
    assert conf[0] == pytest.approx(1 - p0) and conf[1] == pytest.approx(p0)


def test_self_taught_scores_mislabelled_samples_as_harder(tmp_path: Path) -> None:
    from stagetrain.config import ModelConfig
    from stagetrain.recipes.digits import noisy_digits

    data = noisy_digits(split="train", noise=0.3, seed=0)
    cfg = DifficultyConfig(scorer="self_taught", steps=150, folds=2)
    model = ModelConfig(builtin="mlp", args={"in_features": 64, "hidden": [64], "out_features": 10})
    scores = scorer(tmp_path, default_model=model).scores(data, cfg, identity="digits", field="s")
    noisy = data.noisy_mask.numpy()
    easiest_half = np.argsort(scores)[: len(scores) // 2]
    assert noisy[easiest_half].mean() < 0.1 < 0.3  # far fewer wrong labels than overall


def test_scores_from_file(tmp_path: Path) -> None:
    path = tmp_path / "scores.txt"
    path.write_text("\n".join(str(x) for x in range(40, 0, -1)))
    cfg = DifficultyConfig(scorer="file", path=str(path))
    scores = scorer(tmp_path).scores(toy_dataset(), cfg, identity="t", field="stages[0].data")
    assert scores[0] == 40.0 and scores[-1] == 1.0


def test_scores_file_of_wrong_length(tmp_path: Path) -> None:
    path = tmp_path / "scores.txt"
    path.write_text("1\n2\n3\n")
    cfg = DifficultyConfig(scorer="file", path=str(path))
    with pytest.raises(
        DataError, match=r"stages\[0\]\.data\.path: .*has 3 scores, but the dataset has 40 samples"
    ):
        scorer(tmp_path).scores(toy_dataset(), cfg, identity="t", field="stages[0].data")


def test_scores_file_with_nan(tmp_path: Path) -> None:
    path = tmp_path / "scores.npy"
    values = np.arange(40, dtype=float)
    values[7] = np.nan
    np.save(path, values)
    cfg = DifficultyConfig(scorer="file", path=str(path))
    with pytest.raises(DataError, match=r"non-finite scores \(NaN or inf\) at samples \[7\]"):
        scorer(tmp_path).scores(toy_dataset(), cfg, identity="t", field="f")


def test_selection() -> None:
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 9.0, 8.0, 7.0, 6.0])
    assert select_indices(scores, SelectConfig(easiest=0.3)).tolist() == [1, 3, 5]
    assert select_indices(scores, SelectConfig(hardest=0.2)).tolist() == [6, 7]
    assert select_indices(scores, SelectConfig(quantiles=(0.3, 0.6))).tolist() == [0, 2, 4]
    assert select_indices(scores, SelectConfig(scores=(6.0, 8.0))).tolist() == [7, 8, 9]
    with pytest.raises(DataError, match="keeps no sample"):
        select_indices(scores, SelectConfig(scores=(100.0, 200.0)))


@pytest.mark.parametrize("quantiles", [(-0.1, 0.5), (0.2, 1.5), (0.5, 0.5), (0.7, 0.2)])
def test_quantile_range_outside_unit_interval_or_empty(quantiles: tuple[float, float]) -> None:
    with pytest.raises(ValidationError, match="quantiles must satisfy 0 <= low < high <= 1"):
        SelectConfig(quantiles=quantiles)


def test_select_without_scorer(tiny_config: dict[str, Any]) -> None:
    tiny_config["stages"][0]["data"]["select"] = {"easiest": 0.3}
    with pytest.raises(
        ConfigError, match=r"stages\[0\]\.data.*'select' needs a 'difficulty' scorer"
    ):
        parse_config(tiny_config)


def test_stage_from_the_easiest_part_of_one_dataset(tiny_config: dict[str, Any]) -> None:
    uniform = tiny_config["stages"][1]["data"]
    tiny_config["stages"][0]["data"] = {
        **uniform,
        "name": "easiest-25%",
        "difficulty": {"scorer": "callable", "fn": "helpers_for_tests:by_first_feature"},
        "select": {"easiest": 0.25},
    }
    curriculum = Curriculum(parse_config(tiny_config), progress=False)
    easy, full = curriculum.stages
    assert len(easy.data) == 100 and len(full.data) == 400
    inputs, _ = easy.batch(0)
    assert (inputs[:, 0] == -1).all()  # bit 1 is -1 in the lower-scored samples

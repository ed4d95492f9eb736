"""Recipe data generators: deterministic for a seed, with their documented properties;
every recipe config validates and trains a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stagetrain import Curriculum, fit, parse_config
from stagetrain.recipes import shapes as shapes_module
from stagetrain.recipes.addition import addition_dataset
from stagetrain.recipes.digits import noisy_digits
from stagetrain.recipes.parity import parity_dataset
from stagetrain.recipes.pystdlib import stdlib_text
from stagetrain.recipes.shapes import generate_shapes, shape_mask, shapes_dataset

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_parity_labels_and_bias() -> None:
    data = parity_dataset(n_bits=10, k=3, bias=0.75, size=20_000, seed=1)
    bits = data.inputs.numpy().astype(int)
    assert set(np.unique(bits)) == {-1, 1}
    assert (np.prod(bits[:, :3], axis=1) > 0).astype(int).tolist() == data.targets.tolist()
    assert abs((bits == 1).mean() - 0.75) < 0.01
    again = parity_dataset(n_bits=10, k=3, bias=0.75, size=20_000, seed=1)
    assert torch.equal(data.inputs, again.inputs)
    assert not torch.equal(
        data.inputs, parity_dataset(n_bits=10, k=3, bias=0.75, size=20_000, seed=2).inputs
    )


def test_addition_strings_are_correct() -> None:
    data = addition_dataset(digits=[2, 4], max_digits=5, size=500, seed=0)
    powers = 10 ** np.arange(6)
    for x, y in zip(data.inputs.numpy(), data.targets.numpy(), strict=True):
        a, b = int(x[:5] @ powers[:5]), int(x[5:] @ powers[:5])
        assert len(str(a)) in (2, 4) and len(str(b)) == len(str(a))
        assert int(y @ powers) == a + b
    assert torch.equal(
        data.inputs, addition_dataset(digits=[2, 4], max_digits=5, size=500, seed=0).inputs
    )


def test_noisy_digits_fraction_and_clean_splits() -> None:
    train = noisy_digits(split="train", noise=0.4, seed=3)
    assert len(train) == 1000 and train.noisy_mask.float().mean().item() == pytest.approx(0.4)
    assert (train.targets[train.noisy_mask] != train.clean_targets[train.noisy_mask]).all()
    test = noisy_digits(split="test", noise=0.4, seed=3)
    assert not test.noisy_mask.any() and len(test) == 500
    assert torch.equal(noisy_digits(split="train", noise=0.4, seed=3).targets, train.targets)


def test_shapes_are_balanced_deterministic_and_inside_the_image() -> None:
    images, labels, params = generate_shapes(300, basic=False, seed=5)
    assert np.bincount(labels).tolist() == [100, 100, 100]
    # every shape's circumscribed circle lies inside the 32 x 32 image
    assert (params["cx"] - params["r"] >= 0).all() and (params["cx"] + params["r"] <= 32).all()
    assert (params["cy"] - params["r"] >= 0).all() and (params["cy"] + params["r"] <= 32).all()
    assert (np.abs(params["foreground"] - params["background"]) >= 0.3).all()
    # pixels are background or foreground only, and every image shows some shape
    for i in range(20):
        values = set(np.unique(images[i]).tolist())
        assert values <= {np.float32(params["background"][i]), np.float32(params["foreground"][i])}
        assert len(values) == 2
    assert np.array_equal(generate_shapes(300, basic=False, seed=5)[0], images)


def test_basic_shapes_are_special_cases_of_geom_shapes() -> None:
    _, _, params = generate_shapes(60, basic=True, seed=0)
    assert (params["ratio"] == 1.0).all()  # squares and circles
    # A GeomShapes rectangle/ellipse with ratio 1 is the BasicShapes square/circle: same pixels.
    equilateral = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    for kind in (0, 1, 2):
        basic = shape_mask(kind, 16.0, 15.0, 9.0, 0.4, 1.0, equilateral)
        assert basic.sum() > 50
    square = shape_mask(0, 16.0, 16.0, 8.0, 0.0, 1.0, equilateral)
    side = round(2 * 8.0 / float(np.sqrt(2)))
    assert abs(int(square.sum()) - side * side) <= 4 * side  # a square of side r * sqrt(2)
    assert shapes_module.RATIO[1] == 1.0  # Geom ratios include the Basic value


def test_shapes_splits() -> None:
    valid = shapes_dataset(kind="geom", split="valid", seed=0, size=90)
    assert valid.inputs.shape == (90, 1024)
    with pytest.raises(Exception, match="basic: train only"):
        shapes_dataset(kind="basic", split="test")


def test_stdlib_text_windows() -> None:
    data = stdlib_text(split="val", context=64, limit=100)
    inputs, targets = data.get_batch(np.array([0, 5]))
    assert inputs.shape == targets.shape == (2, 64)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # next-byte targets
    assert (
        len(stdlib_text(split="train", context=64))
        > 10 * len(stdlib_text(split="val", context=64)) // 2
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["parity", "noisy_digits", "shapes", "addition", "addition_naive", "addition_mixed", "charlm"],
)
def test_recipe_configs_train_a_few_steps(tmp_path: Path, name: str) -> None:
    raw = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    for stage in raw["stages"]:
        stage["duration"] = "3ba"
    raw["eval_every"] = "2ba"
    for ev in raw["evals"]:
        ev["max_samples"] = 64
    curriculum = Curriculum(parse_config(raw), progress=False)
    result = fit(
        curriculum.build_model(),
        curriculum,
        run_dir=tmp_path / name,
        progress=False,
        tensorboard=False,
    )
    assert result.state.step == 3 * len(raw["stages"])
    assert result.metrics

"""Small built-in models for the recipes and tests."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(
    *, in_features: int, hidden: Sequence[int] = (256, 256), out_features: int = 2
) -> nn.Sequential:
    """A ReLU multilayer perceptron ``in -> hidden... -> out`` (inputs are flattened)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)

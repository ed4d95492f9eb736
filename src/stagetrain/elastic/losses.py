"""Loss terms for elastic training (referred to by import path in a stage's ``loss``)."""

from __future__ import annotations

import torch

from stagetrain.errors import ConfigError


def router_loss(
    output: torch.Tensor, target: torch.Tensor, *, model: torch.nn.Module
) -> torch.Tensor:
    """The router's parameter-cost term from the model's last forward pass:
    ``|params(choice) / target - 1|`` averaged over the batch's samples."""
    value = getattr(model, "router_loss", None)
    if value is None:
        raise ConfigError(
            "loss: 'stagetrain.elastic.losses:router_loss' needs an elastic model with budgets"
        )
    return value

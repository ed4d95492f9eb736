"""Loss terms for elastic training (referred to by import path in a stage's ``loss``)."""

from __future__ import annotations

import torch

from stagetrain.errors import ConfigError


def router_loss(output: object, target: object, *, model: torch.nn.Module) -> torch.Tensor:
    """The router's parameter-cost term from the model's last forward pass:
    ``|params(choice) / target - 1|`` averaged over the batch's samples."""
    if getattr(model, "router", None) is None:
        raise ConfigError(
            "loss: 'stagetrain.elastic.losses:router_loss' needs an elastic model with budgets"
        )
    value = getattr(model, "router_loss", None)
    if value is None:
        raise ConfigError(
            "loss: 'stagetrain.elastic.losses:router_loss': the last forward pass had no "
            "budget (pass budget= beside the inputs, e.g. a 'budget' entry of dict batches)"
        )
    return value

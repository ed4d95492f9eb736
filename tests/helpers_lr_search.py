"""Import-path helpers of tests/test_lr_search.py (an optimizer without an LR, a linear
regression with a known Hessian, a model that kills its process during the LR search)."""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np
import torch


def no_lr_optimizer(params: Any, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """An optimizer factory that takes no learning rate (it fixes its own step)."""
    return torch.optim.SGD(params, lr=0.1, weight_decay=weight_decay)


def regression(
    *, curvatures: list[float], size: int = 4096, seed: int = 0
) -> Any:  # a TensorPairDataset
    """Noise-free linear regression ``y = x . w*`` whose features have exactly
    ``X^T X / n = diag(curvatures)``: the mean squared error then has the Hessian
    ``2 diag(curvatures)`` over the whole dataset."""
    from stagetrain import TensorPairDataset

    gen = torch.Generator().manual_seed(seed)
    d = len(curvatures)
    q, _ = torch.linalg.qr(torch.randn(size, d, generator=gen, dtype=torch.float64))
    x = q * torch.sqrt(torch.tensor(np.asarray(curvatures) * size))
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    return TensorPairDataset(x.float(), (x @ w_star).float().unsqueeze(1))


def linear(*, features: int) -> torch.nn.Module:
    return torch.nn.Linear(features, 1, bias=False)


class _KillAtForward(torch.nn.Module):
    """SIGKILLs its own process at training forward ``at`` when STAGETRAIN_TEST_KILL is set."""

    def __init__(self, inner: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at and os.environ.get("STAGETRAIN_TEST_KILL"):
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)


def mlp_killed_at_forward(*, at: int, **mlp_args: Any) -> torch.nn.Module:
    from stagetrain.recipes.models import mlp

    return _KillAtForward(mlp(**mlp_args), at)

"""keep-position compatibility: a changed model or optimizer is named before anything
is loaded or written, one line per mismatch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from stagetrain.compat import check_compatible, ensure_compatible
from stagetrain.errors import CheckpointError


def mlp(hidden: int = 16, extra: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2)]
    if extra:
        layers.append(nn.Linear(2, 2))
    return nn.Sequential(*layers)


def trained_payload(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_an_unchanged_model_and_optimizer_are_compatible() -> None:
    model = mlp()
    payload = trained_payload(model, adam(model))
    fresh = mlp()
    assert check_compatible(fresh, adam(fresh), payload) == []
    assert check_compatible(fresh, adam, payload) == []  # a factory works too
    assert check_compatible(fresh, torch.optim.AdamW(fresh.parameters()), payload) == []
    ensure_compatible(fresh, adam, payload)


def test_a_resized_model_is_named_per_tensor() -> None:
    model = mlp(16)
    payload = trained_payload(model, adam(model))
    bigger = mlp(32)
    problems = check_compatible(bigger, adam(bigger), payload)
    assert "model: 0.weight: shape [16, 8] in the checkpoint, [32, 8] in the model" in problems
    assert "model: 2.weight: shape [2, 16] in the checkpoint, [2, 32] in the model" in problems
    assert any(
        p.startswith("optimizer: state of parameter 0 (0.weight): exp_avg has shape [16, 8]")
        for p in problems
    ), problems
    with pytest.raises(CheckpointError) as info:
        ensure_compatible(bigger, adam, payload)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "--on-change keep-position: the checkpoint does not fit"
    )
    assert "0.weight: shape [16, 8] in the checkpoint, [32, 8] in the model" in message


def test_added_and_removed_parameters() -> None:
    model = mlp()
    payload = trained_payload(model, adam(model))
    longer = mlp(extra=True)
    problems = check_compatible(longer, None, payload)
    assert problems == ["model: 3.weight, 3.bias: in the model but not in the checkpoint"]
    shorter_payload = trained_payload(longer, adam(longer))
    problems = check_compatible(mlp(), None, shorter_payload)
    assert problems == ["model: 3.weight, 3.bias: in the checkpoint but not in the model"]


def test_adam_to_sgd_is_caught_before_step_fails() -> None:
    model = mlp()
    payload = trained_payload(model, adam(model))
    # Without the check: load_state_dict succeeds and step() fails deep inside SGD.
    naive = sgd(mlp())
    naive.load_state_dict(payload["optimizer"])
    for p in naive.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    with pytest.raises(KeyError, match="momentum"):
        naive.step()
    fresh = mlp()
    problems = check_compatible(fresh, sgd(fresh), payload)
    assert any(
        p.startswith(
            "optimizer: group 0: SGD cannot use the checkpoint's optimizer state (KeyError 'momentum')"
        )
        and "saved by an Adam-like optimizer" in p
        for p in problems
    ), problems


def test_sgd_to_adam_is_caught() -> None:
    model = mlp()
    payload = trained_payload(model, sgd(model))
    fresh = mlp()
    problems = check_compatible(fresh, adam(fresh), payload)
    assert any(
        "Adam cannot use the checkpoint's optimizer state" in p and "SGD-like" in p
        for p in problems
    ), problems


def test_param_group_layout() -> None:
    model = mlp()
    payload = trained_payload(model, adam(model))
    fresh = mlp()
    two_groups = torch.optim.Adam(
        [{"params": fresh[0].parameters()}, {"params": fresh[2].parameters(), "lr": 1e-2}]
    )
    problems = check_compatible(fresh, two_groups, payload)
    assert problems[0] == "optimizer: 1 parameter group in the checkpoint, 2 in the new optimizer"
    model = mlp()
    grouped = trained_payload(
        model,
        torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}]),
    )
    fresh = mlp()
    regrouped = torch.optim.Adam(
        [{"params": [fresh[0].weight]}, {"params": [fresh[0].bias, *fresh[2].parameters()]}]
    )
    problems = check_compatible(fresh, regrouped, grouped)
    assert "optimizer: group 0: 2 parameters in the checkpoint, 1 in the new optimizer" in problems


def test_a_payload_without_model_or_optimizer_state() -> None:
    problems = check_compatible(mlp(), adam, {"model": "weights", "optimizer": None})
    assert problems == [
        "model: the checkpoint holds no state_dict (str)",
        "optimizer: the checkpoint holds no optimizer state_dict (NoneType)",
    ]


def test_many_mismatches_are_capped() -> None:
    wide = nn.Sequential(*[nn.Linear(4, 4) for _ in range(30)])
    narrow = nn.Sequential(*[nn.Linear(4, 5) for _ in range(30)])
    problems = check_compatible(narrow, None, {"model": wide.state_dict()}, max_problems=10)
    assert len(problems) == 11 and problems[-1] == "... and 50 more"

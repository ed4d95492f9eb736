"""Shared helpers: tiny curricula on the built-in parity data, seeded and CPU-only."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

torch.set_num_threads(1)  # identical float reductions in every process: bitwise tests rely on it
# Keras (stagetrain[keras]) picks its backend when first imported; the suite uses torch.
os.environ.setdefault("KERAS_BACKEND", "torch")


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """A two-stage parity curriculum small enough to train in about a second."""
    config: dict[str, Any] = {
        "name": "tiny",
        "seed": 3,
        "batch_size": 16,
        "log_every": 5,
        "eval_every": "20ba",
        "checkpoint": {"every": "10ba", "keep": 3},
        "model": {"builtin": "mlp", "args": {"in_features": 8, "hidden": [16], "out_features": 2}},
        "evals": [
            {
                "name": "test",
                "data": {
                    "builtin": "parity",
                    "args": {"n_bits": 8, "k": 2, "size": 256, "split": "test"},
                },
            }
        ],
        "stages": [
            {
                "name": "easy",
                "duration": "30ba",
                "data": {
                    "builtin": "parity",
                    "name": "biased",
                    "args": {"n_bits": 8, "k": 2, "bias": 0.8, "size": 400},
                },
                "optimizer": {"name": "adamw", "lr": 0.01, "warmup": "5ba"},
            },
            {
                "name": "target",
                "duration": "40ba",
                "handoff": "carry",
                "data": {
                    "builtin": "parity",
                    "name": "uniform",
                    "args": {"n_bits": 8, "k": 2, "size": 400},
                },
            },
        ],
    }
    config.update(overrides)
    return copy.deepcopy(config)


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    return tiny_config_dict()


@pytest.fixture(autouse=True)
def _score_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep difficulty scores of each test in a fresh directory, never in ~/.cache."""
    monkeypatch.setenv("STAGETRAIN_CACHE", str(tmp_path_factory.mktemp("scores")))

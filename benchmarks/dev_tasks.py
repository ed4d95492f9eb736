"""Synthetic tasks of the ``lr: auto`` development set (benchmarks/lr_auto_dev.py).

They are not recipes of the evaluation (benchmarks/lr_auto.py): the search's rules are
chosen on these and on examples/shapes.yaml and examples/addition.yaml only.

* ``teacher``: classification of Gaussian inputs by a fixed random two-layer teacher
  network (10 classes), a share of the labels replaced by uniform ones: a small MLP
  trained with Adam on noisy labels, the setting in which a range test's edge is far
  above the LR that is best over a long stage.
* ``noisy_regression``: linear regression with Gaussian label noise (SGD), whose best
  constant LR falls with the number of steps (the noise floor grows with the LR).
"""

from __future__ import annotations

import numpy as np
import torch

from stagetrain import TensorPairDataset

DIM, CLASSES = 32, 10


def _teacher_labels(x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(12345)  # one teacher for every split and seed
    w1 = rng.standard_normal((DIM, 64)) / np.sqrt(DIM)
    w2 = rng.standard_normal((64, CLASSES)) / np.sqrt(64)
    return np.argmax(np.tanh(x @ w1) @ w2, axis=1)


def teacher(
    *, size: int = 8000, noise: float = 0.3, split: str = "train", seed: int = 0
) -> TensorPairDataset:
    """``size`` samples of the teacher task; ``noise``: share of uniformly random labels."""
    stream = {"train": 0, "valid": 1, "test": 2}[split]
    rng = np.random.default_rng([seed, stream, int(noise * 1000)])
    x = rng.standard_normal((size, DIM))
    y = _teacher_labels(x)
    flip = rng.random(size) < noise
    y[flip] = rng.integers(0, CLASSES, int(flip.sum()))
    return TensorPairDataset(torch.from_numpy(x).float(), torch.from_numpy(y).long())


def noisy_regression(
    *, size: int = 8000, noise: float = 1.0, features: int = 16, seed: int = 0
) -> TensorPairDataset:
    """``y = x . w* + noise x N(0, 1)`` with ``x ~ N(0, diag(s))``, s from 0.1 to 1."""
    rng = np.random.default_rng([seed, 7])
    scales = np.sqrt(np.linspace(0.1, 1.0, features))
    x = rng.standard_normal((size, features)) * scales
    w = np.random.default_rng(99).standard_normal(features)
    y = x @ w + noise * rng.standard_normal(size)
    return TensorPairDataset(torch.from_numpy(x).float(), torch.from_numpy(y).float()[:, None])

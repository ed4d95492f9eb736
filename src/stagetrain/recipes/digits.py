"""scikit-learn's handwritten digits (8x8, 10 classes) with optional label noise.

The 1,797 images are split once by a seeded permutation: 1,000 train, 297
validation, 500 test. Label noise (Wu, Dyer & Neyshabur 2021 use 20-60 %) replaces
the label of a seeded random ``noise`` fraction of the *training* samples with a
different, uniformly drawn class; validation and test labels stay clean.
"""

from __future__ import annotations

import numpy as np
import torch

from stagetrain.data import TensorPairDataset
from stagetrain.errors import DataError

SPLITS = {"train": (0, 1000), "val": (1000, 1297), "test": (1297, 1797)}


class NoisyDigits(TensorPairDataset):
    """Digits whose ``targets`` may be corrupted; ``clean_targets`` keeps the truth."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, clean: torch.Tensor) -> None:
        super().__init__(inputs, targets)
        self.clean_targets = clean

    @property
    def noisy_mask(self) -> torch.Tensor:
        return self.targets != self.clean_targets


def noisy_digits(*, split: str = "train", noise: float = 0.0, seed: int = 0) -> NoisyDigits:
    """One split of the digits; ``noise`` is the corrupted fraction of training labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "the digits dataset needs scikit-learn: pip install 'stagetrain[recipes]'"
        ) from exc
    if split not in SPLITS:
        raise DataError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if not 0.0 <= noise < 1.0:
        raise DataError(f"noise must be in [0, 1), got {noise}")
    digits = load_digits()
    # The split is fixed (seed 0) so that every training seed sees the same test set.
    order = np.random.default_rng(0).permutation(len(digits.target))
    start, end = SPLITS[split]
    idx = order[start:end]
    inputs = torch.tensor(digits.data[idx] / 16.0, dtype=torch.float32)
    clean = torch.tensor(digits.target[idx], dtype=torch.int64)
    targets = clean.clone()
    if split == "train" and noise > 0:
        rng = np.random.default_rng([seed, 0xD161])
        n_noisy = round(noise * len(idx))
        flip = rng.choice(len(idx), n_noisy, replace=False)
        shift = rng.integers(1, 10, n_noisy)  # a different class, uniformly
        targets[flip] = (clean[flip] + torch.from_numpy(shift)) % 10
    return NoisyDigits(inputs, targets, clean)

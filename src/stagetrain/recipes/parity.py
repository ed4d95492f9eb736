"""Sparse parity with a biased first stage (Abbe, Cornacchia & Lotfi 2023).

Inputs are ``n_bits`` independent bits in {-1, +1}; the label is the parity of the
first ``k`` of them (class 1 when their product is +1). With uniform bits no single
bit correlates with the label, so gradient descent wanders on a plateau for a long
time. With biased bits (``P(x_i = +1) = bias > 1/2``) each relevant bit correlates
with the label and the network finds the support quickly; a second stage on uniform
bits then finishes the job. That is the two-stage curriculum this recipe exercises.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from stagetrain.data import TensorPairDataset


class ParityDataset(TensorPairDataset):
    """Bits stored as int8 (1 byte per bit) and converted to float per batch."""

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = super().get_batch(indices)
        return inputs.float(), targets

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index].float(), self.targets[index]


def parity_bits(
    n_samples: int, n_bits: int, k: int, bias: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n_samples`` rows of ±1 bits with ``P(+1) = bias`` and their k-parity labels (0/1)."""
    bits = np.where(rng.random((n_samples, n_bits)) < bias, 1, -1).astype(np.int8)
    labels = (np.prod(bits[:, :k], axis=1, dtype=np.int64) > 0).astype(np.int64)
    return bits, labels


def parity_dataset(
    *,
    n_bits: int = 50,
    k: int = 5,
    bias: float = 0.5,
    size: int = 100_000,
    split: str = "train",
    seed: int = 0,
) -> ParityDataset:
    """A sparse-parity dataset; deterministic for ``(seed, split, bias, n_bits, k, size)``.

    Args:
        n_bits: input dimension d.
        k: number of leading bits whose parity is the label.
        bias: probability that a bit is +1 (0.5 = uniform; the curriculum's easy stage
            uses e.g. 0.75).
        size: number of samples.
        split: name of the split ("train", "test", ...): different splits never share
            a random stream.
        seed: data seed (the curriculum seed unless given).
    """
    if not 0 < k <= n_bits:
        raise ValueError(f"k must be in [1, n_bits], got k={k}, n_bits={n_bits}")
    if not 0.0 < bias < 1.0:
        raise ValueError(f"bias must be in (0, 1), got {bias}")
    stream = [seed, zlib.crc32(split.encode()), round(bias * 1_000_000), n_bits, k]
    bits, labels = parity_bits(size, n_bits, k, bias, np.random.default_rng(stream))
    return ParityDataset(torch.from_numpy(bits), torch.from_numpy(labels))

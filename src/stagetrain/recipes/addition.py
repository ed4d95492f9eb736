"""Multi-digit addition (Zaremba & Sutskever 2014, "Learning to Execute"), generated here.

A sample adds two numbers of exactly ``digits`` digits (1 to ``max_digits``). The
input is the two numbers' digits, least significant first, each zero-padded to
``max_digits`` (``2 * max_digits`` tokens in 0..9); the target is the sum's
``max_digits + 1`` digits, least significant first. Difficulty = number of digits:
longer numbers have longer carry chains and more digits to remember.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

from stagetrain.data import TensorPairDataset
from stagetrain.errors import DataError


def digits_of(values: np.ndarray, width: int) -> np.ndarray:
    """Digits of each value, least significant first, zero-padded to ``width``."""
    powers = 10 ** np.arange(width, dtype=np.int64)
    return (values[:, None] // powers[None, :]) % 10


def addition_dataset(
    *,
    digits: int | list[int],
    max_digits: int = 5,
    size: int = 50_000,
    split: str = "train",
    seed: int = 0,
) -> TensorPairDataset:
    """Sums of two ``digits``-digit numbers (a list draws each sample's length uniformly)."""
    lengths = [digits] if isinstance(digits, int) else list(digits)
    if not lengths or min(lengths) < 1 or max(lengths) > max_digits:
        raise DataError(f"digits must lie in [1, {max_digits}], got {digits}")
    rng = np.random.default_rng(
        [seed, zlib.crc32(f"{split}/{sorted(lengths)}".encode()), max_digits]
    )
    n_digits = rng.choice(lengths, size)
    low = np.where(n_digits == 1, 0, 10 ** (n_digits - 1))
    high = 10**n_digits
    a = rng.integers(low, high)
    b = rng.integers(low, high)
    inputs = np.concatenate([digits_of(a, max_digits), digits_of(b, max_digits)], axis=1)
    targets = digits_of(a + b, max_digits + 1)
    return TensorPairDataset(torch.from_numpy(inputs), torch.from_numpy(targets))


class AdditionGRU(nn.Module):
    """A GRU sequence model for the addition task, with two ways of reading the numbers.

    ``layout="pairs"`` reads digit pairs ``(a_i, b_i)`` least significant first and emits
    sum digit ``i`` at step ``i`` (one extra step for the final carry): it only has to
    carry the carry in its state, which makes the task easy.

    ``layout="text"`` reads the problem as text, most significant digit first, the way
    "Learning to Execute" feeds its LSTM: ``a`` , ``+``, ``b``, ``=``, then one query token
    per sum digit, at which it emits the sum most significant first. It must hold every
    digit of ``a`` in its state until the matching digit of ``b`` arrives, and the carry
    flows against the reading order, so longer numbers are much harder.
    """

    PLUS, EQUALS, QUERY = 10, 11, 12

    def __init__(
        self, *, max_digits: int = 5, hidden: int = 128, embed: int = 32, layout: str = "pairs"
    ) -> None:
        super().__init__()
        if layout not in ("pairs", "text"):
            raise ValueError(f"layout must be 'pairs' or 'text', got {layout!r}")
        self.max_digits = max_digits
        self.layout = layout
        self.embed = nn.Embedding(100 if layout == "pairs" else 13, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        a, b = tokens[:, : self.max_digits], tokens[:, self.max_digits :]
        if self.layout == "pairs":
            pairs = torch.nn.functional.pad(a * 10 + b, (0, 1))  # a final (0, 0) for the carry
            outputs, _ = self.rnn(self.embed(pairs))
            return self.head(outputs)
        batch = tokens.shape[0]

        def token(value: int, count: int) -> torch.Tensor:
            return torch.full((batch, count), value, dtype=tokens.dtype, device=tokens.device)

        text = torch.cat(
            [
                a,
                token(self.PLUS, 1),
                b,
                token(self.EQUALS, 1),
                token(self.QUERY, self.max_digits + 1),
            ],
            dim=1,
        )
        outputs, _ = self.rnn(self.embed(text))
        return self.head(outputs[:, -(self.max_digits + 1) :])


def addition_gru(
    *, max_digits: int = 5, hidden: int = 128, embed: int = 32, layout: str = "pairs"
) -> AdditionGRU:
    return AdditionGRU(max_digits=max_digits, hidden=hidden, embed=embed, layout=layout)

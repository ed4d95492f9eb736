"""Seeds: a run's randomness is a function of its seed, whatever runs first.

User factories (data sources, models) may draw from the global generators of torch,
NumPy or Python. Each factory runs inside :func:`seeded` with a seed derived from the
run's seed and the factory's identity, and the global generators are put back
afterwards — so a factory's output does not depend on what ran before it, and
building data does not shift the training's random stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 32-bit seed from ``seed`` and any identifying parts (stable across processes)."""
    text = repr((seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave torch's, NumPy's and Python's global random state exactly as it was."""
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with every global generator seeded by ``seed``, then restore them."""
    with preserved_rng():
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        yield

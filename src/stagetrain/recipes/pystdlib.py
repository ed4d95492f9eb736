"""A character-level corpus that exists on every machine: CPython's standard library.

Files: every ``*.py`` file under the running interpreter's ``sysconfig`` "stdlib"
directory, excluding ``test``/``tests`` folders, ``idlelib``, ``site-packages`` and
``lib2to3`` (data-like or third-party), read as UTF-8 bytes in sorted path order. A
file goes to validation when ``crc32(relative path) % 10 == 0`` (about 10 %), to
training otherwise — a split by file, stable across machines with the same Python.
Tokens are bytes (vocabulary 256). A sample is a window of ``context + 1`` bytes
starting at a multiple of ``context``; ``(input, target)`` are the window shifted by
one, so a stage's ``seq_len`` truncates both.
"""

from __future__ import annotations

import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from stagetrain.errors import DataError

EXCLUDED_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}


@lru_cache(maxsize=4)
def corpus(split: str) -> np.ndarray:
    """All bytes of the split's files, concatenated (uint8)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if EXCLUDED_PARTS & set(relative.parts):
            continue
        is_val = zlib.crc32(str(relative).encode()) % 10 == 0
        if is_val == (split == "val"):
            chunks.append(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    if not chunks:
        raise DataError(f"no standard-library source found under {root}")
    return np.concatenate(chunks)


class ByteWindows:
    """Windows of ``context + 1`` bytes; ``get_batch`` returns int64 (inputs, targets)."""

    def __init__(self, data: np.ndarray, context: int, limit: int | None) -> None:
        self.data = torch.from_numpy(data.astype(np.int64))
        self.context = context
        n = (len(data) - 1) // context
        self.n = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.context
        window = self.data[start : start + self.context + 1]
        return window[:-1], window[1:]

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.from_numpy(np.asarray(indices, dtype=np.int64) * self.context)
        windows = self.data[starts[:, None] + torch.arange(self.context + 1)]
        return windows[:, :-1], windows[:, 1:]


def stdlib_text(
    *, split: str = "train", context: int = 256, limit: int | None = None
) -> ByteWindows:
    """Byte windows of the CPython standard library (see the module docstring)."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    return ByteWindows(corpus(split), context, limit)

"""Token files: one flat array of token ids (a raw ``.bin`` with its dtype, or a ``.npy``).

Their ``.json`` sidecars, their description (:class:`TokenFile`: dtype, offset, length),
a read-only mapping or a plain read of their tokens, and scans in chunks (document ends,
the largest id); nothing is loaded whole. Windows over them: :mod:`stagetrain.sources.tokens`.
"""

from __future__ import annotations

import glob
import json
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stagetrain.errors import DataError

INT_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64")
SIDECAR_FORMAT = "stagetrain-tokens"
_SCAN_CHUNK = 1 << 22
"""Tokens read at a time when scanning a file (for EOS positions or the largest id)."""
_EXACT_CHECK = 1 << 22
"""Files up to this many tokens have every id checked against the vocabulary."""
_CHECK_CHUNKS = 64
_CHECK_CHUNK = 1 << 14
"""Larger files: this many chunks of this many tokens, spread evenly, are checked."""


def sidecar_path(path: str | Path) -> Path:
    """The ``.json`` sidecar of a token file: ``data/train.bin`` -> ``data/train.json``."""
    return Path(path).with_suffix(".json")


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of token file ``path`` when it exists and is one of ours, else None."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == SIDECAR_FORMAT else None


@dataclass(frozen=True)
class TokenFile:
    """One token file: where its items start, their dtype and count (no data held)."""

    path: str
    dtype: str
    offset: int
    """Bytes before the first token (the ``.npy`` header; 0 for ``.bin``)."""
    length: int
    """Number of tokens."""
    max_token_id: int | None = None
    """The largest id, when a sidecar that matches the file records it."""

    def mapped(self) -> np.ndarray:
        """The tokens through a fresh read-only mapping advised for random access.

        The mapping lives as long as the returned array (or views of it) does.
        """
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        return np.frombuffer(mapped, dtype=self.dtype, count=self.length, offset=self.offset)

    def read(self, start: int, count: int) -> np.ndarray:
        """``count`` tokens from ``start``, read into memory (no mapping kept)."""
        count = max(0, min(count, self.length - start))
        item = np.dtype(self.dtype).itemsize
        return np.fromfile(self.path, dtype=self.dtype, count=count,
                           offset=self.offset + start * item)  # fmt: skip


def open_token_file(
    path: str, *, dtype: str | None, field: str, dtype_field: str = "dtype"
) -> TokenFile:
    """Describe a ``.bin`` or ``.npy`` token file, checking its size against its dtype.

    Raises:
        DataError: naming ``field`` (the file's argument) or ``dtype_field`` and the file
            when it is missing, empty, has an unknown or mismatched dtype, or a size that is
            not a whole number of items.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{field}: token file {path!r} not found")
    if file.suffix == ".npy":
        try:
            header = np.load(file, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise DataError(f"{field}: {path!r} is not a readable .npy file ({exc})") from None
        if header.dtype.name not in INT_DTYPES:
            raise DataError(f"{field}: {path!r} holds {header.dtype.name}, not integer token ids")
        if dtype is not None and np.dtype(dtype) != header.dtype:
            raise DataError(f"{field}: {path!r} holds {header.dtype.name}, but dtype is {dtype!r}")
        if header.ndim != 1 and not header.flags.c_contiguous:
            raise DataError(f"{field}: {path!r} is Fortran-ordered; save a flat array")
        result = TokenFile(str(file), header.dtype.name, int(header.offset), int(header.size))
        del header
    else:
        side = read_sidecar(file)
        side_dtype = side.get("dtype") if side else None
        if dtype is None and side_dtype is None:
            raise DataError(
                f"{dtype_field}: {path!r} is a raw token file without a .json "
                "sidecar; give its dtype (e.g. uint16), or write it with `stagetrain prepare`"
            )
        if dtype is not None and side_dtype is not None and np.dtype(dtype) != np.dtype(side_dtype):
            raise DataError(
                f"{dtype_field}: {dtype!r}, but the sidecar of {path!r} says {side_dtype!r}"
            )
        name = str(dtype or side_dtype)
        if name not in INT_DTYPES:
            raise DataError(
                f"{dtype_field}: {name!r} is not an integer dtype; "
                f"use one of {', '.join(INT_DTYPES)}"
            )
        size = file.stat().st_size
        item = np.dtype(name).itemsize
        if size % item:
            raise DataError(
                f"{dtype_field}: {path!r} has {size:,} bytes, not a multiple of "
                f"{item} ({name} items): wrong dtype?"
            )
        length = size // item
        recorded = None
        if side is not None and side.get("num_tokens") == length:
            recorded = side.get("max_token_id")
        result = TokenFile(str(file), name, 0, length, recorded)
    if result.length == 0:
        raise DataError(f"{field}: token file {path!r} is empty")
    return result


def expand_files(files: str | Sequence[str], *, field: str = "files") -> list[str]:
    """Paths from a path, a glob pattern, or a list of either (globs sorted)."""
    items = [files] if isinstance(files, str | Path) else list(files)
    if not items:
        raise DataError(f"{field}: give at least one token file")
    out: list[str] = []
    for i, item in enumerate(items):
        text = str(item)
        if any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(f"{field}[{i}]: no file matches {text!r}")
            out.extend(matches)
        else:
            out.append(text)
    return out


def document_ends(file: TokenFile, eos_id: int) -> np.ndarray:
    """End positions (exclusive, EOS included) of the documents of ``file``.

    A last document without a closing EOS ends at the end of the file.
    """
    ends = []
    for base in range(0, file.length, _SCAN_CHUNK):
        chunk = file.read(base, _SCAN_CHUNK)
        ends.append(np.flatnonzero(chunk == eos_id).astype(np.int64) + base + 1)
    out = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if len(out) == 0 or out[-1] != file.length:
        out = np.append(out, np.int64(file.length))
    return out


def largest_token_id(
    files: Sequence[TokenFile], *, exhaustive: bool = False
) -> tuple[int, str, int]:
    """``(largest id, file, position)`` over every token of small files and of files whose
    sidecar records it, else over evenly spread chunks (all tokens when ``exhaustive``)."""
    best = (-1, "", -1)
    for file in files:
        if file.max_token_id is not None and not exhaustive:
            if file.max_token_id > best[0]:
                best = (int(file.max_token_id), file.path, -1)
            continue
        if exhaustive or file.length <= _EXACT_CHECK:
            starts = np.arange(0, file.length, _SCAN_CHUNK)
            size = _SCAN_CHUNK
        else:
            starts = np.linspace(0, file.length - _CHECK_CHUNK, _CHECK_CHUNKS).astype(int)
            size = _CHECK_CHUNK
        for start in starts:
            chunk = file.read(int(start), size)
            if chunk.size == 0:
                continue
            pos = int(chunk.argmax())
            if int(chunk[pos]) > best[0]:
                best = (int(chunk[pos]), file.path, int(start) + pos)
    return best

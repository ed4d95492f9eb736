"""Window layouts: the spans no window crosses (files, or documents when ``document_aware``)
and where the windows of one ``(seq_len, stride)`` start in them.

The picture of ``random`` and ``sequential`` windows is in :mod:`stagetrain.sources.tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from stagetrain.sources.tokenfiles import TokenFile, document_ends

Mode = Literal["random", "sequential"]


@dataclass(frozen=True)
class Segments:
    """Spans windows may not cross: whole files, or documents (``document_aware``)."""

    file: np.ndarray
    start: np.ndarray
    length: np.ndarray


@dataclass(frozen=True)
class Layout:
    """The windows of one (seq_len, stride): the segments that hold any, and where each
    segment's windows end in the index space (``cum_end``)."""

    file: np.ndarray
    start: np.ndarray
    count: np.ndarray
    cum_end: np.ndarray

    @property
    def size(self) -> int:
        return int(self.cum_end[-1]) if len(self.cum_end) else 0


def segments_of(
    files: Sequence[TokenFile], *, eos_id: int | None, document_aware: bool
) -> Segments:
    """One segment per file, or per document of each file (``document_aware``)."""
    seg_file, seg_start, seg_len = [], [], []
    for i, file in enumerate(files):
        if document_aware:
            assert eos_id is not None
            ends = document_ends(file, eos_id)
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        else:
            ends, starts = np.array([file.length], np.int64), np.array([0], np.int64)
        seg_file.append(np.full(len(starts), i, dtype=np.int32))
        seg_start.append(starts)
        seg_len.append(ends - starts)
    return Segments(np.concatenate(seg_file), np.concatenate(seg_start),
                    np.concatenate(seg_len))  # fmt: skip


def layout_of(seg: Segments, seq_len: int, stride: int) -> Layout:
    """The windows of ``seq_len + 1`` tokens, one every ``stride`` tokens of each segment."""
    span = seq_len + 1
    count = np.where(seg.length >= span, (seg.length - span) // stride + 1, 0)
    keep = np.flatnonzero(count > 0)
    return Layout(
        seg.file[keep], seg.start[keep], count[keep].astype(np.int64),
        np.cumsum(count[keep]).astype(np.int64),
    )  # fmt: skip

"""Token files on disk, memory-mapped and read as windows of ``seq_len + 1`` tokens.

A *token file* is a flat array of token ids: a raw ``.bin`` file (its ``dtype`` given in
the config or in the ``.json`` sidecar that ``stagetrain prepare`` writes next to it) or
a ``.npy`` file (its header says the dtype). Several files form one source; windows never
cross from one file into the next. A window of ``seq_len + 1`` tokens gives the pair
``(inputs, targets) = (window[:-1], window[1:])``, both int64.

Which windows exist (the source's index space, ``0 <= i < len(source)``)::

    file:      t0 t1 t2 t3 t4 t5 t6 t7 t8 t9          seq_len = 4
    sequential [t0 .. t4]                              window i starts at i * seq_len:
                           [t4 .. t8]                  a tiling; one epoch = one pass
    random     [t0 .. t4]                              window i starts at i * stride
                  [t1 .. t5]                           (stride 1: every start position)
                     ...   [t5 .. t9]

The stage's deterministic sampler chooses which indices a step draws (an epoch-seeded
permutation), so both modes are shuffled, resumable and identical across world sizes;
the mode only fixes the set of windows. ``random`` with ``stride: 1`` draws every possible
window once per sampler epoch, i.e. ``seq_len`` passes over the tokens: count its length
in tokens (``tok``), not epochs. The sampler holds 4 bytes per window, so on very large
files a ``stride`` (say 64) keeps that small.

With ``eos_id`` and ``document_aware: true`` the same windows are laid out inside each
document instead of inside each file: a document ends with (and includes) its EOS token,
no window crosses a document boundary, and documents shorter than ``seq_len + 1``
tokens contribute no window. (The alternative, windows across documents with an
attention-reset mask, needs dict batches and model support; windows inside documents
work with any model that takes ``(inputs, targets)``.)

Memory: nothing is loaded whole. Windows are read through a read-only ``mmap`` of each
file, advised ``MADV_RANDOM`` (windows are read in shuffled order: the kernel's
read-ahead of 128 KiB around every 2 KiB window would read mostly unused pages, and map
them) and replaced by a fresh mapping once the pages it may have mapped (the windows,
plus the kernel's fault-around on either side) reach ``REMAP_BYTES`` (32 MiB).
A mapping kept forever counts every page it ever touched in the process's resident
memory, up to the size of the file (the "memmap leak" nanoGPT's loader avoids by
re-creating its memmap every batch); a fresh mapping for every batch pays the page
faults of each batch again. Document boundaries are found by streaming the file in
chunks and cost 8 bytes per document. See ``benchmarks/sampler_scale.py --tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stagetrain.errors import DataError
from stagetrain.sources.token_ids import check_token_ids
from stagetrain.sources.tokenfiles import (
    INT_DTYPES,
    SIDECAR_FORMAT,
    TokenFile,
    document_ends,
    expand_files,
    largest_token_id,
    open_token_file,
    read_sidecar,
    sidecar_path,
)
from stagetrain.sources.windows import Layout, Mode, Segments, layout_of, segments_of

__all__ = [  # the names below, and those of the token files this module used to hold
    "INT_DTYPES",
    "REMAP_BYTES",
    "SIDECAR_FORMAT",
    "Mode",
    "TokenFile",
    "TokenWindows",
    "check_token_ids",
    "document_ends",
    "expand_files",
    "open_token_file",
    "read_sidecar",
    "sidecar_path",
    "tokens_source",
]

REMAP_BYTES = 32 << 20
"""A file's mapping is replaced once the pages it may have mapped reach this many bytes."""
_FAULT_AROUND = 64 << 10
"""Linux maps up to this much of the page cache around each page fault (fault-around;
``MADV_RANDOM`` stops read-ahead but not this), so a window may map this much more on
each side."""


class TokenWindows:
    """Windows of ``seq_len + 1`` tokens over one or more token files.

    Build it with :func:`tokens_source` (the ``tokens`` built-in source); see the module
    docstring for the layout of windows. :meth:`with_seq_len` gives a view with another
    window length over the same files (cheap: nothing is re-read).

    Example:
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "t.npy")
        >>> np.save(path, np.arange(10, dtype=np.uint16))
        >>> data = tokens_source(files=path, seq_len=4, mode="sequential")
        >>> len(data), data[1][0].tolist(), data[1][1].tolist()
        (2, [4, 5, 6, 7], [5, 6, 7, 8])
    """

    def __init__(
        self,
        files: Sequence[TokenFile],
        *,
        seq_len: int | None,
        mode: Mode,
        stride: int,
        eos_id: int | None,
        document_aware: bool,
        segments: Segments,
        layouts: dict[tuple[int, int], Layout] | None = None,
    ) -> None:
        self.files = list(files)
        self.seq_len = seq_len
        self.mode: Mode = mode
        self._stride = stride
        self.eos_id = eos_id
        self.document_aware = document_aware
        self._segments = segments
        # Shared by every with_seq_len view: a layout is computed once per window length.
        self._layouts = {} if layouts is None else layouts
        self._mapped: dict[int, tuple[np.ndarray, int]] = {}
        """file number -> (its mapped tokens, bytes touched through that mapping)."""

    def __getstate__(self) -> dict[str, Any]:
        # Mappings are per process: a pickled copy (a DataLoader worker) maps its own.
        return {**self.__dict__, "_mapped": {}}

    def _tokens_of(self, number: int, touching: int) -> np.ndarray:
        """File ``number``'s mapped tokens, about to be read over ``touching`` bytes."""
        array, touched = self._mapped.get(number, (None, 0))
        if array is None or touched >= REMAP_BYTES:
            self._mapped.pop(number, None)  # the old mapping is unmapped with its last view
            array, touched = self.files[number].mapped(), 0
        self._mapped[number] = (array, touched + touching)
        return array

    # --- the index space --------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Tokens in all files (a pass over the source reads this many)."""
        return int(sum(f.length for f in self.files))

    @property
    def stride(self) -> int:
        """Distance between consecutive window starts (``seq_len`` when sequential)."""
        if self.mode == "sequential":
            return self._require_seq_len()
        return self._stride

    @property
    def num_documents(self) -> int:
        """Documents (``document_aware``) or files."""
        return len(self._segments.start)

    @property
    def samples_per_pass(self) -> float:
        """Windows that read as many tokens as one pass over the files (``num_tokens /
        seq_len``): the length of an epoch in samples, whatever the mode and stride."""
        return self.num_tokens / self._require_seq_len()

    def tokens_per_sample(self, seq_len: int | None = None) -> int:
        """Input tokens of one sample at ``seq_len`` (default: this view's window length)."""
        return seq_len if seq_len is not None else self._require_seq_len()

    def _require_seq_len(self) -> int:
        if self.seq_len is None:
            raise DataError(
                "tokens: seq_len: the window length is not set; give the stage a seq_len "
                "(or the source an args.seq_len)"
            )
        return self.seq_len

    def _layout(self) -> Layout:
        seq_len, stride = self._require_seq_len(), self.stride
        key = (seq_len, stride)
        layout = self._layouts.get(key)
        if layout is None:
            layout = layout_of(self._segments, seq_len, stride)
            self._layouts[key] = layout
        return layout

    def __len__(self) -> int:
        return self._layout().size

    def with_seq_len(self, seq_len: int) -> TokenWindows:
        """The same files read as windows of ``seq_len + 1`` tokens.

        Raises:
            DataError: when no window of that length fits (``document_aware``: every
                document is shorter than ``seq_len + 1`` tokens).
        """
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise DataError(f"tokens: seq_len: expected a positive integer, got {seq_len!r}")
        if seq_len == self.seq_len:
            return self
        view = TokenWindows(
            self.files, seq_len=seq_len, mode=self.mode, stride=self._stride, eos_id=self.eos_id,
            document_aware=self.document_aware, segments=self._segments, layouts=self._layouts,
        )  # fmt: skip
        view._check_fits()
        return view

    def _check_fits(self) -> None:
        if len(self) > 0:
            return
        seq_len = self._require_seq_len()
        longest = int(self._segments.length.max())
        names = ", ".join(repr(f.path) for f in self.files[:3])
        more = f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
        if self.document_aware:
            raise DataError(
                f"tokens: seq_len: {seq_len} is longer than every document in {names}{more} "
                f"(the longest has {longest} tokens with its EOS; document_aware windows "
                f"need seq_len + 1 = {seq_len + 1} tokens inside one document)"
            )
        raise DataError(
            f"tokens: seq_len: {seq_len} needs {seq_len + 1} tokens per window, but "
            f"{names}{more} holds at most {longest}"
        )

    def window_starts(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(file number, start position)`` of each window in ``indices``."""
        layout = self._layout()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= layout.size):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise IndexError(f"window {bad} outside the source's {layout.size} windows")
        k = np.searchsorted(layout.cum_end, idx, side="right")
        local = idx - (layout.cum_end[k] - layout.count[k])
        return layout.file[k], layout.start[k] + local * self.stride

    # --- reading ----------------------------------------------------------------------

    def windows(self, indices: np.ndarray) -> np.ndarray:
        """The raw windows (``[len(indices), seq_len + 1]``, int64) at ``indices``."""
        span = self._require_seq_len() + 1
        files, starts = self.window_starts(indices)
        out = np.empty((len(starts), span), dtype=np.int64)
        for f in np.unique(files):
            mapped_per_window = span * np.dtype(self.files[int(f)].dtype).itemsize
            mapped_per_window += 2 * _FAULT_AROUND
            rows = np.flatnonzero(files == f) if len(self.files) > 1 else slice(None)
            count = len(starts) if isinstance(rows, slice) else len(rows)
            mapped = self._tokens_of(int(f), count * mapped_per_window)
            # A strided view of every window: indexing copies just the rows asked for.
            view = np.lib.stride_tricks.sliding_window_view(mapped, span)
            out[rows] = view[starts[rows]]
        return out

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``: each ``[len(indices), seq_len]`` int64, targets shifted by one."""
        windows = torch.from_numpy(self.windows(indices))
        return windows[:, :-1], windows[:, 1:]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.get_batch(np.array([index], dtype=np.int64))
        return inputs[0], targets[0]

    # --- checks -----------------------------------------------------------------------

    def max_token_id(self, *, exhaustive: bool = False) -> tuple[int, str, int]:
        """``(largest id, file, position)`` over every token of small files and of files whose
        sidecar records it, else over evenly spread chunks (all tokens when ``exhaustive``)."""
        return largest_token_id(self.files, exhaustive=exhaustive)

    def check_vocab(self, vocab_size: int, *, field: str = "tokens: args.vocab_size") -> None:
        """Raise when a token id (sampled as in :meth:`max_token_id`) is >= ``vocab_size``."""
        largest, path, position = self.max_token_id()
        if largest >= vocab_size:
            where = f" at position {position:,}" if position >= 0 else " (per its sidecar)"
            raise DataError(
                f"{field}: {path!r} holds token id {largest}{where}, but the model's vocabulary "
                f"has {vocab_size} ids (0..{vocab_size - 1})"
            )

    def describe(self) -> dict[str, Any]:
        """Sizes for logs and the plan: tokens, windows, documents, tokens no window reads."""
        layout = self._layout()
        span = self._require_seq_len() + 1
        # Tokens inside some window of each segment (windows may overlap or leave gaps).
        covered = np.minimum(layout.count * span, (layout.count - 1) * self.stride + span)
        return {
            "files": len(self.files),
            "num_tokens": self.num_tokens,
            "windows": layout.size,
            "segments": self.num_documents,
            "seq_len": self.seq_len,
            "mode": self.mode,
            "stride": self.stride,
            "unread_tokens": int(self.num_tokens - covered.sum()),
        }

    def __repr__(self) -> str:
        return (
            f"TokenWindows({len(self.files)} files, {self.num_tokens:,} tokens, "
            f"seq_len={self.seq_len}, mode={self.mode!r})"
        )


def tokens_source(
    *,
    files: str | Sequence[str],
    dtype: str | None = None,
    seq_len: int | None = None,
    mode: Mode = "random",
    stride: int | None = None,
    eos_id: int | None = None,
    document_aware: bool = False,
    vocab_size: int | None = None,
) -> TokenWindows:
    """The ``tokens`` source: windows over token files (see the module docstring).

    Args:
        files: a path, a glob pattern, or a list of them (``.bin`` or ``.npy``).
        dtype: item type of raw ``.bin`` files (``uint16``...); read from the sidecar
            that ``stagetrain prepare`` writes when omitted.
        seq_len: window length (inputs per sample). The stage's ``seq_len`` takes over
            through :meth:`TokenWindows.with_seq_len` once the curriculum passes it.
        mode: ``random`` (a window at every ``stride`` tokens) or ``sequential``
            (non-overlapping windows: one epoch is one pass over the tokens).
        stride: ``random`` only; default 1 (every start position).
        eos_id: the end-of-document token (default: the sidecar's).
        document_aware: no window crosses a document boundary (needs ``eos_id``).
        vocab_size: when given, token ids are checked against it before training.

    Raises:
        DataError: naming the argument and the file on any bad input.
    """
    if mode not in ("random", "sequential"):
        raise DataError(f"tokens: args.mode: expected 'random' or 'sequential', got {mode!r}")
    if stride is not None and mode != "random":
        raise DataError("tokens: args.stride: only for mode 'random' (sequential uses seq_len)")
    if stride is not None and (not isinstance(stride, int) or stride < 1):
        raise DataError(f"tokens: args.stride: expected a positive integer, got {stride!r}")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
        raise DataError(f"tokens: args.seq_len: expected a positive integer, got {seq_len!r}")
    paths = expand_files(files, field="tokens: args.files")
    opened = [
        open_token_file(
            p, dtype=dtype, field=f"tokens: args.files[{i}]", dtype_field="tokens: args.dtype"
        )
        for i, p in enumerate(paths)
    ]
    if eos_id is None:
        recorded: set[int] = set()
        for f in opened:
            value = (read_sidecar(f.path) or {}).get("eos_id")
            if value is not None:
                recorded.add(int(value))
        if len(recorded) > 1:
            raise DataError(
                f"tokens: args.eos_id: the files' sidecars disagree: {sorted(recorded)}"
            )
        eos_id = recorded.pop() if recorded else None
    if document_aware and eos_id is None:
        raise DataError("tokens: args.document_aware: needs an eos_id (none given or in a sidecar)")
    segments = segments_of(opened, eos_id=eos_id, document_aware=document_aware)
    data = TokenWindows(
        opened, seq_len=seq_len, mode=mode, stride=stride or 1, eos_id=eos_id,
        document_aware=document_aware, segments=segments,
    )  # fmt: skip
    if seq_len is not None:
        data._check_fits()
    if vocab_size is not None:
        data.check_vocab(vocab_size)
    return data

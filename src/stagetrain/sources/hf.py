"""The ``hf`` source: a Hugging Face ``datasets`` dataset from local files.

Where the data comes from (exactly one):

* ``path``: a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (``split`` picks the split of a ``DatasetDict``);
* ``data_files``: local ``.jsonl``/``.json``, ``.parquet``, ``.csv`` or ``.txt`` files (a
  path, a glob or a list), read by ``load_dataset(format, data_files=...)``; ``format``
  is inferred from the first file's suffix unless given.

What a sample is:

* ``columns`` (no tokenizer): columns of fixed-size values mapped to the batch.
  ``{inputs: x, targets: y}`` gives ``(inputs, targets)`` pairs; any other keys give dict
  batches, e.g. ``{input_ids: ids, labels: labels}``.
* ``tokenizer`` + ``text_column``: the text is tokenized once (a local ``tokenizer.json``,
  a ``transformers`` tokenizer directory, or ``bytes``) and cached on disk, then
  - ``layout: pack`` (default): documents concatenated, each followed by the EOS id,
    and read as :class:`~stagetrain.sources.tokens.TokenWindows` of ``seq_len + 1``
    tokens (``mode``, ``stride`` and ``document_aware`` as for the ``tokens`` source);
  - ``layout: pad``: one document per sample, cut to ``seq_len`` and padded: dict items
    ``input_ids``, ``attention_mask`` and ``labels`` (the ids, ``-100`` on padding).

The tokenization cache lives in ``$STAGETRAIN_CACHE/tokenized`` (default
``~/.cache/stagetrain/tokenized``) or ``cache_dir``, one directory per key: the SHA-256 of
the data (every data file's content, or a saved dataset's fingerprint), the split, the
tokenizer's files, the text column and the EOS id. A second run with the same key reads
the cached token file and never calls the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from stagetrain.errors import DataError
from stagetrain.sources.hashing import settings_hash, sha256_file
from stagetrain.sources.prepare import matches, resolve_eos, tokenize_documents
from stagetrain.sources.tokenizer import load_tokenizer
from stagetrain.sources.tokens import (
    Mode,
    TokenFile,
    TokenWindows,
    expand_files,
    open_token_file,
    read_sidecar,
    tokens_source,
)

CACHE_VERSION = 1
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def default_cache_root() -> Path:
    """``$STAGETRAIN_CACHE/tokenized``, or ``~/.cache/stagetrain/tokenized``."""
    env = os.environ.get("STAGETRAIN_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "stagetrain"
    return base / "tokenized"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "hf: the 'hf' source needs the 'datasets' package: pip install 'stagetrain[hf]'"
        ) from None
    return datasets


def load_local_dataset(
    *,
    path: str | None,
    data_files: str | Sequence[str] | None,
    format: str | None,
    split: str,
) -> tuple[Any, dict[str, Any], str]:
    """``(dataset, identity for cache keys, label for messages)`` of local data.

    Raises:
        DataError: naming the argument when the data is missing or cannot be read.
    """
    if (path is None) == (data_files is None):
        raise DataError("hf: args: give exactly one of 'path' (a saved dataset) or 'data_files'")
    datasets = _datasets()
    if path is not None:
        if not Path(path).is_dir():
            raise DataError(f"hf: args.path: {path!r} is not a directory written by save_to_disk")
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as exc:  # datasets raises assorted types for a bad directory
            raise DataError(f"hf: args.path: cannot load {path!r} ({_first_line(exc)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"hf: args.split: {path!r} has no split {split!r} (splits: {list(loaded)})"
                )
            loaded = loaded[split]
        return loaded, {"fingerprint": loaded._fingerprint, "split": split}, path
    files = expand_files(data_files or [], field="hf: args.data_files")
    for i, file in enumerate(files):
        if not Path(file).is_file():
            raise DataError(f"hf: args.data_files[{i}]: {file!r} not found")
    builder = format or FORMATS.get(Path(files[0]).suffix)
    if builder not in ("json", "parquet", "csv", "text"):
        raise DataError(
            f"hf: args.format: cannot tell the format of {files[0]!r}; "
            "give format: json, parquet, csv or text"
        )
    try:
        loaded = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as exc:  # as above
        raise DataError(
            f"hf: args.data_files: cannot read {files[0]!r} as {builder} ({_first_line(exc)})"
        ) from None
    identity = {"format": builder, "files": [sha256_file(Path(f)) for f in files]}
    return loaded, identity, files[0]


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _check_column(dataset: Any, column: str, *, field: str, label: str) -> None:
    if column not in dataset.column_names:
        raise DataError(
            f"hf: {field}: no column {column!r} in {label!r} (columns: {dataset.column_names})"
        )


class ColumnDataset:
    """Rows of a ``datasets.Dataset`` as ``(inputs, targets)`` pairs or dict batches."""

    def __init__(self, dataset: Any, columns: dict[str, str], label: str) -> None:
        if not columns:
            raise DataError("hf: args.columns: map at least one batch key to a column")
        for key, column in columns.items():
            _check_column(dataset, column, field=f"args.columns.{key}", label=label)
        self.columns = dict(columns)
        self.label = label
        self.pair = set(columns) == {"inputs", "targets"}
        self.dataset = dataset.with_format("torch", columns=sorted(set(columns.values())))

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices: np.ndarray) -> Any:
        """The rows at ``indices`` (pairs or a dict of tensors, batch first)."""
        rows = self.dataset[[int(i) for i in np.asarray(indices).reshape(-1)]]
        out: dict[str, torch.Tensor] = {}
        for key, column in self.columns.items():
            value = rows[column]
            if not isinstance(value, torch.Tensor):
                raise DataError(
                    f"hf: args.columns.{key}: column {column!r} of {self.label!r} holds rows of "
                    "different lengths or non-numeric values; tokenize text with "
                    "tokenizer + layout: pad instead"
                )
            out[key] = value
        if self.pair:
            return out["inputs"], out["targets"]
        return out

    def __getitem__(self, index: int) -> Any:
        batch = self.get_batch(np.array([index]))
        if self.pair:
            return batch[0][0], batch[1][0]
        return {k: v[0] for k, v in batch.items()}


class PaddedDocuments:
    """One tokenized document per sample, cut to ``seq_len`` and padded to it.

    Items are dicts: ``input_ids`` (pad id after the document), ``attention_mask`` (1 on
    the document) and ``labels`` (the ids, ``-100`` on padding: a causal LM shifts them).
    """

    def __init__(
        self, file: TokenFile, starts: np.ndarray, *, seq_len: int | None, pad_id: int
    ) -> None:
        self.file = file
        self.starts = starts
        self.seq_len = seq_len
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.starts) - 1

    def with_seq_len(self, seq_len: int) -> PaddedDocuments:
        """The same documents cut and padded to ``seq_len``."""
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"hf: seq_len: expected a positive integer, got {seq_len!r}")
        return PaddedDocuments(self.file, self.starts, seq_len=seq_len, pad_id=self.pad_id)

    def _length(self) -> int:
        if self.seq_len is None:
            raise DataError(
                "hf: seq_len: layout pad needs a length; give the stage a seq_len "
                "(or the source an args.seq_len)"
            )
        return self.seq_len

    def tokens_per_sample(self, seq_len: int | None = None) -> float:
        """Mean unpadded tokens per sample at ``seq_len`` (for token-share mixtures)."""
        length = seq_len if seq_len is not None else self._length()
        return float(np.minimum(np.diff(self.starts), length).mean())

    def get_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        length = self._length()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"document index outside the source's {len(self)} documents")
        begin = self.starts[idx]
        size = np.minimum(self.starts[idx + 1] - begin, length)
        positions = np.arange(length)
        mask = positions[None, :] < size[:, None]
        mapped = self.file.mapped()
        gathered = mapped[np.where(mask, begin[:, None] + positions[None, :], 0)].astype(np.int64)
        del mapped  # see tokens.py: no mapping outlives the batch
        ids = np.where(mask, gathered, self.pad_id)
        labels = np.where(mask, gathered, -100)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(labels),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch(np.array([index])).items()}

    def check_vocab(self, vocab_size: int, *, field: str = "hf: args.vocab_size") -> None:
        """Raise when a token id of the cached file is >= ``vocab_size``."""
        largest = self.file.max_token_id
        if largest is None:
            largest = max(int(self.file.read(s, 1 << 22).max()) for s in
                          range(0, self.file.length, 1 << 22))  # fmt: skip
        if largest >= vocab_size:
            raise DataError(
                f"{field}: the tokenized data ({self.file.path!r}) holds token id {largest}, but "
                f"the model's vocabulary has {vocab_size} ids"
            )


def _texts(dataset: Any, column: str) -> Iterator[str]:
    for start in range(0, len(dataset), 1024):
        for text in dataset[start : start + 1024][column]:
            yield text if isinstance(text, str) else ("" if text is None else str(text))


def tokenized_file(
    dataset: Any,
    identity: dict[str, Any],
    label: str,
    *,
    tokenizer: str,
    text_column: str,
    eos_id: str | int | None,
    cache_dir: str | Path | None,
    workers: int,
    progress: bool,
) -> tuple[Path, dict[str, Any]]:
    """The cached token file of ``dataset``'s ``text_column`` (tokenized now if missing)."""
    _check_column(dataset, text_column, field="args.text_column", label=label)
    tok = load_tokenizer(tokenizer, field="hf: args.tokenizer")
    eos = resolve_eos(eos_id, tok, field="hf: args.eos_id")
    request = {
        "cache_version": CACHE_VERSION,
        "data": identity,
        "tokenizer": {"spec": str(tokenizer), "sha256": tok.fingerprint},
        "text_column": text_column,
        "eos_id": eos,
        "pad_id": tok.pad_id,
    }
    key = settings_hash({**request, "tokenizer": tok.fingerprint})[:32]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_root()
    out = directory / key / "tokens.bin"
    side = read_sidecar(out)
    if side is not None and matches(side, request) and out.with_suffix(".docs.npy").is_file():
        return out, side
    side = tokenize_documents(
        _texts(dataset, text_column), tok, out, eos_id=eos, request=request, workers=workers,
        progress=progress, total=len(dataset), offsets=True, desc=f"tokenizing {Path(label).name}",
    )  # fmt: skip
    return out, side


def hf_source(
    *,
    path: str | None = None,
    data_files: str | Sequence[str] | None = None,
    format: str | None = None,
    split: str = "train",
    columns: dict[str, str] | None = None,
    tokenizer: str | None = None,
    text_column: str = "text",
    layout: Literal["pack", "pad"] = "pack",
    seq_len: int | None = None,
    mode: Mode = "sequential",
    stride: int | None = None,
    document_aware: bool = False,
    eos_id: str | int | None = "auto",
    pad_id: int | None = None,
    vocab_size: int | None = None,
    cache_dir: str | None = None,
    workers: int = 1,
    progress: bool = True,
) -> Any:
    """The ``hf`` source (see the module docstring for every argument's role).

    Raises:
        DataError: naming the argument (and file) on missing data, a missing column, a
            tokenizer that cannot be loaded, or token ids outside ``vocab_size``.
    """
    if layout not in ("pack", "pad"):
        raise DataError(f"hf: args.layout: expected 'pack' or 'pad', got {layout!r}")
    dataset, identity, label = load_local_dataset(
        path=path, data_files=data_files, format=format, split=split
    )
    if tokenizer is None:
        if columns is None:
            raise DataError(
                "hf: args: give 'columns' (a mapping to the batch) or a 'tokenizer' for the "
                f"text in {text_column!r}"
            )
        data: Any = ColumnDataset(dataset, columns, label)
        if vocab_size is not None:
            from stagetrain.sources.tokens import check_token_ids

            check_token_ids(data, vocab_size, field="hf: args.vocab_size")
        return data
    if columns is not None:
        raise DataError("hf: args.columns: not used with a tokenizer (it reads text_column)")
    file, side = tokenized_file(
        dataset, identity, label, tokenizer=tokenizer, text_column=text_column, eos_id=eos_id,
        cache_dir=cache_dir, workers=workers, progress=progress,
    )  # fmt: skip
    if layout == "pack":
        windows: TokenWindows = tokens_source(
            files=str(file), seq_len=seq_len, mode=mode, stride=stride, eos_id=side["eos_id"],
            document_aware=document_aware,
        )  # fmt: skip
        if vocab_size is not None:
            windows.check_vocab(vocab_size, field="hf: args.vocab_size")
        return windows
    if pad_id is None:
        pad_id = next((p for p in (side.get("pad_id"), side["eos_id"]) if p is not None), 0)
    starts = np.load(file.with_suffix(".docs.npy"))
    padded = PaddedDocuments(
        open_token_file(str(file), dtype=None, field="hf: cache"), starts,
        seq_len=seq_len, pad_id=int(pad_id),
    )  # fmt: skip
    if vocab_size is not None:
        padded.check_vocab(vocab_size)
    return padded

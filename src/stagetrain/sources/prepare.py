"""``stagetrain prepare``: text, JSONL or a Hugging Face dataset -> a token file + sidecar.

Output, for ``--out data/train.bin``::

    data/train.bin    the token ids of every document, in input order, each document
                      followed by the EOS id (when there is one); dtype from the
                      vocabulary size (uint8 <= 256, uint16 <= 65,536, else uint32)
    data/train.json   the sidecar: dtype, token and document counts, largest id, eos_id,
                      the tokenizer (path and SHA-256) and every input (path and SHA-256)

Inputs, by kind (``--format auto`` tells them apart by their names):

* a text file: the whole file is one document (decoded as UTF-8; undecodable bytes kept
  byte for byte through ``surrogateescape``);
* ``.jsonl`` / ``.json`` (JSON Lines): one document per line, its ``--text-field``;
* ``.parquet`` or a directory written by ``Dataset.save_to_disk``: one document per
  row, its ``--text-field`` (needs the ``datasets`` package: ``stagetrain[hf]``).

Documents are tokenized by a pool of worker processes in chunks; chunks are written in
input order, so the file is the same for any number of workers. Everything is written
under temporary names and renamed when complete (the sidecar last), so an interrupted
run never leaves a partial file under the final name. A rerun whose inputs, tokenizer
and settings match the sidecar does nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stagetrain.atomic import make_shareable
from stagetrain.checkpoint import atomic_write_text
from stagetrain.errors import DataError
from stagetrain.sources.hashing import sha256_path
from stagetrain.sources.tokenizer import Tokenizer, dtype_for_vocab, load_tokenizer
from stagetrain.sources.tokens import SIDECAR_FORMAT, read_sidecar, sidecar_path

SIDECAR_VERSION = 1
CHUNK_CHARS = 1 << 20
CHUNK_DOCS = 512
"""A chunk (one task of a worker) holds documents up to about this many characters or docs."""


# --- reading documents ------------------------------------------------------------------


def input_kind(path: Path, fmt: str = "auto") -> str:
    """``text``, ``jsonl`` or ``hf`` for ``path`` (``fmt`` other than ``auto`` wins)."""
    if fmt != "auto":
        if fmt not in ("text", "jsonl", "hf"):
            raise DataError(f"--format: expected auto, text, jsonl or hf, got {fmt!r}")
        return fmt
    if path.is_dir() or path.suffix == ".parquet":
        return "hf"
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    return "text"


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"--text-field: {path}:{number} has no field {text_field!r} (has {keys})"
                )
            value = record[text_field]
            if not isinstance(value, str):
                raise DataError(
                    f"--text-field: {path}:{number}: {text_field!r} is "
                    f"{type(value).__name__}, not text"
                )
            yield value


def load_hf_dataset(path: Path, *, field: str = "input") -> Any:
    """A saved ``datasets`` directory or a Parquet file as a ``Dataset`` (first split)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{field}: reading {path} needs the 'datasets' package: pip install 'stagetrain[hf]'"
        ) from None
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable input
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{field}: cannot read {path} as a Hugging Face dataset ({first})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[next(iter(loaded))]
    return loaded


def _hf_documents(path: Path, text_field: str) -> Iterator[str]:
    data = load_hf_dataset(path)
    if text_field not in data.column_names:
        raise DataError(
            f"--text-field: {path} has no column {text_field!r} (columns: {data.column_names})"
        )
    for start in range(0, len(data), 1024):
        yield from data[start : start + 1024][text_field]


def iter_documents(inputs: Sequence[Path], fmt: str, text_field: str) -> Iterator[str]:
    """Every document of ``inputs``, in order."""
    for path in inputs:
        kind = input_kind(path, fmt)
        if kind == "text":
            yield path.read_text(encoding="utf-8", errors="surrogateescape")
        elif kind == "jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield from _hf_documents(path, text_field)


def count_documents(inputs: Sequence[Path], fmt: str) -> int | None:
    """Documents in ``inputs`` when cheap to know (text files, JSON Lines), else None."""
    total = 0
    for path in inputs:
        kind = input_kind(path, fmt)
        if kind == "text":
            total += 1
        elif kind == "jsonl":
            with path.open("rb") as f:
                total += sum(1 for line in f if line.strip())
        else:
            return None
    return total


def _fingerprint(path: Path, kind: str) -> str:
    if kind == "hf" and path.is_dir():
        # A saved dataset's own fingerprint changes with its content and history.
        return "hf-fingerprint:" + str(getattr(load_hf_dataset(path), "_fingerprint", "none"))
    return sha256_path(path)


# --- tokenizing in worker processes -----------------------------------------------------


@dataclass(frozen=True)
class _Job:
    spec: str
    dtype: str
    eos_id: int | None


_WORKER: dict[str, Any] = {}
"""The tokenizer of this worker process (set once by the pool initializer)."""


def _init_worker(spec: str) -> None:
    _WORKER["tokenizer"] = load_tokenizer(spec)


def _encode(tokenizer: Tokenizer, texts: list[str], job: _Job) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer.encode_batch(texts)
    if job.eos_id is not None:
        ids = [[*doc, job.eos_id] for doc in ids]
    lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for doc in ids for t in doc), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _encode_in_worker(args: tuple[list[str], _Job]) -> tuple[np.ndarray, np.ndarray]:
    texts, job = args
    return _encode(_WORKER["tokenizer"], texts, job)


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(
    documents: Iterable[str], tokenizer: Tokenizer, job: _Job, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """``(tokens, lengths, documents)`` per chunk, in input order."""
    if workers <= 1:
        for chunk in _chunks(documents):
            yield (*_encode(tokenizer, chunk, job), len(chunk))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pending: list[list[str]] = []
    # Rounds of a few chunks per worker: ordered results, and memory bounded by the round
    # (Pool.imap would read the whole input ahead of the workers).
    with context.Pool(workers, initializer=_init_worker, initargs=(job.spec,)) as pool:
        for chunk in _chunks(documents):
            pending.append(chunk)
            if len(pending) == 4 * workers:
                for (tokens, lengths), texts in zip(
                    pool.map(_encode_in_worker, [(c, job) for c in pending]), pending, strict=True
                ):
                    yield tokens, lengths, len(texts)
                pending = []
        if pending:
            for (tokens, lengths), texts in zip(
                pool.map(_encode_in_worker, [(c, job) for c in pending]), pending, strict=True
            ):
                yield tokens, lengths, len(texts)


def _temp_path(final: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    make_shareable(Path(name))
    return Path(name)


def tokenize_documents(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out: Path,
    *,
    eos_id: int | None,
    request: dict[str, Any],
    workers: int = 1,
    progress: bool = True,
    total: int | None = None,
    offsets: bool = False,
    desc: str = "tokenizing",
) -> dict[str, Any]:
    """Tokenize ``documents`` into the token file ``out`` and its sidecar; returns the sidecar.

    The sidecar holds the file's dtype and counts plus every key of ``request`` (what
    the file was made from: inputs, tokenizer, settings), which a rerun compares.

    With ``offsets``, ``out.with_suffix(".docs.npy")`` receives the start of every
    document (int64, one more entry than documents). All files appear at once, the
    sidecar last; nothing is left under a final name if this fails.
    """
    from tqdm.auto import tqdm

    dtype = dtype_for_vocab(tokenizer.vocab_size)
    job = _Job(tokenizer.spec, dtype, eos_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    temps = [_temp_path(out)]
    starts: list[np.ndarray] = []
    num_tokens = num_docs = 0
    largest = -1
    try:
        with (
            temps[0].open("wb") as f,
            tqdm(total=total, desc=desc, unit="doc", disable=not progress, leave=False) as bar,
        ):
            for tokens, lengths, n in _encoded_chunks(documents, tokenizer, job, workers):
                if tokens.size:
                    largest = max(largest, int(tokens.max()))
                    f.write(tokens.astype(dtype).tobytes())
                if offsets:
                    starts.append(num_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]]))
                num_tokens += int(lengths.sum())
                num_docs += n
                bar.update(n)
            f.flush()
            os.fsync(f.fileno())
        if num_tokens == 0:
            raise DataError(f"{desc}: the inputs hold no text (0 tokens) for {out}")
        sidecar = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "dtype": dtype,
            "num_tokens": num_tokens,
            "num_documents": num_docs,
            "eos_id": eos_id,
            "max_token_id": largest,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": {"spec": tokenizer.spec, "sha256": tokenizer.fingerprint},
            **request,
        }
        docs_path = out.with_suffix(".docs.npy")
        if offsets:
            temps.append(_temp_path(docs_path))
            table = np.concatenate([*starts, [num_tokens]]).astype(np.int64)
            with temps[1].open("wb") as g:
                np.save(g, table)
        # An old sidecar must not vouch for a new file: remove it before the renames.
        sidecar_path(out).unlink(missing_ok=True)
        if offsets:
            os.replace(temps[1], docs_path)
        os.replace(temps[0], out)
        atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=1) + "\n")
        return sidecar
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


# --- the command ------------------------------------------------------------------------


def matches(sidecar: dict[str, Any], request: dict[str, Any]) -> bool:
    """Whether ``sidecar`` was written for exactly ``request`` (inputs, tokenizer, settings)."""
    return all(sidecar.get(key) == value for key, value in request.items())


@dataclass
class PrepareResult:
    """What :func:`prepare` did: ``skipped`` when the output was already up to date."""

    out: Path
    sidecar: dict[str, Any]
    skipped: bool

    def line(self) -> str:
        s = self.sidecar
        what = "up to date" if self.skipped else "wrote"
        return (
            f"{what} {self.out}: {s['num_tokens']:,} tokens ({s['dtype']}), "
            f"{s['num_documents']:,} documents, eos_id {s['eos_id']}, "
            f"largest id {s['max_token_id']}"
        )


def resolve_eos(
    eos: str | int | None, tokenizer: Tokenizer, *, field: str = "--eos-id"
) -> int | None:
    """``auto`` (the tokenizer's EOS, if any), ``none``, or an id below the vocabulary size."""
    if eos is None or eos == "auto":
        return tokenizer.eos_id
    if eos == "none":
        return None
    try:
        value = int(eos)
    except (TypeError, ValueError):
        raise DataError(f"{field}: expected auto, none or a token id, got {eos!r}") from None
    if not 0 <= value < tokenizer.vocab_size:
        raise DataError(f"{field}: {value} is outside the tokenizer's {tokenizer.vocab_size} ids")
    return value


def read_file_list(path: Path) -> list[Path]:
    """Paths listed one per line in ``path`` (``--files-from``; blank lines and # skipped)."""
    if not path.is_file():
        raise DataError(f"--files-from: {path} not found")
    lines = [x.strip() for x in path.read_text().splitlines()]
    return [Path(x) for x in lines if x and not x.startswith("#")]


def prepare(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    tokenizer: str = "bytes",
    fmt: str = "auto",
    text_field: str = "text",
    eos_id: str | int | None = "auto",
    workers: int = 1,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize ``inputs`` into the token file ``out`` (see the module docstring).

    Raises:
        DataError: naming the option or file on a missing input, a tokenizer that cannot be
            loaded, a missing text field, or an output name not ending in ``.bin``.
    """
    out = Path(out)
    if out.suffix != ".bin":
        raise DataError(f"--out: the token file's name must end in .bin, got {str(out)!r}")
    if workers < 1:
        raise DataError(f"--workers: need at least 1, got {workers}")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("inputs: give at least one input file (or --files-from)")
    for path in paths:
        if not path.exists():
            raise DataError(f"inputs: {path} not found")
    tok = load_tokenizer(tokenizer, field="--tokenizer")
    eos = resolve_eos(eos_id, tok)
    kinds = [input_kind(p, fmt) for p in paths]
    request = {
        "inputs": [
            {"path": str(p.resolve()), "kind": k, "sha256": _fingerprint(p, k)}
            for p, k in zip(paths, kinds, strict=True)
        ],
        "tokenizer": {"spec": str(tokenizer), "sha256": tok.fingerprint},
        "text_field": text_field if any(k != "text" for k in kinds) else None,
        "eos_id": eos,
    }
    existing = read_sidecar(out)
    if existing is not None and matches(existing, request) and out.is_file():
        item = np.dtype(existing["dtype"]).itemsize
        if out.stat().st_size == existing["num_tokens"] * item:
            return PrepareResult(out, existing, skipped=True)
    sidecar = tokenize_documents(
        iter_documents(paths, fmt, text_field),
        tok,
        out,
        eos_id=eos,
        request=request,
        workers=workers,
        progress=progress,
        total=count_documents(paths, fmt),
        desc=f"prepare {out.name}",
    )
    return PrepareResult(out, sidecar, skipped=False)

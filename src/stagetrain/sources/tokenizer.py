"""Local tokenizers behind one small interface: encode a batch of texts to id lists.

A tokenizer is named by a *spec* string:

=============================== ==========================================================
spec                            tokenizer
=============================== ==========================================================
``bytes``                       the UTF-8 bytes of the text (vocabulary 256, no EOS)
``path/tokenizer.json``         a ``tokenizers`` file (the fast-tokenizer format)
``path/dir``                    a ``transformers`` tokenizer directory (``from_pretrained``
                                with ``local_files_only``), or a directory holding only a
                                ``tokenizer.json``
=============================== ==========================================================

Texts are encoded without the tokenizer's own special tokens (no BOS/CLS template):
document boundaries are marked by appending ``eos_id`` where the caller asks for it.
The ``fingerprint`` is a hash of the tokenizer's files, used in cache keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from stagetrain.errors import DataError
from stagetrain.sources.hashing import sha256_path

EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
"""Special tokens taken as the end-of-document token when the tokenizer names none."""


class Tokenizer(Protocol):
    """What preparation and the ``hf`` source need of a tokenizer."""

    spec: str
    vocab_size: int
    eos_id: int | None
    pad_id: int | None
    fingerprint: str

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """Tokens are the UTF-8 bytes of the text (ids 0..255)."""

    spec = "bytes"
    vocab_size = 256
    eos_id: int | None = None
    pad_id: int | None = None
    fingerprint = "bytes-utf8"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # surrogateescape: text read with that error handler comes back byte for byte.
        return [list(t.encode("utf-8", "surrogateescape")) for t in texts]


class JsonTokenizer:
    """A ``tokenizers`` ``tokenizer.json``."""

    def __init__(self, path: Path, spec: str) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        self.spec = spec
        self._tok = FastTokenizer.from_file(str(path))
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = _first_id(self._tok.token_to_id, EOS_NAMES)
        self.pad_id = _first_id(self._tok.token_to_id, ("<pad>", "[PAD]", "<|pad|>"))
        self.fingerprint = sha256_path(path)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]


class TransformersTokenizer:
    """A local ``transformers`` tokenizer directory (never downloaded)."""

    def __init__(self, path: Path, spec: str) -> None:
        from transformers import AutoTokenizer

        self.spec = spec
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        self.eos_id = int(eos) if eos is not None else _first_id(self._id_of, EOS_NAMES)
        pad = self._tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else None
        self.fingerprint = sha256_path(path)

    def _id_of(self, token: str) -> int | None:
        value = self._tok.convert_tokens_to_ids(token)
        if not isinstance(value, int) or value == self._tok.unk_token_id:
            return None
        return value

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in out]


def _first_id(lookup: Any, names: Sequence[str]) -> int | None:
    for name in names:
        value = lookup(name)
        if value is not None:
            return int(value)
    return None


def load_tokenizer(spec: str | Path, *, field: str = "tokenizer") -> Tokenizer:
    """The tokenizer named by ``spec`` (see the module docstring).

    Raises:
        DataError: naming ``field`` when the path does not exist or cannot be loaded.
    """
    text = str(spec)
    if text == "bytes":
        return ByteTokenizer()
    path = Path(text)
    if not path.exists():
        raise DataError(
            f"{field}: {text!r} not found (a tokenizer.json, a tokenizer directory, or 'bytes')"
        )
    try:
        if path.is_file():
            return JsonTokenizer(path, text)
        if (path / "tokenizer_config.json").is_file():
            return TransformersTokenizer(path, text)
        if (path / "tokenizer.json").is_file():
            return JsonTokenizer(path / "tokenizer.json", text)
    except Exception as exc:  # both libraries raise assorted types for a bad file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{field}: cannot load the tokenizer {text!r} ({first})") from None
    raise DataError(f"{field}: {text!r} holds no tokenizer.json or tokenizer_config.json")


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest unsigned dtype holding ids ``0 .. vocab_size - 1``."""
    if vocab_size <= 1 << 8:
        return "uint8"
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    return "uint64"

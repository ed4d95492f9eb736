"""Content hashes for cache keys and sidecars: files, directories, settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stagetrain.checkpoint import sha256_file


def sha256_tree(directory: Path) -> str:
    """SHA-256 over every regular file under ``directory`` (relative names and contents),
    in sorted order, so that the same files give the same hash wherever they live."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """:func:`sha256_file` for a file, :func:`sha256_tree` for a directory."""
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def settings_hash(settings: Any) -> str:
    """SHA-256 of the canonical JSON of ``settings`` (sorted keys, no whitespace)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["settings_hash", "sha256_file", "sha256_path", "sha256_tree"]

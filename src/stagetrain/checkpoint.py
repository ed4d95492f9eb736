"""Checkpoints: written atomically, verified before use, loaded without running code.

Layout inside a run directory::

    checkpoints/
      ckpt-00000500.pt      # torch.save of plain tensors, numbers, strings, lists, dicts
      manifest.json         # newest last: file, step, stage, sha256

A checkpoint file is written to a temporary name, flushed to disk and renamed; the
manifest is updated the same way only afterwards. A kill at any moment leaves either
the old or the new manifest, and every file the manifest names is complete. Resume
verifies the SHA-256 of the newest entry and falls back to an older one (saying so)
if it does not match. Loading uses ``torch.load(weights_only=True)``, which refuses
pickled code; such a file is reported as unsafe.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagetrain.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file through ``write(fileobj)`` to a temp name, fsync, then rename over ``path``.

    The rename is atomic on POSIX, so readers see either the old or the new file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file private (0600); give it the usual umask-derived mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` for text (UTF-8)."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Global RNG states of torch, CUDA, NumPy and Python, as weights-only-loadable values."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class ManifestEntry:
    file: str
    step: int
    stage: str
    sha256: str


class CheckpointStore:
    """The checkpoints of one run directory: save, list, verify, load, prune.

    Args:
        directory: where checkpoint files and the manifest live.
        keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def entries(self) -> list[ManifestEntry]:
        """Manifest entries, oldest first; an unreadable manifest is an error."""
        if not self.manifest_path.exists():
            return []
        try:
            raw = json.loads(self.manifest_path.read_text())
            return [ManifestEntry(**e) for e in raw["checkpoints"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.manifest_path}: corrupted manifest ({exc})") from None

    def save(self, payload: dict[str, Any], *, step: int, stage: str) -> Path:
        """Write ``payload`` as the newest checkpoint and prune old ones."""
        payload = {"format": FORMAT_VERSION, **payload}
        path = self.directory / f"ckpt-{step:08d}.pt"
        atomic_write(path, lambda f: torch.save(payload, f))
        entry = ManifestEntry(path.name, step, stage, sha256_file(path))
        entries = [e for e in self.entries() if e.file != path.name] + [entry]
        stale, kept = entries[: -self.keep], entries[-self.keep :]
        manifest = {"checkpoints": [e.__dict__ for e in kept]}
        atomic_write(self.manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        for old in stale:
            (self.directory / old.file).unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[dict[str, Any], ManifestEntry]:
        """The newest checkpoint that passes its checksum, warning about any skipped.

        Raises:
            CheckpointError: when there is no checkpoint, or none is intact.
        """
        entries = self.entries()
        if not entries:
            raise CheckpointError(f"{self.directory}: no checkpoint to resume from")
        problems = []
        for entry in reversed(entries):
            path = self.directory / entry.file
            if not path.exists():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != entry.sha256:
                problems.append(f"{path}: checksum mismatch (corrupted)")
            else:
                if problems:
                    warnings.warn(
                        "skipped damaged checkpoints: "
                        + "; ".join(problems)
                        + f"; resuming from {path}",
                        stacklevel=2,
                    )
                return load_checkpoint(path), entry
        raise CheckpointError(f"{self.directory}: no intact checkpoint: " + "; ".join(problems))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (no code from the file is ever run).

    Raises:
        CheckpointError: when the file is missing, truncated or not a checkpoint, or when it
            contains pickled objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else (a raw pickle, a truncated or
        # overwritten file) is never handed to an unpickler.
        raise CheckpointError(f"{path}: corrupted or not a checkpoint (not a torch zip archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: the file asks to import {unsafe.group(1)}, which could run "
                "code; stagetrain loads tensors and plain data only"
            ) from None
        raise CheckpointError(
            f"{path}: corrupted or not a checkpoint (unreadable pickle)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: corrupted or not a checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a stagetrain checkpoint (format {FORMAT_VERSION})")
    return payload

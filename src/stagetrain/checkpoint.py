"""Checkpoints: written atomically, verified before use, loaded without running code.

Layout inside a run directory::

    checkpoints/
      ckpt-00000500.pt      # torch.save of plain tensors, numbers, strings, lists, dicts
      ckpt-00000500.json    # its sidecar: file, step, stage, sha256, bytes, state counters
      manifest.json         # newest last: file, step, stage, sha256

A checkpoint file is written to a temporary name, flushed to disk and renamed; then
its sidecar, then the manifest, each the same way. A kill at any moment leaves either
the old or the new manifest, and every file the manifest names is complete.

The manifest is a convenience, never an authority over the file system: it may name
only plain checkpoint file names (``ckpt-<step>.pt``) inside ``checkpoints/``, and an
entry that names anything else (an absolute path, ``..``, a sub-directory, a symbolic
link) is refused with a warning and never read, hashed or deleted. A manifest that is
missing or unreadable is rebuilt from the sidecars (and from complete checkpoint files
whose sidecar a kill prevented), so resume never silently starts again from step 0.

Resume (:meth:`CheckpointStore.load_latest`) tries checkpoints newest first and skips,
with a warning naming each reason, any that is missing, not a regular file, fails its
checksum, is not a torch zip archive, asks to unpickle code (``weights_only=True``
refuses it), has another format version, or lacks the payload's required keys.

Writes that fail (disk full, permission denied, read-only file system) raise a one-line
:class:`~stagetrain.errors.CheckpointError` naming the path, after removing what the
failed save wrote: the previous checkpoints and the manifest stay as they were.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from stagetrain.atomic import atomic_write as atomic_write
from stagetrain.atomic import atomic_write_text as atomic_write_text
from stagetrain.atomic import is_regular, unlink_quietly
from stagetrain.atomic import remove_orphan_temps as remove_orphan_temps
from stagetrain.atomic import sha256_file as sha256_file
from stagetrain.errors import CheckpointError, RunDirError
from stagetrain.manifest import ManifestEntry as ManifestEntry
from stagetrain.manifest import (
    ManifestSchema,
    SidecarSchema,
    payload_counters,
    sidecar_name,
)
from stagetrain.rng import rng_state as rng_state
from stagetrain.rng import set_rng_state as set_rng_state

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
"""The only file names a manifest entry may give (what :meth:`CheckpointStore.save` writes)."""
REQUIRED_KEYS: tuple[str, ...] = ("format", "state")
"""Keys of every stagetrain checkpoint (the built-in loop's and the Keras adapter's)."""
LOOP_KEYS: tuple[str, ...] = (
    "format",
    "model",
    "optimizer",
    "state",
    "rng",
    "fingerprint",
    "config",
    "log_lines",
)
"""Keys a checkpoint of the built-in loop needs to resume: pass ``required=LOOP_KEYS``."""


class CheckpointStore:
    """The checkpoints of one run directory: save, list, verify, load, prune.

    Args:
        directory: where checkpoint files, their sidecars and the manifest live.
        keep: how many of the newest checkpoints to keep.
        required: keys every loadable payload must have (:func:`validate_payload`); the
            built-in loop passes :data:`LOOP_KEYS`.
    """

    def __init__(
        self, directory: str | Path, keep: int = 3, *, required: Sequence[str] = REQUIRED_KEYS
    ) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.required = tuple(required)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    # --- reading ------------------------------------------------------------------------

    def entries(self) -> list[ManifestEntry]:
        """Manifest entries, oldest first (none when there is no manifest).

        Entries naming anything but a checkpoint file inside the directory are left out
        with a warning.

        Raises:
            CheckpointError: when the manifest is unreadable or does not match its
                schema (one line naming the manifest and the field).
        """
        entries, problem = self._read_manifest()
        if problem is not None and self.manifest_path.exists():
            raise CheckpointError(problem)
        return entries

    def scan(self) -> list[ManifestEntry]:
        """Every checkpoint file in the directory, from its sidecar when it has a valid one.

        What rebuilds a missing manifest: each checkpoint carries its own step and
        checksum. Sorted by step, oldest first.
        """
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        found = []
        for name in names:
            match = CHECKPOINT_NAME.match(name)
            if match is None:
                continue
            sidecar = self._read_sidecar(self.directory / sidecar_name(name))
            if sidecar is not None and sidecar.file == name:
                found.append(sidecar)
            else:
                found.append(ManifestEntry(name, int(match.group(1)), "", None))
        return sorted(found, key=lambda e: e.step)

    def candidates(self) -> tuple[list[ManifestEntry], str | None]:
        """Checkpoints to resume from, oldest first, and the manifest's problem if any.

        The manifest's entries, plus checkpoint files it does not name (written by a save
        that a kill interrupted before the manifest update, or all of them when the
        manifest is missing or unreadable).
        """
        entries, problem = self._read_manifest()
        scanned = {e.file: e for e in self.scan()}
        # The sidecar of the same file (same checksum) knows the state counters.
        entries = [
            replace(e, state=scanned[e.file].state)
            if e.file in scanned and scanned[e.file].sha256 == e.sha256
            else e
            for e in entries
        ]
        named = {e.file for e in entries}
        extra = [e for name, e in scanned.items() if name not in named]
        return sorted([*entries, *extra], key=lambda e: e.step), problem

    def latest_entry(self) -> ManifestEntry | None:
        """The newest checkpoint that exists as a regular file (not verified; cheap)."""
        entries, _ = self.candidates()
        for entry in reversed(entries):
            if is_regular(self.directory / entry.file):
                return entry
        return None

    def load_latest(self) -> tuple[dict[str, Any], ManifestEntry]:
        """The newest checkpoint that is intact and loadable, warning about any skipped.

        Raises:
            CheckpointError: when there is no checkpoint, or none can be loaded (the
                message lists each one with the reason).
        """
        entries, problem = self.candidates()
        if not entries:
            damaged = f" ({problem})" if self.manifest_path.exists() else ""
            raise CheckpointError(f"{self.directory}: no checkpoint to resume from{damaged}")
        if problem is not None:
            warnings.warn(f"{problem}; rebuilt from the checkpoint files", stacklevel=2)
        problems = []
        for entry in reversed(entries):
            path = self.directory / entry.file
            try:
                payload = self._load_verified(path, entry)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            if problems:
                warnings.warn(
                    "skipped unloadable checkpoints: "
                    + "; ".join(problems)
                    + f"; resuming from {path}",
                    stacklevel=2,
                )
            return payload, entry
        raise CheckpointError(f"{self.directory}: no intact checkpoint: " + "; ".join(problems))

    def _load_verified(self, path: Path, entry: ManifestEntry) -> dict[str, Any]:
        if path.is_symlink():
            raise CheckpointError(f"{path}: a symbolic link; refused (never read or deleted)")
        if not path.exists():
            raise CheckpointError(f"{path}: missing")
        if not is_regular(path):
            raise CheckpointError(f"{path}: not a regular file")
        if entry.sha256 is not None:
            if sha256_file(path) != entry.sha256:
                raise CheckpointError(f"{path}: checksum mismatch (corrupted)")
        elif zipfile.is_zipfile(path):
            # No sidecar (a kill right after the rename): the archive's own CRCs.
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise CheckpointError(f"{path}: corrupted zip archive ({exc})") from None
            if bad is not None:
                raise CheckpointError(f"{path}: checksum mismatch in {bad} (corrupted)")
        payload = load_checkpoint(path)
        validate_payload(payload, path, required=self.required)
        return payload

    def _read_manifest(self) -> tuple[list[ManifestEntry], str | None]:
        """Valid entries and a one-line problem (``None`` when the manifest is fine)."""
        path = self.manifest_path
        if not path.exists():
            return [], f"{path}: no {MANIFEST}"
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return [], f"{path}: not valid JSON ({first})"
        try:
            manifest = ManifestSchema.model_validate(raw)
        except ValidationError as exc:
            from stagetrain.config import format_validation_error

            return [], format_validation_error(exc, str(path))
        entries = []
        for index, item in enumerate(manifest.checkpoints):
            if not CHECKPOINT_NAME.match(item.file):
                warnings.warn(
                    f"{path}: entry {index} names {item.file!r}, which is not a checkpoint file "
                    f"inside {self.directory}; ignored (never read or deleted)",
                    stacklevel=3,
                )
                continue
            entries.append(ManifestEntry(item.file, item.step, item.stage, item.sha256))
        return entries, None

    def _read_sidecar(self, path: Path) -> ManifestEntry | None:
        if not is_regular(path):
            return None
        try:
            meta = SidecarSchema.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            return None
        if meta.format != FORMAT_VERSION or not CHECKPOINT_NAME.match(meta.file):
            return None
        return ManifestEntry(meta.file, meta.step, meta.stage, meta.sha256, meta.state)

    # --- writing ------------------------------------------------------------------------

    def save(self, payload: dict[str, Any], *, step: int, stage: str) -> Path:
        """Write ``payload`` as the newest checkpoint, then its sidecar and the manifest;
        prune old ones.

        Raises:
            CheckpointError: when a write fails (one line naming the path and the reason);
                what this save wrote is removed, earlier checkpoints are untouched.
        """
        payload = {"format": FORMAT_VERSION, **payload}
        path = self.directory / f"ckpt-{step:08d}.pt"
        sidecar = self.directory / sidecar_name(path.name)
        fresh = not path.exists()
        try:
            atomic_write(path, lambda f: torch.save(payload, f))
            entry = ManifestEntry(
                path.name, step, stage, sha256_file(path), payload_counters(payload)
            )
            meta = {"format": FORMAT_VERSION, **entry.manifest_dict(), "bytes": path.stat().st_size}
            if entry.state is not None:
                meta["state"] = entry.state
            atomic_write_text(sidecar, json.dumps(meta, indent=1))
            previous, _ = self.candidates()
            entries = [e for e in previous if e.file != path.name] + [entry]
            stale, kept = entries[: -self.keep], entries[-self.keep :]
            manifest = {"checkpoints": [e.manifest_dict() for e in kept]}
            atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1))
        except (RunDirError, OSError) as exc:
            if fresh:  # nothing names it yet: take back what this save wrote
                unlink_quietly(path)
                unlink_quietly(sidecar)
            detail = str(exc) if isinstance(exc, RunDirError) else f"{path}: {exc.strerror}"
            raise CheckpointError(
                f"cannot save the checkpoint of step {step}: {detail}; the previous "
                f"checkpoints in {self.directory} are intact"
            ) from None
        self._prune(stale)
        return path

    def rebuild_manifest(self) -> list[ManifestEntry]:
        """Rewrite the manifest from the checkpoint files (the newest ``keep``); returns it."""
        entries, _ = self.candidates()
        kept = [e for e in entries if is_regular(self.directory / e.file)][-self.keep :]
        manifest = {"checkpoints": [e.manifest_dict() for e in kept]}
        try:
            atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1))
        except RunDirError as exc:
            raise CheckpointError(str(exc)) from None
        return kept

    def _prune(self, stale: Iterable[ManifestEntry]) -> None:
        """Delete old checkpoints and sidecars: regular files with our names only."""
        for entry in stale:
            for name in (entry.file, sidecar_name(entry.file)):
                path = self.directory / name
                if path.is_symlink():
                    warnings.warn(
                        f"{path}: a symbolic link; not deleted (never read or deleted)",
                        stacklevel=3,
                    )
                elif is_regular(path):
                    unlink_quietly(path)


_PAYLOAD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (dict,),
    "optimizer": (dict,),
    "state": (dict,),
    "rng": (list, tuple),
    "fingerprint": (str,),
    "config": (str,),
    "log_lines": (int,),
    "world_size": (int,),
}


def validate_payload(
    payload: Any, path: str | Path, *, required: Sequence[str] = REQUIRED_KEYS
) -> None:
    """Check that a loaded checkpoint has the keys (and key types) a resume needs.

    Args:
        payload: what :func:`load_checkpoint` returned.
        path: the file, named in the error.
        required: the keys to insist on, each also checked for its type when known
            (default: those of every stagetrain checkpoint; :data:`LOOP_KEYS` for the loop).

    Raises:
        CheckpointError: one line naming the file and every missing key, or the first
            key of the wrong type.
    """
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a stagetrain checkpoint ({type(payload).__name__})")
    missing = [k for k in required if k not in payload]
    if missing:
        names = ", ".join(repr(k) for k in missing)
        raise CheckpointError(f"{path}: not a complete checkpoint: missing {names}")
    for key in required:
        expected = _PAYLOAD_TYPES.get(key)
        value = payload[key]
        if expected is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            raise CheckpointError(
                f"{path}: {key}: expected {' or '.join(t.__name__ for t in expected)}, "
                f"got {type(value).__name__}"
            )
    state = payload.get("state")
    if "state" in required and isinstance(state, dict):
        for key in ("step", "stage_index", "stage_step"):
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(
                    f"{path}: state.{key}: expected a whole number >= 0, got {value!r}"
                )


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
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(
            f"{path}: not a stagetrain checkpoint (a {type(payload).__name__} without 'format')"
        )
    if payload["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format']!r}; this version of stagetrain "
            f"reads format {FORMAT_VERSION}"
        )
    return payload

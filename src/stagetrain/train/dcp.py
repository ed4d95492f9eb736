"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

Under ``parallel: fsdp`` no rank ever holds the whole model, so no rank writes it
alone: every rank writes its own shards of the model and optimizer, and DCP's
metadata records which bytes of which file hold which slice of which tensor. A run
resumes on any number of ranks (DCP reads the slices each new shard needs). Layout
inside a run directory::

    checkpoints/
      ckpt-00000500/          one directory per checkpoint
        __0_0.distcp          rank 0's shards (model and optimizer)
        __1_0.distcp          rank 1's shards
        .metadata             DCP's index of the shards
        meta.pt               counters, every rank's RNG, fingerprint: plain data
      .ckpt-00000600.tmp/     being written: never listed, removed when a run starts
      sharded.json            the manifest, newest last: directory, step, stage, world
                              size and the SHA-256 of every file

The promises of the single-file checkpoints (:mod:`stagetrain.checkpoint`) hold:

* **atomic**: all ranks write into the temporary directory; each rank hashes its own
  files once its write is complete and sends the digests to rank 0, which renames
  the directory into place only when every rank has reported, then replaces the
  manifest atomically. A kill at any moment leaves the previous manifest, naming
  only complete checkpoints.
* **verified**: resume checks every file against its SHA-256 and falls back to the
  previous checkpoint (saying so) when one is missing or damaged.
* **no code is run by loading**: DCP's ``.metadata`` is a pickle, read here by an
  unpickler that admits only DCP's own metadata classes, ``torch.Size``, dtypes and
  paths; the few non-tensor values (the optimizer's hyperparameters) are read with
  ``torch.load(weights_only=True)`` instead of DCP's default ``weights_only=False``;
  ``meta.pt`` is read like a single-file checkpoint.
* **keep-K**: only the newest ``checkpoint.keep`` directories stay.

With ``checkpoint.async_save`` training waits only while the state is copied to host
memory (``dcp.async_save``); writing, hashing and publishing run in a background
thread, on a gloo process group of their own, and the next checkpoint, a rollback and
the end of the run wait for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from stagetrain.atomic import fsync_dir
from stagetrain.checkpoint import FORMAT_VERSION, atomic_write_text, load_checkpoint, sha256_file
from stagetrain.errors import CheckpointError
from stagetrain.train.background import BackgroundWriter
from stagetrain.train.dcp_io import (
    DCP_METADATA,
    _prestaged_writer,
    _state_dicts,
    load_sharded,
    read_metadata,
    read_model,
    stage_to_host,
)
from stagetrain.train.engine import Engine

MANIFEST = "sharded.json"
META = "meta.pt"
_TEMP_PREFIX = ".ckpt-"
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ShardedEntry:
    """One sharded checkpoint in the manifest."""

    file: str
    """The checkpoint's directory (inside ``checkpoints/``)."""
    step: int
    stage: str
    world_size: int
    files: dict[str, str] = field(default_factory=dict)
    """Every file of the directory and its SHA-256."""

    @property
    def sha256(self) -> str:
        """One digest for the whole checkpoint (over the per-file digests)."""
        text = json.dumps(sorted(self.files.items()), separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# --- the store ----------------------------------------------------------------------------


def _temp_name(step: int) -> str:
    return f"{_TEMP_PREFIX}{step:08d}{_TEMP_SUFFIX}"


def _digests(directory: Path, rank: int) -> dict[str, str]:
    """SHA-256 of the shard files rank ``rank`` wrote (DCP names them ``__RANK_*``)."""
    return {
        p.name: sha256_file(p)
        for p in sorted(directory.glob(f"__{rank}_*"))
        if p.is_file() and not p.name.endswith(DCP_METADATA)
    }


class ShardedStore:
    """The sharded checkpoints of one run directory (see the module docstring).

    ``save``, ``load_latest`` and ``wait`` are collectives: every rank calls them.

    Args:
        directory: the run's ``checkpoints/`` directory.
        keep: how many of the newest checkpoints to keep.
        engine: ranks, barrier and the checkpoint process group (``checkpoint_group``).
        async_save: write in the background (see the module docstring).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int,
        engine: Engine | None = None,
        async_save: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self._engine = engine
        self.async_save = async_save
        self.group = getattr(engine, "checkpoint_group", None)
        # Imported now: the first checkpoint would otherwise pay it while training waits.
        import torch.distributed.checkpoint  # noqa: F401

        self._staged: Any = None
        self._writer = BackgroundWriter(self.directory)
        self._published: Path | None = None

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    @property
    def engine(self) -> Engine:
        """The run's engine (a store opened only to read entries has none)."""
        if self._engine is None:
            raise CheckpointError(f"{self.directory}: this store was opened read-only")
        return self._engine

    def entries(self) -> list[ShardedEntry]:
        """Manifest entries, oldest first; an unreadable manifest is an error."""
        if not self.manifest_path.exists():
            return []
        try:
            raw = json.loads(self.manifest_path.read_text())
            return [ShardedEntry(**e) for e in raw["checkpoints"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.manifest_path}: corrupted manifest ({exc})") from None

    def remove_partial(self) -> list[Path]:
        """Delete the temporary directories of writes that never finished (rank 0, before a
        run starts writing); returns them."""
        removed = []
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith(_TEMP_PREFIX) and path.name.endswith(_TEMP_SUFFIX):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    # --- saving -------------------------------------------------------------------------

    def save(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        step: int,
        stage: str,
    ) -> Path | None:
        """Write a checkpoint of ``model`` and ``optimizer`` with ``meta`` (rank 0's plain
        data). Returns, on rank 0, the directory it is (or, asynchronously, will be)
        published as; None on the other ranks."""
        self.wait()
        from torch.distributed.checkpoint import FileSystemWriter, async_save, save

        temp = self.directory / _temp_name(step)
        main = self.engine.is_main
        if main:
            # Every rank writes here only after DCP's planning collective, which rank 0
            # joins after this: a leftover of the same name can go first.
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        state = _state_dicts(model, optimizer)
        if not self.async_save:
            save(state, storage_writer=FileSystemWriter(temp), process_group=self.group)
            self._finish(temp, meta, step, stage)
            path, self._published = self._published, None
            self.engine.barrier()  # every rank sees the new manifest before going on
            return path if main else None
        # The host copy of this rank's shards is allocated at the first checkpoint and
        # refilled in place at the next (the stall is one copy per tensor); it stays in
        # host memory between checkpoints.
        self._staged = stage_to_host(state, self._staged)
        future = async_save(
            self._staged, storage_writer=_prestaged_writer(temp), process_group=self.group
        )
        self._writer.submit(self._finish_after, future, temp, meta, step, stage)
        return self.directory / f"ckpt-{step:08d}" if main else None

    def _finish_after(
        self, future: Any, temp: Path, meta: dict[str, Any], step: int, stage: str
    ) -> None:
        future.result()
        self._finish(temp, meta, step, stage)

    def _finish(self, temp: Path, meta: dict[str, Any], step: int, stage: str) -> None:
        """After this rank's write: hash its files, report to rank 0; rank 0 publishes once
        every rank has reported."""
        rank, world = self.engine.info.rank, self.engine.info.world_size
        mine = _digests(temp, rank)
        if world > 1:
            reports: list[Any] = [None] * world if rank == 0 else []
            dist.gather_object(mine, reports if rank == 0 else None, dst=0, group=self.group)
        else:
            reports = [mine]
        if rank == 0:
            self._published = self._publish(temp, meta, step, stage, reports)

    def _publish(
        self,
        temp: Path,
        meta: dict[str, Any],
        step: int,
        stage: str,
        reports: list[dict[str, str]],
    ) -> Path:
        files: dict[str, str] = {}
        for report in reports:
            files.update(report)
        with (temp / META).open("wb") as f:
            torch.save({"format": FORMAT_VERSION, **meta}, f)
            f.flush()
            os.fsync(f.fileno())
        for name in (DCP_METADATA, META):
            files[name] = sha256_file(temp / name)
        present = {p.name for p in temp.iterdir() if p.is_file()}
        if present != set(files):
            raise CheckpointError(
                f"{temp}: files {sorted(present ^ set(files))} were not reported by the ranks "
                "that wrote this checkpoint; it is not published"
            )
        fsync_dir(temp)
        final = self.directory / f"ckpt-{step:08d}"
        suffix = 1
        while final.exists():  # the same step written again (a restart): a new name
            final = self.directory / f"ckpt-{step:08d}-{suffix}"
            suffix += 1
        os.replace(temp, final)
        fsync_dir(self.directory)
        entry = ShardedEntry(final.name, step, stage, self.engine.info.world_size, files)
        old = self.entries()
        replaced = [e for e in old if e.step == step]
        entries = [e for e in old if e.step != step] + [entry]
        stale, kept = entries[: -self.keep], entries[-self.keep :]
        manifest = {"checkpoints": [asdict(e) for e in kept]}
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1))
        for gone in [*stale, *replaced]:
            shutil.rmtree(self.directory / gone.file, ignore_errors=True)
        return final

    def wait(self) -> None:
        """Block until a background save has finished (published, on rank 0).

        Raises:
            CheckpointError: when it failed.
        """
        self._writer.wait()

    # --- loading ------------------------------------------------------------------------

    def verify(self, entry: ShardedEntry) -> str | None:
        """None when every file of ``entry`` is present and matches its SHA-256, else why not."""
        directory = self.directory / entry.file
        if not directory.is_dir():
            return f"{directory}: missing"
        for name, digest in sorted(entry.files.items()):
            path = directory / name
            if not path.is_file():
                return f"{path}: missing"
            if sha256_file(path) != digest:
                return f"{path}: checksum mismatch (corrupted)"
        if DCP_METADATA not in entry.files or META not in entry.files:
            return f"{directory}: incomplete (no {DCP_METADATA} or {META})"
        return None

    def load_latest(self) -> tuple[dict[str, Any], ShardedEntry]:
        """The newest intact checkpoint's plain data, with ``"sharded"``: its directory
        (for :func:`load_sharded`). Rank 0 verifies; every rank gets its choice.

        Raises:
            CheckpointError: when there is no checkpoint, or none is intact.
        """
        self.wait()
        self.engine.barrier()  # rank 0's manifest is complete before anyone reads it
        choice: tuple[int | None, list[str]] | None = None
        if self.engine.is_main:
            choice = self._choose()
        index, problems = self.engine.gather(choice)[0]
        if index is None:
            if not problems:
                raise CheckpointError(f"{self.directory}: no checkpoint to resume from")
            raise CheckpointError(f"{self.directory}: no intact checkpoint: " + "; ".join(problems))
        entry = self.entries()[index]
        directory = self.directory / entry.file
        if problems and self.engine.is_main:
            warnings.warn(
                "skipped damaged checkpoints: " + "; ".join(problems) + f"; resuming from "
                f"{directory}",
                stacklevel=2,
            )
        payload = load_checkpoint(directory / META)
        payload["sharded"] = str(directory)
        return payload, entry

    def _choose(self) -> tuple[int | None, list[str]]:
        entries = self.entries()
        problems: list[str] = []
        for index in range(len(entries) - 1, -1, -1):
            problem = self.verify(entries[index])
            if problem is None:
                return index, problems
            problems.append(problem)
        return None, problems


def has_sharded(directory: Path) -> bool:
    """Whether a ``checkpoints/`` directory lists sharded checkpoints."""
    return (Path(directory) / MANIFEST).is_file()


def select_sharded(run_dir: Path, step: int | None) -> tuple[dict[str, torch.Tensor], ShardedEntry]:
    """The full model weights of a sharded run's newest intact checkpoint (or ``step``'s),
    verified, in one process (``stagetrain export``)."""
    store = ShardedStore(run_dir / "checkpoints", keep=1 << 30)
    entries = store.entries()
    if step is None:
        good = next((e for e in reversed(entries) if store.verify(e) is None), None)
        if good is None:
            problems = [p for e in entries if (p := store.verify(e)) is not None]
            raise CheckpointError(
                f"{run_dir}: no intact sharded checkpoint: " + ("; ".join(problems) or "none")
            )
        chosen = good
    else:
        found = [e for e in entries if e.step == step]
        if not found:
            steps = ", ".join(str(e.step) for e in entries) or "none"
            raise CheckpointError(
                f"--checkpoint: {run_dir} has no checkpoint at step {step}; kept steps: {steps}"
            )
        chosen = found[-1]
        problem = store.verify(chosen)
        if problem is not None:
            raise CheckpointError(f"--checkpoint: {problem}")
    return read_model(store.directory / chosen.file), chosen


__all__ = [
    "MANIFEST",
    "ShardedEntry",
    "ShardedStore",
    "has_sharded",
    "load_sharded",
    "read_metadata",
    "read_model",
    "select_sharded",
]

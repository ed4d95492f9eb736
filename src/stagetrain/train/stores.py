"""Where a run's checkpoints go: one file from rank 0, or shards from every rank.

The :class:`~stagetrain.train.runner.Runner` and :func:`~stagetrain.fit` talk to a
:class:`RunStore`; which one a run gets follows its engine:

============================ ============================================================
engine                       store
============================ ============================================================
DDP, Accelerate, one process :class:`SingleFileStore`: rank 0 writes ``ckpt-*.pt``
                             (:class:`~stagetrain.checkpoint.CheckpointStore`)
FSDP (``parallel: fsdp``)    :class:`~stagetrain.train.dcp.ShardedStore`: every rank
                             writes its shards (``torch.distributed.checkpoint``)
============================ ============================================================

Both write atomically, verify checksums before loading, never run code from a file,
keep the newest ``checkpoint.keep``, and with ``checkpoint.async_save`` write in the
background; :meth:`RunStore.wait` is where a run waits for that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from stagetrain.checkpoint import LOOP_KEYS, MANIFEST, CheckpointStore
from stagetrain.errors import CheckpointError
from stagetrain.train import dcp
from stagetrain.train.background import BackgroundWriter
from stagetrain.train.engine import Engine


class RunStore(Protocol):
    """What a run needs from its checkpoint store (``save``/``load_latest``/``wait`` are
    collectives: every rank calls them)."""

    directory: Path

    def save(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        step: int,
        stage: str,
    ) -> Path | None:
        """Checkpoint the model and optimizer with ``meta`` (counters, RNG, fingerprint);
        the path on rank 0, None elsewhere."""
        ...

    def load_latest(self) -> tuple[dict[str, Any], Any]:
        """The newest intact checkpoint's payload and manifest entry."""
        ...

    def wait(self) -> None:
        """Until a background save is written and listed."""
        ...


class SingleFileStore:
    """Rank 0 writes one file per checkpoint (:class:`~stagetrain.checkpoint.CheckpointStore`).

    With ``async_save`` the payload is copied to host memory and written by a worker
    thread while training goes on; the manifest lists the file once it is complete.
    """

    def __init__(
        self, directory: str | Path, *, keep: int, engine: Engine, async_save: bool = False
    ) -> None:
        self.store = CheckpointStore(directory, keep=keep, required=LOOP_KEYS)
        self.directory = self.store.directory
        self.engine = engine
        self.async_save = async_save
        self._staged: Any = None
        self._writer = BackgroundWriter(self.directory)

    def save(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        step: int,
        stage: str,
    ) -> Path | None:
        self.wait()
        if not self.engine.is_main:
            if not self.async_save:
                self.engine.barrier()
            return None
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **meta}
        if not self.async_save:
            path = self.store.save(payload, step=step, stage=stage)
            self.engine.barrier()
            return path
        # Training may change the live tensors: the writer gets a host copy (its buffers
        # reused from the previous checkpoint, which wait() has finished writing).
        self._staged = dcp.stage_to_host(payload, self._staged)
        self._writer.submit(self.store.save, self._staged, step=step, stage=stage)
        return self.directory / f"ckpt-{step:08d}.pt"

    def wait(self) -> None:
        self._writer.wait()

    def load_latest(self) -> tuple[dict[str, Any], Any]:
        self.wait()
        if self.async_save:
            self.engine.barrier()  # rank 0's last file is listed before anyone reads
        return self.store.load_latest()


def open_store(directory: Path, *, keep: int, engine: Engine, async_save: bool = False) -> RunStore:
    """The store for ``engine``: sharded under FSDP, single files otherwise.

    Rank 0 removes the temporary directories of sharded writes a kill interrupted.

    Raises:
        CheckpointError: when ``directory`` holds only checkpoints of the other kind
            (the run was written under another ``parallel.kind``).
    """
    sharded = bool(getattr(engine, "sharded", False))
    has_single = (directory / MANIFEST).is_file() or any(directory.glob("ckpt-*.pt"))
    has_sharded = dcp.has_sharded(directory)
    if sharded and has_single and not has_sharded:
        raise CheckpointError(
            f"{directory}: holds single-file checkpoints (written under parallel.kind 'ddp'); "
            "resume it with parallel.kind 'ddp', or start a fresh run with 'fsdp'"
        )
    if not sharded and has_sharded and not has_single:
        raise CheckpointError(
            f"{directory}: holds sharded checkpoints (written under parallel.kind 'fsdp'); "
            "resume it with parallel.kind 'fsdp' (any number of ranks)"
        )
    if sharded:
        store = dcp.ShardedStore(directory, keep=keep, engine=engine, async_save=async_save)
        if engine.is_main:
            store.remove_partial()
        return store
    return SingleFileStore(directory, keep=keep, engine=engine, async_save=async_save)


def has_checkpoint(directory: Path) -> bool:
    """Whether a ``checkpoints/`` directory lists any checkpoint (of either kind)."""
    single = (directory / MANIFEST).is_file() or any(directory.glob("ckpt-*.pt"))
    return single or dcp.has_sharded(directory)

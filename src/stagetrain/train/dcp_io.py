"""Reading and writing DCP's files for :mod:`stagetrain.train.dcp`: the metadata read
without running code, the model and optimizer state dicts, and host copies for
background writes."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from stagetrain.errors import CheckpointError

DCP_METADATA = ".metadata"


# --- reading without running code ----------------------------------------------------------

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: any other import is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_metadata(directory: Path) -> Any:
    """DCP's metadata of a checkpoint directory, read without running code from it.

    Raises:
        CheckpointError: when it is missing, damaged, or asks for anything but DCP's
            metadata classes.
    """
    path = Path(directory) / DCP_METADATA
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete sharded checkpoint)") from None
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if text.startswith("GLOBAL "):
            raise CheckpointError(
                f"{path}: refused: the file asks to import {text[7:]}, which could run code; "
                "stagetrain loads DCP's metadata, tensors and plain data only"
            ) from None
        raise CheckpointError(f"{path}: corrupted ({text})") from None
    except (EOFError, AttributeError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: corrupted ({type(exc).__name__})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata")
    return metadata


def _reader(directory: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader with :func:`read_metadata` in place of ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_metadata(directory)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(directory)


def _planner(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's load planner, reading non-tensor values with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"sharded checkpoint: refused {read_item.dest_index.fqn!r}: it holds pickled "
                    f"code ({str(exc).splitlines()[0][:120]})"
                ) from None
            super().load_bytes(read_item, _as_bytes(obj))

    return SafeLoadPlanner(**kwargs)


def _as_bytes(obj: Any) -> io.BytesIO:
    """``obj`` serialised again for DCP's own ``load_bytes`` (now known to be plain data)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# --- what goes into a checkpoint ----------------------------------------------------------


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def load_sharded(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    group: Any = None,
    where: str = "optimizer",
) -> None:
    """Load a sharded checkpoint into ``model`` and ``optimizer`` (every rank calls it).

    Works for any layout of the model now (sharded on another number of ranks, or not
    sharded at all): DCP reads the slices each tensor needs. Parameters that had no
    optimizer state when the checkpoint was written (frozen, never stepped) get none.

    Raises:
        CheckpointError: when the weights or the optimizer's param groups do not fit.
    """
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    metadata = read_metadata(directory)
    keys = set(metadata.state_dict_metadata)
    saved_groups = len({k.split(".")[2] for k in keys if k.startswith("optimizer.param_groups.")})
    if saved_groups != len(optimizer.param_groups):
        raise CheckpointError(
            f"{where}: the checkpoint's optimizer has {saved_groups} param groups, this "
            f"curriculum's {len(optimizer.param_groups)} (different lr_multipliers or no_decay)"
        )
    state = _state_dicts(model, optimizer)
    missing = sorted(k for k in state["model"] if f"model.{k}" not in keys)
    if missing:
        raise CheckpointError(
            f"the checkpoint's weights do not fit this model (no {missing[:3]}); resume with "
            "the architecture it was saved with"
        )
    # Only the optimizer state the checkpoint holds: a parameter frozen when it was
    # written has none, and must get none now (as in the run that was not interrupted).
    state["optimizer"]["state"] = {
        fqn: kept
        for fqn, entry in state["optimizer"]["state"].items()
        if (kept := {k: v for k, v in entry.items() if f"optimizer.state.{fqn}.{k}" in keys})
    }
    try:
        load(state, storage_reader=_reader(directory), planner=_planner(), process_group=group)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(
            model, optimizer, state["optimizer"], options=StateDictOptions(strict=False)
        )
    except CheckpointError:
        raise
    except Exception as exc:  # DCP wraps per-rank failures in its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{directory}: the sharded checkpoint does not fit this model and optimizer "
            f"({first[:300]})"
        ) from None


def read_model(directory: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint, on the CPU, in one process.

    Consolidates every rank's shards (``stagetrain export``, ``weights:`` pointing at a
    run); no process group and no model are needed: the tensors are allocated from the
    checkpoint's metadata.
    """
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(directory)
    state = {
        key[len("model.") :]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{directory}: the sharded checkpoint holds no model weights")
    target = {"model": state}
    try:
        with warnings.catch_warnings():  # one process, on purpose: DCP says it assumes so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load(target, storage_reader=_reader(directory), planner=_planner(), no_dist=True)
    except CheckpointError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{directory}: cannot read the sharded weights ({first})") from None
    return target["model"]


# --- host copies for background writes -----------------------------------------------------


@torch.no_grad()
def stage_to_host(live: Any, cached: Any = None) -> Any:
    """A host-memory copy of the nest ``live`` that training may not change under a writer.

    Tensors (and DTensors: their local shard) are copied into the buffers of ``cached``,
    an earlier copy, wherever shape and dtype still match, else into new ones; other
    values are taken as they are. Refilling costs one ``copy_`` per tensor, without
    allocating or rebuilding DTensor metadata.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4 (single-file checkpoints only): no DTensors to meet
        DTensor = _NoDTensor  # type: ignore[misc,assignment]

    if isinstance(live, DTensor):
        local = live.to_local()
        buffer = cached.to_local() if isinstance(cached, DTensor) else None
        if (
            buffer is not None
            and cached.shape == live.shape
            and buffer.shape == local.shape
            and buffer.dtype == local.dtype
        ):
            buffer.copy_(local)
            return cached
        host = local.detach().to("cpu", copy=True)
        return DTensor.from_local(
            host, live.device_mesh, live.placements, run_check=False, shape=live.shape,
            stride=live.stride(),
        )  # fmt: skip
    if isinstance(live, torch.Tensor):
        if (
            isinstance(cached, torch.Tensor)
            and not isinstance(cached, DTensor)
            and cached.shape == live.shape
            and cached.dtype == live.dtype
        ):
            return cached.copy_(live.detach())
        return live.detach().to("cpu", copy=True)
    if isinstance(live, dict):
        old = cached if isinstance(cached, dict) else {}
        return {k: stage_to_host(v, old.get(k)) for k, v in live.items()}
    if isinstance(live, list | tuple):
        old_items = list(cached) if isinstance(cached, list | tuple) else []
        old_items += [None] * (len(live) - len(old_items))
        return type(live)(stage_to_host(v, c) for v, c in zip(live, old_items, strict=False))
    return live


class _NoDTensor:
    """Stands in for DTensor where torch has none (``isinstance`` is then always false)."""


def _prestaged_writer(directory: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    class PreStagedWriter(FileSystemWriter):
        """DCP's file writer, given a state already copied to host memory
        (:func:`stage_to_host`): its own staging would copy it once more."""

        def stage(self, state_dict: Any) -> Any:
            return state_dict

    return PreStagedWriter(directory, sync_files=True)

"""Distributed training through PyTorch's own engine: a process group and DDP.

stagetrain adds no communication of its own to data loading — every rank computes
its shard of each global batch from the deterministic sampler. The collectives it
does use: DDP's gradient all-reduce, the all-reduce of evaluation sums, the
broadcast of each advance decision, a barrier after each checkpoint, and a gather
of per-rank RNG states into the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stagetrain.env import LaunchEnv, read_launch_env


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment.

    Uses NCCL (with gloo for CPU tensors) when CUDA is available and gloo otherwise; a
    single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) starts no group.
    """
    env = read_launch_env()  # every variable checked: a bad one is one line, not a hang
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank)
    if not env.distributed:
        return DistInfo()
    # A bounded timeout turns a rare hung connection (seen with gloo right after a
    # torchrun restart) into a failure that torchrun's --max-restarts retries.
    timeout = env.timeout
    # NCCL for CUDA tensors, plus gloo for the CPU ones that sharded training hands to
    # collectives (CPU-offloaded FSDP gradients, checkpoint planning).
    backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    store = _attempt_store(env, timeout)
    dist.init_process_group(
        backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
    )
    return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank)


def _attempt_store(env: LaunchEnv, timeout: timedelta) -> dist.Store:
    """The launcher's key-value store, namespaced by torchrun's restart count.

    After a restart, torchrun's workers reconnect to the same agent store; without a
    fresh namespace a new rank can read a dead rank's address from the previous attempt
    and fail to connect (seen with gloo). The prefix keeps attempts apart.
    """
    host = env.master_addr or "127.0.0.1"
    port = env.master_port or 29500
    base = dist.TCPStore(
        host, port, env.world_size, is_master=(env.rank == 0 and not env.use_agent_store),
        timeout=timeout, wait_for_workers=False,
    )  # fmt: skip
    return dist.PrefixStore(f"stagetrain/attempt-{env.restart_count}", base)


def default_device(info: DistInfo) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel (built per stage, after freezing: DDP only
    tracks the parameters that require gradients when it is constructed)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj`` on every rank (just ``[obj]`` without a process group)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out

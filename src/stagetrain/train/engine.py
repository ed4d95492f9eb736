"""Engines: who wraps the model, runs backward, and talks between ranks.

The loop never calls ``torch.distributed`` itself. An :class:`Engine` owns the model
wrapper (DDP, or whatever ``accelerate launch`` configured), the backward pass, the
"no gradient sync" context of accumulation micro-steps, gradient clipping and every
collective the curriculum needs:

========================= ====================================================
collective                used for
========================= ====================================================
:meth:`Engine.sum`        evaluation sums, before metrics are computed
:meth:`Engine.agree`      the advance decision (rank 0's decision is everyone's)
:meth:`Engine.any`        non-finite losses (every rank skips or stops together)
:meth:`Engine.gather`     per-rank RNG states for checkpoints; key sets
:meth:`Engine.barrier`    after a checkpoint is written
========================= ====================================================

Every tensor handed to a collective is first moved to :attr:`Engine.device` (NCCL
serves only CUDA tensors; gloo the CPU): a metric sum computed on the GPU stays there,
a flag built on the host is moved there.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.distributed as dist

from stagetrain.distributed import DistInfo, default_device, init_from_env, wrap_ddp
from stagetrain.errors import StageTrainError


class Engine(Protocol):
    """What the loop needs from a distributed engine (see the module docstring)."""

    info: DistInfo
    device: torch.device
    sharded: bool
    """Parameters are sharded over the ranks (FSDP): every forward pass is a collective
    (all ranks run the same number of them) and checkpoints are sharded."""

    @property
    def is_main(self) -> bool: ...

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train, once, on :attr:`device` before any optimizer is built over
        its parameters (FSDP shards it here; DDP wraps per stage in :meth:`wrap`)."""
        ...

    def wrap(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, Any]:
        """The model and optimizer to train with in the current stage (after freezing)."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """Skip the gradient all-reduce (micro-steps before the last of a step)."""
        ...

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor: ...

    def sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over ranks, on :attr:`device` (every rank gets every key)."""
        ...

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        ...

    def any(self, flag: torch.Tensor | bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        ...

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        ...

    def barrier(self) -> None: ...


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the model's gradients (on their device; no host sync)."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if any(hasattr(g, "full_tensor") for g in grads):
        # Sharded gradients (FSDP's DTensors): the norm is reduced over the shards.
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class TorchEngine:
    """PyTorch's own engine: the process group ``torchrun`` describes, and DDP.

    Args:
        info: this process's rank and world size (default: read from the environment).
        device: the device to train and reduce on (default: ``cuda:LOCAL_RANK`` or CPU).
    """

    sharded = False

    def __init__(self, info: DistInfo | None = None, device: torch.device | None = None) -> None:
        self.info = info if info is not None else init_from_env()
        self.device = device if device is not None else default_device(self.info)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def wrap(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, Any]:
        # DDP tracks the parameters that require gradients when it is built: the loop
        # calls this once per stage, after the stage's freezing.
        if self.info.world_size > 1:
            return wrap_ddp(model, self.device), optimizer
        return model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        no_sync = getattr(model, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def _check(self, tensor: torch.Tensor) -> torch.Tensor:
        moved = tensor.to(self.device)
        assert moved.device.type == self.device.type, (moved.device, self.device)
        return moved

    def sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.info.world_size == 1:
            return {k: v.to(self.device) for k, v in values.items()}
        # A rank whose share was empty has no keys yet: agree on the union first.
        keys = sorted(set().union(*self.gather(sorted(values))))
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        stacked = self._check(
            torch.stack(
                [values[k].to(self.device, torch.float64) if k in values else zero for k in keys]
            )
        )
        dist.all_reduce(stacked)
        return dict(zip(keys, stacked.unbind(0), strict=True))

    def agree(self, flag: bool) -> bool:
        if self.info.world_size == 1:
            return flag
        tensor = self._check(torch.tensor([int(flag)], dtype=torch.int64))
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def any(self, flag: torch.Tensor | bool) -> bool:
        value = flag if isinstance(flag, torch.Tensor) else torch.tensor(bool(flag))
        if self.info.world_size == 1:
            return bool(value)
        tensor = self._check(value.reshape(1).to(torch.int64))
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def gather(self, obj: Any) -> list[Any]:
        if self.info.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.info.world_size > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()


class AccelerateEngine(TorchEngine):
    """Hugging Face Accelerate: ``accelerate launch`` chooses the wrapper (DDP on CPU here).

    Accelerate's FSDP and DeepSpeed plugins shard the state, which this engine's
    single-file checkpoints cannot hold: they are refused. Sharded training is
    ``parallel: fsdp`` with ``--engine torch``, which runs under ``accelerate launch`` as
    under ``torchrun`` (both describe the job in the same environment variables).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        try:
            from accelerate import Accelerator
        except ImportError:
            raise StageTrainError(
                "engine 'accelerate' needs: pip install 'stagetrain[accelerate]'"
            ) from None
        self.accelerator = Accelerator()
        state = self.accelerator.state
        kind = str(getattr(state, "distributed_type", "")).upper()
        if "FSDP" in kind or "DEEPSPEED" in kind:
            raise StageTrainError(
                f"engine 'accelerate': its {kind.split('.')[-1]} configuration shards the model "
                "and optimizer, which stagetrain's accelerate checkpoints cannot save; for "
                "sharded training and checkpoints set 'parallel: {kind: fsdp}' (or --parallel "
                "fsdp) and run with --engine torch (under torchrun or accelerate launch), "
                "with accelerate's distributed_type left at MULTI_GPU/MULTI_CPU/NO"
            )
        info = DistInfo(
            self.accelerator.process_index,
            self.accelerator.num_processes,
            self.accelerator.local_process_index,
        )
        super().__init__(info, device if device is not None else self.accelerator.device)

    def wrap(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, Any]:
        return self.accelerator.prepare_model(model), self.accelerator.prepare_optimizer(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        return self.accelerator.no_sync(model)

"""FSDP2: parameters, gradients and optimizer state sharded over the ranks.

``parallel: {kind: fsdp}`` trains through PyTorch's own FSDP2
(``torch.distributed.fsdp.fully_shard``, torch >= 2.6). :func:`shard_model` applies it
bottom-up: every module named by ``parallel.wrap`` (by default the model's repeated
blocks) becomes one unit whose parameters are all-gathered just before its forward and
backward, then the root takes the rest::

    GPT                       fully_shard(root): embeddings, final norm, head
      blocks: ModuleList
        0: Block              fully_shard(block)   <- one all-gather / reduce-scatter
        1: Block              fully_shard(block)
        ...

FSDP2 keeps parameter names (``blocks.0.qkv.weight``): freezing patterns,
``lr_multipliers`` and ``no_decay`` see the names they see under DDP, and the optimizer
is built over the sharded parameters (DTensors) by the same hand-off code. Changing
``requires_grad`` between stages needs no re-wrapping: FSDP2 copies each sharded
parameter's flag to the gathered one at every all-gather.

:class:`FSDPEngine` is the :class:`~stagetrain.train.engine.Engine` for it: gradient
accumulation turns off the reduce-scatter (and the resharding after backward) for all
micro-steps but the last; clipping and the logged gradient norm reduce over the shards;
every forward pass is a collective, so evaluation runs the same number of batches on
every rank (:attr:`FSDPEngine.sharded`); checkpoints are sharded
(:mod:`stagetrain.train.dcp`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stagetrain.config import ParallelConfig
from stagetrain.distributed import DistInfo, init_from_env
from stagetrain.errors import ConfigError, StageTrainError
from stagetrain.train.engine import TorchEngine

MIN_TORCH = (2, 6)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_version(text: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``text`` (default: the installed torch)."""
    found = re.match(r"(\d+)\.(\d+)", text if text is not None else torch.__version__)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def require_fsdp2() -> None:
    """Raise a one-line error when this torch has no FSDP2 (``fully_shard``)."""
    if torch_version() < MIN_TORCH:
        raise StageTrainError(
            f"parallel.kind: 'fsdp' needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (FSDP2's "
            f"fully_shard); this is torch {torch.__version__}: upgrade torch or use "
            "parallel.kind 'ddp'"
        )


# --- which modules become shard units -----------------------------------------------------


def _no_split_classes(model: nn.Module) -> set[str]:
    """Class names a ``transformers`` model declares unsplittable (its blocks)."""
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if isinstance(declared, list | tuple | set):
            names.update(str(n) for n in declared)
    return names


def wrap_targets(model: nn.Module, patterns: list[str] | None) -> list[tuple[str, nn.Module]]:
    """The submodules to shard as units, innermost first (FSDP2 nests bottom-up).

    ``patterns`` match a module's class name exactly or its qualified name as a glob;
    each pattern takes the outermost modules it matches (``blocks.*`` is the blocks, not
    also their layers), while two patterns may nest (``blocks.*`` and ``*.mlp``).
    Default (None): the classes in ``_no_split_modules`` (transformers), else the
    children of every outermost ``nn.ModuleList``.

    Raises:
        ConfigError: when a pattern matches no module (``parallel.wrap[i]``).
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    chosen: list[tuple[str, nn.Module]] = []
    if patterns is not None:
        for i, pattern in enumerate(patterns):
            hits = [
                (n, m)
                for n, m in named
                if type(m).__name__ == pattern or fnmatch.fnmatchcase(n, pattern)
            ]
            if not hits:
                classes = sorted({type(m).__name__ for _, m in named})
                raise ConfigError(
                    f"parallel.wrap[{i}]: {pattern!r} matches no module class or module name; "
                    f"classes here: {classes[:12]}, names look like {[n for n, _ in named[:4]]}"
                )
            outermost = [h for h in hits if not any(h[0].startswith(o + ".") for o, _ in hits)]
            chosen.extend(h for h in outermost if all(h[1] is not c for _, c in chosen))
    else:
        unsplit = _no_split_classes(model)
        if unsplit:
            chosen = [(n, m) for n, m in named if type(m).__name__ in unsplit]
        if not chosen:
            for name, module in named:
                inside = any(name.startswith(c + ".") for c, _ in chosen)
                if isinstance(module, nn.ModuleList) and not inside:
                    chosen.extend((f"{name}.{i}", child) for i, child in enumerate(module))
    # Deepest first: an inner unit must be sharded before the unit that contains it.
    return sorted(chosen, key=lambda item: -item[0].count("."))


# --- activation checkpointing --------------------------------------------------------------


def checkpoint_activations(module: nn.Module) -> None:
    """Recompute ``module``'s activations during backward instead of keeping them.

    The module's ``forward`` is replaced on the instance (its class, parameter names and
    hooks stay as they are), so FSDP2's hooks around the call still gather the
    parameters for the forward and, before the recomputation, for the backward.
    """
    forward = module.forward

    @functools.wraps(forward)
    def recomputed(*args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = recomputed


# --- sharding ---------------------------------------------------------------------------


def shard_model(
    model: nn.Module, config: ParallelConfig, mesh: Any, device: torch.device
) -> list[str]:
    """Apply FSDP2 to ``model`` in place per ``config``; returns the units' names."""
    require_fsdp2()
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    precision = config.mixed_precision
    options: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=DTYPES[precision.param_dtype],
            reduce_dtype=DTYPES[precision.reduce_dtype],
        ),
    }
    if config.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    targets = wrap_targets(model, config.wrap)
    for _, module in targets:
        if config.activation_checkpointing:
            checkpoint_activations(module)
        fully_shard(module, reshard_after_forward=config.reshard_after_forward, **options)
    # The root's parameters are needed again at once by the backward: FSDP2's default
    # (None) keeps them gathered after the forward unless resharding is turned off anyway.
    fully_shard(model, reshard_after_forward=None if config.reshard_after_forward else False,
                **options)  # fmt: skip
    model.register_forward_hook(_reshard_without_backward)
    return [name for name, _ in targets]


def _reshard_without_backward(model: nn.Module, args: Any, output: Any) -> None:
    """After a forward with no backward to follow (evaluation, preflight), shard every unit
    again. Otherwise the units FSDP2 keeps gathered for the backward stay registered as
    plain parameters, and an optimizer built next (a stage's hand-off) would hold those."""
    if torch.is_grad_enabled():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _fsdp_root(model: nn.Module) -> Any:
    """The FSDP module behind ``model`` (through ``torch.compile``'s wrapper), or None."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, FSDPModule) else None


def _local_group(device: torch.device) -> None:
    """A one-process group, so that FSDP2 and DCP run the same way on a single process."""
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class FSDPEngine(TorchEngine):
    """:class:`~stagetrain.train.engine.TorchEngine` with FSDP2 instead of DDP.

    Args:
        config: the run's ``parallel`` block (``kind: fsdp``).
        info: this process's rank and world size (default: from the ``torchrun``
            environment; a single process gets a one-rank group of its own).
        device: the device to train on (default ``cuda:LOCAL_RANK`` or the CPU).
    """

    sharded = True

    def __init__(
        self,
        config: ParallelConfig,
        info: DistInfo | None = None,
        device: torch.device | None = None,
    ) -> None:
        require_fsdp2()
        if config.kind != "fsdp":
            raise ConfigError(f"parallel.kind: FSDPEngine needs 'fsdp', got {config.kind!r}")
        info = info if info is not None else init_from_env()
        super().__init__(info, device)
        if not dist.is_initialized():
            _local_group(self.device)
        from torch.distributed.device_mesh import init_device_mesh

        self.config = config
        self.mesh = init_device_mesh(self.device.type, (self.info.world_size,))
        # Checkpoint collectives get a gloo group of their own: an asynchronous save runs
        # them in a background thread while training's all-gathers use the default group.
        self.checkpoint_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=30))
        self.units: list[str] = []

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` (on :attr:`device`) in place; returns it."""
        if _fsdp_root(model) is None:
            self.units = shard_model(model, self.config, self.mesh, self.device)
        return model

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        # Sharded once in prepare(); freezing between stages needs no re-wrapping.
        return model, optimizer

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        root = _fsdp_root(model)
        return _accumulating(root) if root is not None else contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        return _full(torch.nn.utils.clip_grad_norm_(params, max_norm))


@contextlib.contextmanager
def _accumulating(root: Any) -> Iterator[None]:
    """Micro-steps before the last: gradients stay local and unsharded (no reduce-scatter),
    and the gathered parameters are kept for the next micro-step's forward."""
    root.set_requires_gradient_sync(False)
    root.set_reshard_after_backward(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)
        root.set_reshard_after_backward(True)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor, e.g. a norm computed over shards."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of a sharded model, on the CPU, on every rank.

    A collective: every rank calls it, and each holds the whole model for a moment (for
    large models, export the sharded checkpoint instead: ``stagetrain export``). Under
    DDP or on one process it is the model's ``state_dict()`` on the CPU.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if _fsdp_root(model) is None:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: _full(v).detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}

"""``parallel:``: how the model is spread over the ranks of a job (DDP or FSDP2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stagetrain.config._base import _Config

DTypeName = Literal["fp32", "bf16"]


class MixedPrecisionConfig(_Config):
    """FSDP2's ``MixedPrecisionPolicy``: the dtype parameters are all-gathered and computed
    in, and the dtype gradients are reduced in. The sharded parameters and the optimizer
    state stay in the model's own dtype (fp32). fp16 is not offered: it needs loss
    scaling, whose skip decision would be taken from each rank's own shard."""

    param_dtype: DTypeName = "fp32"
    reduce_dtype: DTypeName = "fp32"


_FSDP_ONLY = (
    "wrap",
    "mixed_precision",
    "reshard_after_forward",
    "cpu_offload",
    "activation_checkpointing",
)


class ParallelConfig(_Config):
    """How the model is spread over the ranks of a ``torchrun`` job.

    ``ddp`` (default) replicates the model on every rank (DistributedDataParallel) and
    writes single-file checkpoints from rank 0. ``fsdp`` shards parameters, gradients and
    optimizer state with FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6):
    each block in ``wrap`` is one shard unit, the root another; checkpoints are sharded
    (``torch.distributed.checkpoint``: every rank writes its shards, and a run resumes on
    any number of ranks). The other fields apply to ``fsdp`` only.
    """

    kind: Literal["ddp", "fsdp"] = "ddp"
    wrap: list[str] | None = None
    """Modules sharded as units: class names (``GPT2Block``) or globs over module names
    (``blocks.*``). Default: the model's ``_no_split_modules`` (transformers), else the
    children of its ``nn.ModuleList`` containers (the repeated blocks)."""
    mixed_precision: MixedPrecisionConfig = Field(default_factory=MixedPrecisionConfig)
    reshard_after_forward: bool = True
    """Free each unit's gathered parameters after its forward (all-gather again in the
    backward): less memory, more communication."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in host memory
    (``CPUOffloadPolicy``); the optimizer steps on the CPU."""
    activation_checkpointing: bool = False
    """Recompute each wrapped block's activations in the backward pass instead of storing
    them (``torch.utils.checkpoint``)."""

    @model_validator(mode="after")
    def _fsdp_only(self) -> ParallelConfig:
        if self.kind == "ddp":
            defaults = ParallelConfig(kind="fsdp")
            for name in _FSDP_ONLY:
                if getattr(self, name) != getattr(defaults, name):
                    raise ValueError(f"{name} applies to kind 'fsdp' only (kind is 'ddp')")
        if self.wrap is not None and not all(self.wrap):
            raise ValueError("wrap: entries must be non-empty class names or name globs")
        return self

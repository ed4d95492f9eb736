"""The whole curriculum: ordered stages plus everything shared by all of them."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from stagetrain.config._base import _check_duration, _Config
from stagetrain.config._parallel import ParallelConfig
from stagetrain.config._sources import ModelConfig
from stagetrain.config._stages import CheckpointConfig, GlobalLR, NonFiniteConfig, StageConfig
from stagetrain.config._training import BatchConfig, EvalConfig, LossTerm, OptimizerConfig
from stagetrain.time import Duration, TimeUnit


class CurriculumConfig(_Config):
    """A whole curriculum: ordered stages plus everything shared by all of them."""

    name: str = "curriculum"
    seed: int = 0
    data_seed: int | None = None
    """Seed passed to data factories that accept ``seed``; defaults to ``seed``. Set it to
    vary the data draw independently of the initialisation and batch order (``stagetrain
    compare --vary``)."""
    stages: list[StageConfig] = Field(min_length=1)
    model: ModelConfig | None = None
    teacher: ModelConfig | None = None
    """A frozen model whose outputs ``kl_distill`` loss terms match (``fit(teacher=...)``
    takes precedence); built like ``model``, usually with ``weights``."""
    batch_size: int = Field(default=32, gt=0)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Padding values, label keys and the model's calling convention."""
    total: str | None = None
    """Length of the whole run; needed only by stage durations written in 'dur'."""
    evals: list[EvalConfig] = Field(default_factory=list)
    eval_every: str | None = None
    log_every: int = Field(default=10, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the forward pass (fp16 uses a gradient scaler)."""
    compile: bool = False
    """Train through ``torch.compile(model)``."""
    data_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes preparing batches ahead (0: in the training process)."""
    pin_memory: bool = False
    """Pin batches in page-locked memory for faster copies to the GPU."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """DDP (default) or FSDP2 sharding across the ranks of a ``torchrun`` job."""
    global_lr: GlobalLR | None = None
    """When set, the LR at global step ``t`` is ``global_lr.lr * schedule(t)`` in every stage."""

    @field_validator("total", "eval_every")
    @classmethod
    def _durations(cls, value: str | None) -> str | None:
        return _check_duration(value)

    @field_validator("total")
    @classmethod
    def _total_unit(cls, value: str | None) -> str | None:
        if value is not None and Duration.parse(value).unit in (TimeUnit.FRACTION, TimeUnit.EPOCH):
            raise ValueError("total must be in steps, samples or tokens (ba, sp or tok)")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> CurriculumConfig:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be distinct; repeated: {dupes}")
        for i, stage in enumerate(self.stages):
            unit = Duration.parse(stage.duration).unit
            if unit is TimeUnit.FRACTION and self.total is None:
                raise ValueError(
                    f"stages[{i}].duration: {stage.duration!r} is a fraction of the run, "
                    "but the curriculum sets no 'total'"
                )
        resolved = self.resolved_stages()
        for i in range(1, len(resolved)):
            prev, cur = resolved[i - 1].optimizer, resolved[i].optimizer
            assert prev is not None and cur is not None
            if resolved[i].handoff != "reset" and prev.label != cur.label:
                raise ValueError(
                    f"stages[{i}].handoff: {resolved[i].handoff!r} keeps the optimizer state, "
                    f"but stage {resolved[i].name!r} uses {cur.label} after {prev.label}; "
                    "use handoff: reset"
                )
            if resolved[i].handoff != "reset" and prev.lr_multipliers != cur.lr_multipliers:
                # The kept optimizer's parameter groups (and their factors) are those of the
                # stage that built it: other multipliers here would be silently ignored.
                raise ValueError(
                    f"stages[{i}].optimizer.lr_multipliers: {cur.lr_multipliers} differs from "
                    f"stage {resolved[i - 1].name!r}'s {prev.lr_multipliers}, but handoff "
                    f"{resolved[i].handoff!r} keeps that optimizer and its parameter groups; "
                    "use handoff: reset to rebuild them"
                )
        for i, stage in enumerate(self.stages):
            if stage.advance is None:
                continue
            keyed = [e.produced_keys() for e in [*self.evals, *stage.evals]]
            produced = [k for keys in keyed if keys is not None for k in keys]
            custom = any(keys is None for keys in keyed)  # checked by fit's preflight
            if stage.advance.metric not in produced and not custom:
                raise ValueError(
                    f"stages[{i}].advance.metric: no evaluation of this stage produces "
                    f"{stage.advance.metric!r}; available: {produced}"
                )
            if stage.advance.min_duration is not None:
                unit_max = Duration.parse(stage.duration)
                unit_min = Duration.parse(stage.advance.min_duration)
                if unit_min.unit == unit_max.unit and unit_min.value > unit_max.value:
                    raise ValueError(
                        f"stages[{i}].advance.min_duration: {stage.advance.min_duration!r} is "
                        f"longer than the stage's duration {stage.duration!r}"
                    )
        if self.precision == "fp16" and self.parallel.kind == "fsdp":
            # torch's GradScaler checks each rank's own gradient shard for inf/NaN: the
            # ranks could disagree on skipping a step.
            raise ValueError(
                "precision: 'fp16' is not supported with parallel.kind 'fsdp' (its gradient "
                "scaler would decide per shard); use 'bf16', or parallel.mixed_precision"
            )
        eval_names = [e.name for e in self.evals] + [e.name for s in self.stages for e in s.evals]
        dupes = sorted({n for n in eval_names if eval_names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation names must be distinct; repeated: {dupes}")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """Stages with inherited fields filled in (optimizer, loss, batch size).

        A stage's ``optimizer`` block changes only the fields it names; the others are the
        previous stage's, unless it names another optimizer class (then its defaults)."""
        out: list[StageConfig] = []
        previous_optimizer = OptimizerConfig()
        previous_loss = [LossTerm(name="cross_entropy")]
        for stage in self.stages:
            optimizer = _inherit_optimizer(previous_optimizer, stage.optimizer)
            loss = stage.loss or previous_loss
            out.append(
                stage.model_copy(
                    update={
                        "optimizer": optimizer,
                        "loss": loss,
                        "batch_size": stage.batch_size or self.batch_size,
                    }
                )
            )
            previous_optimizer, previous_loss = optimizer, loss
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (in-memory datasets appear by name only)."""
        return self.model_dump(mode="json", exclude_none=True)

    def fingerprint_dict(self) -> dict[str, Any]:
        """What defines the curriculum for resume purposes (everything but log cadence)."""
        data = self.to_dict()
        for run_only in (
            "log_every",
            "checkpoint",
            "nonfinite",
            "precision",
            "compile",
            "data_workers",
            "pin_memory",
            "parallel",  # how the run is spread over ranks, not what it trains
        ):
            data.pop(run_only, None)
        return data

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`fingerprint_dict`."""
        text = json.dumps(self.fingerprint_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _same_optimizer_class(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()  # torch.optim names are matched in any case
    return bool(a is b)


def _inherit_optimizer(previous: OptimizerConfig, given: OptimizerConfig | None) -> OptimizerConfig:
    """``given``'s fields over ``previous``'s: a later stage that sets only its LR keeps the
    weight decay, betas and clipping of the stage before."""
    if given is None:
        return previous
    named = given.model_fields_set
    if "name" in named and not _same_optimizer_class(given.name, previous.name):
        return given  # another class: its own defaults, not another optimizer's settings
    return previous.model_copy(update={field: getattr(given, field) for field in named})

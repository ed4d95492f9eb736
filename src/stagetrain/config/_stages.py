"""A stage, and the run-wide settings around it: checkpoints, global LR, non-finite losses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from stagetrain.config._base import _check_duration, _Config, check_name
from stagetrain.config._sources import DataConfig
from stagetrain.config._training import (
    AdvanceConfig,
    EvalConfig,
    Handoff,
    LossTerm,
    OptimizerConfig,
    PacingConfig,
)
from stagetrain.schedules import ConstantSchedule, ScheduleConfig


class StageConfig(_Config):
    """One stage of the curriculum: data, loss, optimizer, hand-off and duration."""

    name: str
    data: DataConfig
    duration: str
    """How long the stage runs: '500ba', '64000sp', '1e6tok', '2ep' or '0.5dur' of ``total``."""
    loss: list[LossTerm] | None = None
    """Loss terms; inherited from the previous stage when omitted (the first stage's
    default is ``cross_entropy``)."""
    optimizer: OptimizerConfig | None = None
    """Inherited from the previous stage when omitted (the first stage gets the defaults)."""
    handoff: Handoff = "carry"
    """What crosses into this stage: carry (optimizer state, no warmup), rewarm (state,
    warmup restarts), reset (fresh optimizer, warmup)."""
    freeze: list[str] = Field(default_factory=list)
    """Glob patterns of parameter names kept fixed during this stage (``"encoder.*"``)."""
    batch_size: int | None = Field(default=None, gt=0)
    """Global batch size; defaults to the curriculum's ``batch_size``."""
    seq_len: int | None = Field(default=None, gt=0)
    """Truncate token sequences to this length (inputs, and targets of the same length)."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step: each rank's share of the batch is split this many ways."""
    evals: list[EvalConfig] = Field(default_factory=list)
    """Evaluation sets run only during this stage (in addition to the curriculum's)."""
    pacing: PacingConfig | None = None
    """Reveal the stage's data gradually by difficulty (needs one source with ``difficulty``)."""
    advance: AdvanceConfig | None = None
    """End the stage early on a metric; ``duration`` is then the maximum."""

    @model_validator(mode="after")
    def _pacing_source(self) -> StageConfig:
        if self.pacing is not None:
            sources = self.data.sources
            if len(sources) != 1 or sources[0].difficulty is None or self.data.replay:
                raise ValueError(
                    "pacing needs exactly one data source with a 'difficulty' scorer and no replay"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _loss_shorthand(cls, data: Any) -> Any:
        loss = data.get("loss") if isinstance(data, dict) else None
        if isinstance(loss, str | dict | LossTerm) or (
            callable(loss) and not isinstance(loss, list)
        ):
            data = {**data, "loss": [loss]}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("duration")
    @classmethod
    def _duration(cls, value: str) -> str:
        _check_duration(value)
        return value

    @field_validator("loss")
    @classmethod
    def _nonempty_loss(cls, value: list[LossTerm] | None) -> list[LossTerm] | None:
        if value is not None and not value:
            raise ValueError("a stage needs at least one loss term")
        return value


class CheckpointConfig(_Config):
    """When checkpoints are written and how many are kept."""

    every: str | None = None
    """Interval (a duration); checkpoints are also written at each stage end."""
    keep: int = Field(default=3, ge=1)
    async_save: bool = False
    """Write checkpoints in the background: training waits only while the state is
    copied to host memory (``parallel: fsdp``: ``torch.distributed.checkpoint.async_save``;
    ``ddp``: a writer thread). A checkpoint is listed in the manifest only once written."""

    @field_validator("every")
    @classmethod
    def _every(cls, value: str | None) -> str | None:
        return _check_duration(value)


class GlobalLR(_Config):
    """One learning-rate schedule over the whole run (global steps), overriding the stages'."""

    lr: float = Field(gt=0)
    schedule: ScheduleConfig = Field(default_factory=ConstantSchedule)


class NonFiniteConfig(_Config):
    """What happens when the loss is NaN or infinite.

    ``raise`` (default) stops with an error naming the step, stage and loss terms; it
    checks on the device and reads back only at logging and checkpoint time, so it costs
    no per-step synchronisation. ``skip`` drops the batch's update (at most
    ``max_consecutive_skips`` in a row). ``rollback`` restores the newest checkpoint and
    multiplies the learning rate by ``rollback_lr_factor`` (at most ``max_rollbacks``
    times). ``skip`` and ``rollback`` read the loss back every step.
    """

    policy: Literal["raise", "skip", "rollback"] = "raise"
    max_consecutive_skips: int = Field(default=10, ge=1)
    rollback_lr_factor: float = Field(default=0.5, gt=0, lt=1)
    max_rollbacks: int = Field(default=3, ge=1)

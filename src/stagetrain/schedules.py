"""Schedules: pure functions from (stage-local) step to a value.

A schedule holds no state, so a checkpoint only needs the step counter to restore
it. The same machinery drives learning-rate multipliers, sequence lengths,
mixture weights and sampling probabilities.

:func:`join` is the multi-stage primitive: each schedule after a boundary sees the
time elapsed since that boundary (stage-local time), so two-stage training is
``join([s1, s2], [n1])`` and nothing special.

Example:
    >>> warmup_cosine = join([linear(0.0, 1.0, 10), cosine(1.0, 0.1, 90)], [10])
    >>> warmup_cosine(0), warmup_cosine(10), round(warmup_cosine(100), 6)
    (0.0, 1.0, 0.1)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from stagetrain.time import Duration, TimeContext

Schedule = Callable[[float], float]
"""A pure function ``step -> value``."""


def constant(value: float) -> Schedule:
    """``f(t) = value`` for every t."""

    def schedule(step: float) -> float:
        return value

    # Marks the schedule as constant, so that a mixture can use closed-form counts.
    schedule.constant_value = value  # type: ignore[attr-defined]
    return schedule


def linear(start: float, end: float, steps: int) -> Schedule:
    """Linear interpolation: ``f(t) = start + (end - start) * min(t, steps) / steps``."""

    def schedule(step: float) -> float:
        frac = min(max(step, 0.0), steps) / steps if steps > 0 else 1.0
        return start + (end - start) * frac

    return schedule


def cosine(start: float, end: float, steps: int) -> Schedule:
    """Half-cosine from ``start`` to ``end``.

    ``f(t) = end + (start - end) * (1 + cos(pi * min(t, steps) / steps)) / 2``.
    """

    def schedule(step: float) -> float:
        frac = min(max(step, 0.0), steps) / steps if steps > 0 else 1.0
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return schedule


def piecewise_constant(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    """Step schedule: ``values[i]`` on ``[boundaries[i-1], boundaries[i])``.

    ``len(values) == len(boundaries) + 1``; a boundary step already takes the next value.
    """
    if len(values) != len(boundaries) + 1:
        raise ValueError("piecewise_constant needs len(values) == len(boundaries) + 1")
    bounds = list(boundaries)

    def schedule(step: float) -> float:
        return values[bisect.bisect_right(bounds, step)]

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on, in time local to that boundary.

    ``f(t) = schedules[i](t - boundaries[i-1])`` where ``i`` is the number of boundaries
    ``<= t``. At a boundary step the next schedule already applies, at its time 0.
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError("join needs len(schedules) == len(boundaries) + 1")
    starts = [0, *boundaries]

    def schedule(step: float) -> float:
        index = bisect.bisect_right(starts, step) - 1
        index = max(index, 0)
        return schedules[index](step - starts[index])

    return schedule


def warmup_stable_decay(
    peak: float, warmup: int, stable: int, decay: int, end: float = 0.0, start: float = 0.0
) -> Schedule:
    """Warmup-stable-decay: linear ``start -> peak``, hold ``peak``, linear ``peak -> end``."""
    return join(
        [linear(start, peak, warmup), constant(peak), linear(peak, end, decay)],
        [warmup, warmup + stable],
    )


# --- Config: how a schedule is written in a curriculum file. ------------------------


class _ScheduleBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConstantSchedule(_ScheduleBase):
    """A constant value (the LR multiplier 1.0 by default)."""

    kind: Literal["constant"] = "constant"
    value: float = 1.0

    def build(self, span_steps: int, ctx: TimeContext) -> Schedule:
        return constant(self.value)


class LinearSchedule(_ScheduleBase):
    """Linear from ``start`` to ``end`` over ``length`` (the whole span by default)."""

    kind: Literal["linear"] = "linear"
    start: float = 1.0
    end: float = 0.0
    length: str | None = None

    def build(self, span_steps: int, ctx: TimeContext) -> Schedule:
        return linear(self.start, self.end, _length(self.length, span_steps, ctx, "linear.length"))


class CosineSchedule(_ScheduleBase):
    """Half-cosine from ``start`` to ``end`` over ``length`` (the whole span by default)."""

    kind: Literal["cosine"] = "cosine"
    start: float = 1.0
    end: float = 0.0
    length: str | None = None

    def build(self, span_steps: int, ctx: TimeContext) -> Schedule:
        return cosine(self.start, self.end, _length(self.length, span_steps, ctx, "cosine.length"))


class WarmupSchedule(_ScheduleBase):
    """Linear warmup from ``start`` to ``end`` over ``length``, then hold ``end``."""

    kind: Literal["warmup"] = "warmup"
    length: str
    start: float = 0.0
    end: float = 1.0

    def build(self, span_steps: int, ctx: TimeContext) -> Schedule:
        return linear(self.start, self.end, _length(self.length, span_steps, ctx, "warmup.length"))


class WSDSchedule(_ScheduleBase):
    """Warmup-stable-decay: warmup ``warmup``, decay over the last ``decay`` of the span."""

    kind: Literal["wsd"] = "wsd"
    warmup: str = "0.05dur"
    decay: str = "0.2dur"
    peak: float = 1.0
    end: float = 0.0

    def build(self, span_steps: int, ctx: TimeContext) -> Schedule:
        warm = _length(self.warmup, span_steps, ctx, "wsd.warmup")
        decay = _length(self.decay, span_steps, ctx, "wsd.decay")
        stable = max(span_steps - warm - decay, 0)
        return warmup_stable_decay(self.peak, warm, stable, decay, self.end)


class StepSchedule(_ScheduleBase):
    """Piecewise constant: ``values[i]`` until ``boundaries[i]`` (durations in the span)."""

    kind: Literal["step"] = "step"
    boundaries: list[str]
    values: list[float]

    def build(self, span_steps: int, ctx: TimeContext) -> Schedule:
        if len(self.values) != len(self.boundaries) + 1:
            from stagetrain.errors import ConfigError

            raise ConfigError(
                f"step schedule: needs one more value than boundaries, got "
                f"{len(self.values)} values and {len(self.boundaries)} boundaries"
            )
        steps = [
            _length(b, span_steps, ctx, f"step.boundaries[{i}]")
            for i, b in enumerate(self.boundaries)
        ]
        return piecewise_constant(steps, self.values)


class JoinPart(_ScheduleBase):
    """One piece of a joined schedule; ``length`` omitted on the last piece = the rest."""

    schedule: ScheduleConfig
    length: str | None = None
    scale: float = 1.0
    """Multiplies this piece's values (joins stages whose peak LRs differ)."""


class JoinSchedule(_ScheduleBase):
    """Pieces run one after another, each in its own local time (see :func:`join`)."""

    kind: Literal["join"] = "join"
    parts: list[JoinPart] = Field(min_length=1)

    def build(self, span_steps: int, ctx: TimeContext) -> Schedule:
        schedules: list[Schedule] = []
        boundaries: list[int] = []
        elapsed = 0
        for i, part in enumerate(self.parts):
            last = i == len(self.parts) - 1
            length = (
                span_steps - elapsed
                if part.length is None
                else _length(part.length, span_steps, ctx, f"join.parts[{i}].length")
            )
            piece = part.schedule.build(max(length, 1), ctx)
            schedules.append(piece if part.scale == 1.0 else _scaled(piece, part.scale))
            elapsed += length
            if not last:
                boundaries.append(elapsed)
        return join(schedules, boundaries)


ScheduleConfig = Annotated[
    ConstantSchedule
    | LinearSchedule
    | CosineSchedule
    | WarmupSchedule
    | WSDSchedule
    | StepSchedule
    | JoinSchedule,
    Field(discriminator="kind"),
]
"""Any schedule as written in a config, told apart by its ``kind`` field."""

JoinPart.model_rebuild()


def _scaled(schedule: Schedule, factor: float) -> Schedule:
    def scaled(step: float) -> float:
        return factor * schedule(step)

    return scaled


def _length(text: str | None, span_steps: int, ctx: TimeContext, field: str) -> int:
    """Length of a schedule piece in steps; ``None`` means the whole span."""
    if text is None:
        return span_steps
    span_ctx = TimeContext(ctx.batch_size, ctx.tokens_per_sample, ctx.epoch_samples, span_steps)
    return span_ctx.to_steps(Duration.parse(text, field=field), field=field)

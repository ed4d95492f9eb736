"""Time units, parsed and converted in one place.

A duration is written as a number followed by a unit:

====== ===================================== ===========
unit   meaning                               example
====== ===================================== ===========
``ba`` optimizer steps (batches)              ``"500ba"``
``sp`` samples                                ``"64000sp"``
``tok`` tokens                                ``"1e6tok"``
``ep`` epochs over the stage's data           ``"2ep"``
``dur`` fraction of the enclosing span        ``"0.5dur"``
====== ===================================== ===========

``dur`` is relative to whatever encloses the duration: a stage's ``duration`` is a
fraction of the curriculum's ``total``; a length inside a stage's schedule is a
fraction of that stage.

Every conversion to steps goes through :meth:`TimeContext.to_steps`, so there is
exactly one place that knows how a sample, a token or an epoch relates to a step.

Durations are bounded, so that a typo such as ``1e400ba`` (infinity once parsed) or
``1e15ba`` is a clear error instead of an overflow or an attempt to plan 10^15 steps:

========= ============== ===============================================================
unit      at most        why this bound
========= ============== ===============================================================
``ba``    10^12 steps    ~30 years at 1000 steps/s; also the bound after any conversion
``sp``    10^15 samples  keeps cumulative sample counts exact in float64 (< 2^53 ~ 9e15)
``tok``   10^18 tokens   ~100,000x the largest published pre-training runs (~10^13)
``ep``    10^9 epochs
``dur``   1 (the span)
========= ============== ===============================================================

A stage converted to steps must also stay within 10^12 steps and 10^15 samples
(steps x batch size), whatever unit it was written in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

from stagetrain.errors import ConfigError


class TimeUnit(str, Enum):
    """The units a :class:`Duration` can be written in."""

    STEP = "ba"
    SAMPLE = "sp"
    TOKEN = "tok"
    EPOCH = "ep"
    FRACTION = "dur"


MAX_STEPS = 10**12
"""Most optimizer steps a duration (or a stage, after conversion) may last."""
MAX_SAMPLES = 10**15
"""Most samples a stage may draw: cumulative counts stay exact in float64 below 2^53."""
MAX_VALUE = {
    TimeUnit.STEP: float(MAX_STEPS),
    TimeUnit.SAMPLE: float(MAX_SAMPLES),
    TimeUnit.TOKEN: 1e18,
    TimeUnit.EPOCH: 1e9,
    TimeUnit.FRACTION: 1.0,
}
"""Largest value a duration may be written with, per unit (see the module docstring)."""
_UNIT_WORDS = {
    TimeUnit.STEP: "steps",
    TimeUnit.SAMPLE: "samples",
    TimeUnit.TOKEN: "tokens",
    TimeUnit.EPOCH: "epochs",
    TimeUnit.FRACTION: "of the span",
}

_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(ba|sp|tok|ep|dur)\s*$")


@dataclass(frozen=True)
class Duration:
    """An amount of training time in one :class:`TimeUnit`.

    Example:
        >>> Duration.parse("1e6tok")
        Duration(value=1000000.0, unit=<TimeUnit.TOKEN: 'tok'>)
        >>> str(Duration.parse("500ba"))
        '500ba'
    """

    value: float
    unit: TimeUnit

    @classmethod
    def parse(cls, text: str | Duration, *, field: str = "duration") -> Duration:
        """Parse ``"500ba"``-style text; ``field`` names the config field in errors."""
        if isinstance(text, Duration):
            return text
        where = f"{field}: " if field else ""
        if not isinstance(text, str):
            raise ConfigError(
                f"{where}expected a duration string like '500ba', '2ep', '1e6tok' or "
                f"'0.5dur', got {type(text).__name__} {text!r}"
            )
        match = _DURATION_RE.match(text)
        if match is None:
            raise ConfigError(
                f"{where}cannot parse {text!r}; expected a number followed by one of "
                "ba (steps), sp (samples), tok (tokens), ep (epochs), dur (fraction)"
            )
        value = float(match.group(1))
        unit = TimeUnit(match.group(2))
        if not value > 0:
            raise ConfigError(f"{where}duration must be positive, got {text!r}")
        if unit is TimeUnit.FRACTION and value > 1:
            raise ConfigError(f"{where}a fraction ('dur') must be in (0, 1], got {text!r}")
        if not value <= MAX_VALUE[unit]:  # also catches inf (1e400) and nan
            raise ConfigError(
                f"{where}{text.strip()!r} is too long: a duration in {unit.value!r} is at most "
                f"{MAX_VALUE[unit]:.0e} {_UNIT_WORDS[unit]}"
            )
        if unit is TimeUnit.STEP and value != int(value):
            raise ConfigError(f"{where}a number of steps must be whole, got {text!r}")
        return cls(value, unit)

    def scaled(self, factor: float) -> Duration:
        """This duration multiplied by ``factor`` (in the same unit)."""
        return Duration(self.value * factor, self.unit)

    def __str__(self) -> str:
        value = int(self.value) if self.value == int(self.value) else self.value
        return f"{value}{self.unit.value}"


@dataclass(frozen=True)
class TimeContext:
    """What it takes to turn any duration into optimizer steps for one stage.

    Attributes:
        batch_size: global samples per optimizer step.
        tokens_per_sample: tokens in one sample (the sequence length for token data, 1
            otherwise).
        epoch_samples: samples in one epoch of the stage's data (sum of its sources).
        enclosing_steps: length in steps of the span that ``dur`` is a fraction of,
            or ``None`` when that span is unknown (then ``dur`` is an error).
    """

    batch_size: int
    tokens_per_sample: int = 1
    epoch_samples: int | None = None
    enclosing_steps: int | None = None

    def to_steps(self, duration: Duration, *, field: str = "duration") -> int:
        """Convert ``duration`` to a whole number of steps, rounding up.

        Rounding up means a stage never trains on fewer samples or tokens than asked.
        """
        value, unit = duration.value, duration.unit
        if unit is TimeUnit.STEP:
            steps = value
        elif unit is TimeUnit.SAMPLE:
            steps = value / self.batch_size
        elif unit is TimeUnit.TOKEN:
            steps = value / (self.batch_size * self.tokens_per_sample)
        elif unit is TimeUnit.EPOCH:
            if self.epoch_samples is None:
                raise ConfigError(f"{field}: 'ep' needs a stage whose data size is known")
            steps = value * self.epoch_samples / self.batch_size
        else:
            if self.enclosing_steps is None:
                raise ConfigError(
                    f"{field}: {duration} is a fraction of a total that is not set; "
                    "give the curriculum a 'total' duration or use another unit"
                )
            steps = value * self.enclosing_steps
        if not steps <= MAX_STEPS:
            raise ConfigError(
                f"{field}: {duration} is {steps:.3g} steps; at most {MAX_STEPS:.0e} steps are "
                "allowed (check the unit and the batch size)"
            )
        # A tiny tolerance so that 0.3 * 1000 = 300.00000000000006 stays 300 steps.
        whole = max(1, math.ceil(steps - 1e-9))
        if whole * self.batch_size > MAX_SAMPLES:
            raise ConfigError(
                f"{field}: {duration} is {whole * self.batch_size:.2g} samples "
                f"({whole:,} steps of {self.batch_size:,}); at most {MAX_SAMPLES:.0e} samples "
                "are allowed"
            )
        return whole

    def samples(self, steps: int) -> int:
        """Samples seen in ``steps`` steps."""
        return steps * self.batch_size

    def tokens(self, steps: int) -> int:
        """Tokens seen in ``steps`` steps."""
        return steps * self.batch_size * self.tokens_per_sample


@dataclass(frozen=True)
class Counters:
    """The counters an interval is measured in, at one moment of a run."""

    step: int
    samples: int
    tokens: int


class Interval:
    """ "Every N units" (``eval_every``, ``checkpoint.every``) as a crossing test.

    Steps, samples and tokens count globally, so the arms of a comparison evaluate at
    the same amount of data; epochs and fractions are converted to steps per stage.
    """

    def __init__(self, text: str | None, *, field: str = "every") -> None:
        self.duration = Duration.parse(text, field=field) if text else None

    def due(self, before: Counters, after: Counters, stage_step: int, context: TimeContext) -> bool:
        """Whether a multiple of the interval was crossed between ``before`` and ``after``
        (``stage_step``: the stage-local step reached, for epoch and fraction units)."""
        if self.duration is None:
            return False
        unit, every = self.duration.unit, self.duration.value
        if unit is TimeUnit.STEP:
            return math.floor(after.step / every) > math.floor(before.step / every)
        if unit is TimeUnit.SAMPLE:
            return math.floor(after.samples / every) > math.floor(before.samples / every)
        if unit is TimeUnit.TOKEN:
            return math.floor(after.tokens / every) > math.floor(before.tokens / every)
        return stage_step % context.to_steps(self.duration, field="every") == 0

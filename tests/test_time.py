import re

import pytest

from stagetrain import ConfigError, Duration, TimeContext, TimeUnit


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [
        ("500ba", 500, TimeUnit.STEP),
        ("64000sp", 64000, TimeUnit.SAMPLE),
        ("1e6tok", 1_000_000, TimeUnit.TOKEN),
        ("2ep", 2, TimeUnit.EPOCH),
        ("0.5dur", 0.5, TimeUnit.FRACTION),
        (" 3 ba ", 3, TimeUnit.STEP),
    ],
)
def test_parse(text: str, value: float, unit: TimeUnit) -> None:
    d = Duration.parse(text)
    assert (d.value, d.unit) == (value, unit)


@pytest.mark.parametrize(
    ("duration", "steps"),
    [
        ("100ba", 100),
        ("3200sp", 100),  # 3200 / 32
        ("3201sp", 101),  # rounded up: never fewer samples than asked
        ("409600tok", 100),  # / (32 * 128)
        ("2ep", 625),  # 2 * 10000 / 32 = 625
        ("0.3dur", 300),  # of the 1000-step enclosing span, no float creep to 301
    ],
)
def test_to_steps(duration: str, steps: int) -> None:
    ctx = TimeContext(
        batch_size=32, tokens_per_sample=128, epoch_samples=10_000, enclosing_steps=1000
    )
    assert ctx.to_steps(Duration.parse(duration)) == steps


def test_samples_and_tokens() -> None:
    ctx = TimeContext(batch_size=8, tokens_per_sample=64)
    assert ctx.samples(10) == 80
    assert ctx.tokens(10) == 5120


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0ba", "must be positive"),
        ("-5ba", "cannot parse"),
        ("10", "cannot parse"),
        ("10 parsecs", "cannot parse"),
        ("1.5dur", "in (0, 1]"),
        ("2.5ba", "whole"),
        (12, "expected a duration string"),
    ],
)
def test_bad_durations(text: object, message: str) -> None:
    with pytest.raises(
        ConfigError,
        match="stages.duration: .*"
        + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        Duration.parse(text, field="stages.duration")  # type: ignore[arg-type]


def test_fraction_without_enclosing_span_is_an_error() -> None:
    with pytest.raises(ConfigError, match="total"):
        TimeContext(batch_size=4).to_steps(Duration.parse("0.5dur"))


# --- bounds: a duration is a finite, sane amount of training ------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1e400ba", "at most 1e+12 steps"),  # float('inf') once parsed
        ("1e13ba", "at most 1e+12 steps"),
        ("1e16sp", "at most 1e+15 samples"),
        ("1e19tok", "at most 1e+18 tokens"),
        ("1e10ep", "at most 1e+09 epochs"),
        ("1e999999dur", "in (0, 1]"),
    ],
)
def test_durations_are_bounded(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"stages\[0\]\.duration: .*" + re.escape(message)):
        Duration.parse(text, field="stages[0].duration")


def test_the_bounds_themselves_parse() -> None:
    assert Duration.parse("1e12ba").value == 1e12
    assert Duration.parse("1e15sp").value == 1e15


@pytest.mark.parametrize(
    ("ctx", "duration"),
    [
        (TimeContext(batch_size=1), "1e15sp"),  # 1e15 steps of one sample
        (TimeContext(batch_size=1, tokens_per_sample=1), "1e18tok"),
        (TimeContext(batch_size=1, epoch_samples=10**6), "1e9ep"),
    ],
)
def test_converted_steps_are_bounded(ctx: TimeContext, duration: str) -> None:
    with pytest.raises(
        ConfigError, match=r"stages\[1\]\.duration: .* is 1e\+1[0-9] steps; at most 1e\+12"
    ):
        ctx.to_steps(Duration.parse(duration), field="stages[1].duration")


def test_converted_samples_are_bounded() -> None:
    # 1e12 steps is allowed, but not 1e12 steps of 4096 samples each.
    with pytest.raises(
        ConfigError, match=r"duration: 1000000000000ba is 4\.1e\+15 samples .* at most 1e\+15"
    ):
        TimeContext(batch_size=4096).to_steps(Duration.parse("1e12ba"))

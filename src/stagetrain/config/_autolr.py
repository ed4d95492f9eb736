"""``optimizer.auto``: the options of the ``lr: auto`` search."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from stagetrain.config._base import _Config


class AutoLRConfig(_Config):
    """``lr: auto``: how a stage's peak learning rate is searched at its start.

    The search (see :mod:`stagetrain.lr_search`) runs, from the weights and optimizer
    state right after the stage's hand-off and on the stage's own data, an LR range test
    of ``range_steps`` steps, then successive halving over ``candidates`` LRs around its
    pick, scored by the stage's loss on a held-out slice of ``holdout`` samples; then the
    weights, optimizer state and random generators are put back and the stage trains
    with the chosen LR (times its warmup and schedule). Its budget, in the stage's steps,
    is ``range_steps`` plus ``n_k x trial_steps x eta^k`` over the halving rungs (``n_0 =
    candidates``, ``n_(k+1) = n_k // eta``, down to two candidates).
    """

    range_steps: int = Field(default=100, ge=5)
    """Steps of the range test (the LR grows by the same factor every step). A count, not
    a share of the stage: the edge depends on how fast the LR ramps (on the development
    set, benchmarks/lr_auto_dev.py, a 25-step ramp put it up to 9x above a 200-step one)."""
    lr_min: float = Field(default=1e-6, gt=0)
    """LR of the range test's first step."""
    lr_max: float = Field(default=1.0, gt=0)
    """LR of its last step (the test stops early once the loss diverges)."""
    rule: Literal["divergence", "steepest"] = "divergence"
    """The range test's pick: ``divergence``: ``fraction`` x the edge — the LR where the
    smoothed loss is lowest, or on a plateau the last one before the loss rises above its
    starting level; ``steepest``: the LR below the edge where the smoothed loss falls
    fastest against log(LR)."""
    fraction: float = Field(default=0.5, gt=0, le=1)
    """``divergence`` rule: the pick as a fraction of the edge (the top of the default
    ``below`` ladder: half the edge, where a noise-free quadratic's best LR lies, down
    to the edge / 160 where a noisy-label stage's can)."""
    smoothing: float = Field(default=0.8, ge=0, lt=1)
    """Factor of the exponential moving average that smooths the range test's loss."""
    divergence: float = Field(default=4.0, gt=1)
    """The loss has diverged once it exceeds this many times its lowest (range test) or its
    value at the stage's start (a trial's held-out loss), or is not finite."""
    candidates: int = Field(default=5, ge=1)
    """LRs tried by successive halving: the pick x ``spread``^k (see ``ladder``)."""
    spread: float = Field(default=10**0.5, gt=1)
    """Factor between neighbouring candidates (default sqrt(10): five span 10^2)."""
    ladder: Literal["below", "centred"] = "below"
    """Where the candidates lie: ``below`` the pick (k = 0, -1, ..., the pick the largest)
    or ``centred`` on it. ``below`` by default: short trials favour LRs above the one that
    is best over the whole stage (the short-horizon bias), so a ladder that reaches above
    the pick tends to choose too high; on the development set (benchmarks/lr_auto_dev.py)
    ``below`` from half the edge by sqrt(10) had a lower mean and worst-case regret than
    ``centred`` on a tenth of it by 2 (the former defaults)."""
    trial_steps: int | float = 20
    """Steps of each candidate in the first rung (each later rung trains ``eta`` x longer):
    a count, or a fraction in (0, 0.5] of the stage's steps (at least one step), so that
    the trials' horizon grows with the stage's."""
    eta: int = Field(default=2, ge=2)
    """Each rung keeps the best ``1 / eta`` of the candidates."""
    holdout: int | float = 512
    """Held-out samples that score the candidates: a count, or a fraction (at most 0.5) of
    the stage's data; at most half of every source is held out."""
    count_budget: bool = False
    """Count the search's training steps in the stage's duration (the stage then trains
    for its duration minus the search), for comparisons at an equal budget. Either way
    the search's samples are reported (log, checkpoint, ``summary.json``)."""

    @field_validator("holdout")
    @classmethod
    def _holdout(cls, value: int | float) -> int | float:
        if isinstance(value, bool) or value <= 0:
            raise ValueError(f"must be a positive count or a fraction in (0, 0.5], got {value!r}")
        if isinstance(value, float) and value > 0.5:
            raise ValueError(f"a fraction of the stage's data must be at most 0.5, got {value}")
        return value

    @field_validator("trial_steps")
    @classmethod
    def _trial_steps(cls, value: int | float) -> int | float:
        if not (
            (isinstance(value, int) and value >= 1)
            or (isinstance(value, float) and 0 < value <= 0.5)
        ):
            raise ValueError(
                "must be a count of steps (an integer >= 1) or a fraction in (0, 0.5] "
                f"of the stage's steps, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _range(self) -> AutoLRConfig:
        if not self.lr_min < self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min:g}) must be below lr_max ({self.lr_max:g})")
        return self

    def trial_length(self, stage_steps: int) -> int:
        """Steps of a first-rung trial in a stage of ``stage_steps`` steps."""
        if isinstance(self.trial_steps, int):
            return self.trial_steps
        return max(1, round(self.trial_steps * stage_steps))

    def rungs(self, stage_steps: int) -> list[tuple[int, int]]:
        """(candidates, steps each) of every successive-halving rung, first to last, in a
        stage of ``stage_steps`` steps (its duration, before a counted search is taken off)."""
        out, count, steps = [], self.candidates, self.trial_length(stage_steps)
        while True:
            out.append((count, steps))
            count //= self.eta
            if count < 2:
                return out
            steps *= self.eta

    def search_steps(self, stage_steps: int) -> int:
        """Training steps of the whole search (range test plus every trial), at most, in a
        stage of ``stage_steps`` steps."""
        rungs = self.rungs(stage_steps)
        return self.range_steps + sum(count * steps for count, steps in rungs)

"""Checks of an ``lr: auto`` stage before training, and its description in ``plan``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stagetrain.apportion import apportion
from stagetrain.config import AutoLRConfig, CurriculumConfig, StageConfig
from stagetrain.errors import ConfigError
from stagetrain.optim import takes_lr

if TYPE_CHECKING:
    from stagetrain.curriculum import Stage


# --- checks before training -----------------------------------------------------------------


def training_steps(cfg: StageConfig, steps: int, *, field: str) -> int:
    """The steps a stage trains: its duration, less the search's when it is counted.

    Raises:
        ConfigError: when the search needs more steps than the stage has.
    """
    opt = cfg.optimizer
    if opt is None or not opt.is_auto:
        return steps
    auto = opt.search
    need = auto.search_steps(steps)
    counted = auto.count_budget
    if need > steps or (counted and need >= steps):
        raise ConfigError(
            f"{field}.optimizer.auto: the LR search trains {need:,} steps "
            f"({auto.range_steps} range test + {need - auto.range_steps:,} trials), "
            f"{'not less than' if counted and need == steps else 'more than'} the stage's "
            f"{steps:,}; lower range_steps, trial_steps or candidates"
        )
    return steps - need if counted else steps


def horizon(stage: Stage) -> int:
    """The steps a search is sized by: the stage's duration (a counted search included)."""
    return stage.duration_steps or stage.steps


def check_stage(stage: Stage, config: CurriculumConfig) -> None:
    """An ``lr: auto`` stage can be searched: its optimizer has an LR, no ``global_lr``
    overrides it, and its data can spare the held-out slice.

    Raises:
        ConfigError: naming the field.
    """
    opt = stage.config.optimizer
    if opt is None or not opt.is_auto:
        return
    field = f"stages[{stage.index}].optimizer"
    if config.global_lr is not None:
        raise ConfigError(
            f"{field}.lr: 'auto' has no effect under global_lr, which sets every stage's "
            "LR; remove one of them"
        )
    if not takes_lr(opt, field=field):
        raise ConfigError(
            f"{field}.lr: 'auto' needs an optimizer with a learning rate; {opt.label} takes "
            "no 'lr' argument"
        )
    holdout_counts(stage, opt.search, field=f"{field}.auto.holdout")


def holdout_counts(stage: Stage, cfg: AutoLRConfig, *, field: str) -> np.ndarray:
    """Held-out samples per source: ``holdout`` shared by the mixture at the stage's start."""
    sizes = stage.data.sizes
    total = int(sizes.sum())
    wanted = cfg.holdout if isinstance(cfg.holdout, int) else round(cfg.holdout * total)
    counts = apportion(stage.weights, max(int(wanted), 1), 1)[0]
    for k, (count, size) in enumerate(zip(counts, sizes, strict=True)):
        if count > size // 2:
            label = stage.sources[k].label
            raise ConfigError(
                f"{field}: holding out {int(count):,} of the {int(size):,} samples of source "
                f"{label!r} would leave less than half for the search; the stage is too small "
                f"for a held-out slice of {cfg.holdout!r} (lower holdout)"
            )
    return counts


def describe_search(stage: Stage) -> str:
    """The search's budget in words, for ``plan`` ("" unless the stage's LR is ``auto``)."""
    opt = stage.config.optimizer
    if opt is None or not opt.is_auto:
        return ""
    auto = opt.search
    stage_steps = horizon(stage)
    steps = auto.search_steps(stage_steps)
    counted = "counted" if auto.count_budget else "not counted"
    # The held-out slice is scored at the start and after every trial (fewer when a
    # candidate diverges): forward passes only, never counted in the stage.
    field = f"stages[{stage.index}].optimizer.auto.holdout"
    held = int(holdout_counts(stage, auto, field=field).sum())
    trials = sum(count for count, _ in auto.rungs(stage_steps))
    return (
        f"search {steps:,} steps ({steps * stage.batch_size:,} samples, {counted}) "
        f"+ up to {held * (1 + trials):,} held-out forward samples"
    )


# --- how the search trains and scores ----------------------------------------------------------

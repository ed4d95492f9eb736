"""Control arms derived from one curriculum, under the same budget and LR trajectory.

====================== ===============================================================
arm                    what it trains on
====================== ===============================================================
``curriculum``         the curriculum as declared
``baseline``           the final stage's data only, one stage
``union``              every stage's data shuffled together (each sample equally likely)
``anti``               the stages in reverse order (same durations, reversed)
``easy-only``          the first stage's data only, one stage
``random-order``       the same stages and pacing, over a random difficulty order
====================== ===============================================================

Every derived arm has the curriculum's total budget and follows the curriculum's own
learning-rate trajectory through a ``global_lr`` (a join of each stage's warmup and
schedule, scaled to its peak LR). Nothing is tuned per arm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stagetrain.config import CurriculumConfig, GlobalLR, SourceConfig
from stagetrain.curriculum import Curriculum
from stagetrain.errors import ConfigError
from stagetrain.schedules import JoinPart, JoinSchedule, LinearSchedule

ARMS = ("curriculum", "baseline", "union", "anti", "easy-only", "random-order")
"""Every arm ``compare`` can derive, in display order."""


def curriculum_lr(curriculum: Curriculum) -> GlobalLR:
    """The curriculum's LR over global steps, as one config (a join of the stages' LRs)."""
    stages = curriculum.stages
    peak = stages[0].lr_peak
    parts = []
    for stage in stages:
        opt = stage.config.optimizer
        assert opt is not None
        scale = stage.lr_peak / peak
        if stage.warmup_steps:
            warm = JoinPart(
                schedule=LinearSchedule(start=0.0, end=1.0),
                length=f"{stage.warmup_steps}ba",
                scale=scale,
            )
            parts.append(warm)
            length = stage.steps - stage.warmup_steps
        else:
            length = stage.steps
        parts.append(JoinPart(schedule=opt.schedule, length=f"{length}ba", scale=scale))
    return GlobalLR(lr=peak, schedule=JoinSchedule(parts=parts))


def derive_arm(curriculum: Curriculum, arm: str) -> CurriculumConfig:
    """The config of ``arm``; raises :class:`ConfigError` when it cannot be derived."""
    if arm not in ARMS:
        raise ConfigError(f"arms: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    config = curriculum.config
    if config.global_lr is not None:
        raise ConfigError("global_lr: compare derives the arms' LR itself; remove global_lr")
    if arm == "curriculum":
        return config
    if arm == "random-order":
        if not any(s.pacing is not None for s in config.stages):
            raise ConfigError("arms: 'random-order' needs a stage with pacing")
        # Same stages, budget and LR (they are untouched); only the order changes.
        return config.model_copy(
            update={
                "stages": [
                    s
                    if s.pacing is None
                    else s.model_copy(
                        update={"pacing": s.pacing.model_copy(update={"order": "random"})}
                    )
                    for s in config.stages
                ]
            }
        )
    stages = config.resolved_stages()
    if len(stages) < 2 and arm in ("anti", "union", "easy-only"):
        raise ConfigError(f"arms: {arm!r} needs a curriculum of at least two stages")
    batch_sizes = sorted({s.batch_size or 0 for s in stages})
    if len(batch_sizes) != 1:
        raise ConfigError(
            f"arms: stages use different batch sizes {batch_sizes}; derived arms "
            "need one batch size so that budgets and LR trajectories line up step for step"
        )
    global_lr = curriculum_lr(curriculum)
    total = f"{curriculum.total_steps}ba"
    first_optimizer = stages[0].optimizer

    def one_stage(name: str, template_index: int, data: Any) -> CurriculumConfig:
        template = stages[template_index]
        stage = template.model_copy(
            update={
                "name": name,
                "data": data,
                "duration": total,
                "handoff": "carry",
                "optimizer": first_optimizer,
                "freeze": [],
            }
        )
        return config.model_copy(update={"stages": [stage], "global_lr": global_lr, "total": None})

    if arm == "baseline":
        final = stages[-1]
        return one_stage("baseline", -1, final.data.model_copy(update={"replay": 0.0}))
    if arm == "easy-only":
        return one_stage("easy-only", 0, stages[0].data.model_copy(update={"replay": 0.0}))
    if arm == "union":
        sources: list[SourceConfig] = []
        seen: set[str] = set()
        for stage, built in zip(stages, curriculum.stages, strict=True):
            for k, source in enumerate(stage.data.sources):
                label = source.label
                if label in seen:
                    continue
                seen.add(label)
                # weight = size: every sample of the union is equally likely
                size = len(built.data.datasets[k])
                sources.append(source.model_copy(update={"weight": float(size), "name": label}))
        data = stages[-1].data.model_copy(update={"sources": sources, "replay": 0.0})
        return one_stage("union", -1, data)
    # anti: the stages in reverse order, each keeping its own data, loss and length.
    reversed_stages = [
        s.model_copy(update={"duration": f"{built.steps}ba", "handoff": "carry", "freeze": []})
        for s, built in zip(reversed(stages), reversed(curriculum.stages), strict=True)
    ]
    if any(s.data.replay for s in reversed_stages):
        reversed_stages = [
            s.model_copy(update={"data": s.data.model_copy(update={"replay": 0.0})})
            for s in reversed_stages
        ]
    reversed_stages = [s.model_copy(update={"optimizer": first_optimizer}) for s in reversed_stages]
    return config.model_copy(
        update={"stages": reversed_stages, "global_lr": global_lr, "total": None}
    )


def parse_arms(text: str | Sequence[str]) -> list[str]:
    """Arm names from ``"curriculum,baseline"`` or a list, validated."""
    names = [a.strip() for a in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("arms: give at least one arm")
    for name in names:
        if name not in ARMS:
            raise ConfigError(f"arms: unknown arm {name!r}; choose from {', '.join(ARMS)}")
    return names

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


def curriculum_lr(curriculum: Curriculum, *, by_tokens: bool = False) -> GlobalLR:
    """The curriculum's LR over global steps, as one config (a join of the stages' LRs).

    With ``by_tokens`` the pieces are placed by the fraction of the token budget spent at
    each point, for arms whose steps hold a different number of tokens.
    """
    stages = curriculum.stages
    peak = stages[0].lr_peak
    total_tokens = sum(s.context.tokens(s.steps) for s in stages)

    def length(stage: Any, steps: int) -> str:
        if not by_tokens:
            return f"{steps}ba"
        return f"{stage.context.tokens(steps) / total_tokens!r}dur"

    parts = []
    for stage in stages:
        opt = stage.config.optimizer
        assert opt is not None
        scale = stage.lr_peak / peak
        body = stage.steps
        if stage.warmup_steps:
            warm = LinearSchedule(start=0.0, end=1.0)
            parts.append(
                JoinPart(schedule=warm, length=length(stage, stage.warmup_steps), scale=scale)
            )
            body = stage.steps - stage.warmup_steps
        parts.append(JoinPart(schedule=opt.schedule, length=length(stage, body), scale=scale))
    if by_tokens:  # the last piece takes whatever rounding left
        parts[-1] = parts[-1].model_copy(update={"length": None})
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
    # Stages whose samples hold different numbers of tokens (short then long context)
    # compare at an equal token budget; otherwise at an equal number of steps.
    by_tokens = len({s.context.tokens_per_sample for s in curriculum.stages}) > 1
    global_lr = curriculum_lr(curriculum, by_tokens=by_tokens)
    total_tokens = sum(s.context.tokens(s.steps) for s in curriculum.stages)
    total = f"{total_tokens}tok" if by_tokens else f"{curriculum.total_steps}ba"
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
        s.model_copy(
            update={
                "duration": f"{built.context.tokens(built.steps)}tok"
                if by_tokens
                else f"{built.steps}ba",
                "handoff": "carry",
                "freeze": [],
            }
        )
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

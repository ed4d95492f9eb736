"""The runtime curriculum: validated config turned into stages that produce batches.

:class:`Curriculum` is the functional core that both the built-in loop
(:func:`stagetrain.fit`) and a user's own loop drive. It knows, for every stage, how
many steps it lasts, which samples each step draws, the stage's loss and its
learning rate at every stage-local step. It holds no training progress: that lives
in the counters of :class:`TrainState`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagetrain.config import (
    CurriculumConfig,
    EvalConfig,
    SourceConfig,
    StageConfig,
    load_config,
)
from stagetrain.data import (
    Batch,
    ConcatSources,
    IndexSubset,
    SourceBuilder,
    fetch,
    tokens_per_sample,
    truncate,
)
from stagetrain.difficulty import DifficultyScorer, ScoreCache, select_indices
from stagetrain.errors import ConfigError
from stagetrain.losses import StageLoss
from stagetrain.pacing import PacedSampler, ordering, pacing_function
from stagetrain.registry import build_model
from stagetrain.sampler import StageSampler
from stagetrain.schedules import Schedule, constant, join, linear
from stagetrain.time import Duration, TimeContext, TimeUnit


@dataclass
class TrainState:
    """Training progress, as counters only: everything else is a function of these.

    ``step`` counts completed optimizer steps over the whole run; ``stage_step`` those
    of the current stage. When ``stage_step == 0`` the stage has not started yet (its
    hand-off has not been applied).
    """

    step: int = 0
    stage_index: int = 0
    stage_step: int = 0
    samples: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    plateau_best: float | None = None
    """Best value so far of the stage's advance metric (plateau rule)."""
    plateau_waits: int = 0
    """Evaluations in a row without improvement (plateau rule)."""
    lr_scale: float = 1.0
    """Multiplier on every LR, lowered by each NaN rollback."""
    rollbacks: int = 0
    skipped: int = 0
    """Batches whose update was skipped for a non-finite loss."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainState:
        return cls(**{k: data[k] for k in cls().__dict__})


@dataclass
class SourceShare:
    """A source of a stage and its share of the stage's samples (for the plan and logs)."""

    label: str
    size: int
    share: float
    replay: bool = False


@dataclass
class Stage:
    """One stage, built: data, sampler, loss, learning rate and length in steps."""

    index: int
    config: StageConfig
    steps: int
    context: TimeContext
    data: ConcatSources
    weights: list[Schedule]
    sources: list[SourceShare]
    loss: StageLoss
    warmup_steps: int
    lr_multiplier: Schedule
    seed: int
    planned_start: int = 0
    """Global step at which the stage starts when every earlier stage runs its full length."""
    global_lr: Schedule | None = None
    """The curriculum-wide LR (absolute, of the global step) when ``global_lr`` is set."""
    paced: tuple[np.ndarray, Schedule, np.ndarray | None] | None = None
    """(visibility order, pacing function, class labels) when the stage uses pacing."""
    _sampler: StageSampler | PacedSampler | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def batch_size(self) -> int:
        assert self.config.batch_size is not None
        return self.config.batch_size

    @property
    def lr_peak(self) -> float:
        """The stage's configured learning rate (before warmup and schedule)."""
        assert self.config.optimizer is not None
        return self.config.optimizer.lr

    @property
    def sampler(self) -> StageSampler | PacedSampler:
        """Built on first use: apportioning a long mixture takes a moment."""
        if self._sampler is None and self.paced is not None:
            order, pacing, labels = self.paced
            self._sampler = PacedSampler(
                order, pacing, self.batch_size, self.steps, self.seed, self.index, labels
            )
        if self._sampler is None:
            self._sampler = StageSampler(
                self.data.sizes, self.weights, self.batch_size, self.steps, self.seed, self.index
            )
        return self._sampler

    def lr(self, stage_step: int, step: int | None = None) -> float:
        """Learning rate at ``stage_step``: ``lr * warmup * schedule`` of the stage.

        With a curriculum-wide ``global_lr`` it is that schedule at the global ``step``
        (by default the planned global step of ``stage_step``).
        """
        if self.global_lr is not None:
            return self.global_lr(self.planned_start + stage_step if step is None else step)
        assert self.config.optimizer is not None
        return self.config.optimizer.lr * self.lr_multiplier(stage_step)

    def indices(self, stage_step: int, rank: int = 0, world_size: int = 1) -> Any:
        """Sample indices (into :attr:`data`) of this rank's share of ``stage_step``."""
        return self.sampler.rank_batch(stage_step, rank, world_size)

    def batch(self, stage_step: int, rank: int = 0, world_size: int = 1) -> Batch:
        """This rank's ``(inputs, targets)`` for ``stage_step``, truncated to ``seq_len``."""
        return truncate(
            self.data.get_batch(self.indices(stage_step, rank, world_size)), self.config.seq_len
        )


@dataclass(frozen=True)
class StepInfo:
    """One step of a curriculum, as seen from a user's own loop."""

    curriculum: Curriculum
    stage: Stage
    step: int
    """Global step (completed steps before this one)."""
    stage_step: int
    rank: int = 0
    world_size: int = 1

    @property
    def is_stage_start(self) -> bool:
        return self.stage_step == 0

    @property
    def lr(self) -> float:
        return self.stage.lr(self.stage_step, self.step)

    def batch(self) -> Batch:
        return self.stage.batch(self.stage_step, self.rank, self.world_size)

    def loss(
        self, output: torch.Tensor, target: torch.Tensor, model: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """The stage's weighted loss (built-in kl_distill needs the built-in loop; terms
        that read the model, such as a router cost, need ``model``)."""
        return self.stage.loss(output, target, model=model)[0]

    def set_lr(self, optimizer: torch.optim.Optimizer) -> float:
        """Write this step's learning rate into every param group; returns it."""
        lr = self.lr
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_multiplier", 1.0)
        return lr


class Curriculum:
    """A validated curriculum with its stages built.

    Args:
        config: the curriculum declaration.
        datasets: in-memory datasets referred to as ``"@name"`` in the config.
        has_teacher: whether a teacher model will be available (for ``kl_distill``);
            implied when the config declares ``teacher``.

    Raises:
        ConfigError: when a field is invalid (named in the message).
        DataError: when a data source cannot be built.
    """

    def __init__(
        self,
        config: CurriculumConfig,
        *,
        datasets: Mapping[str, Any] | None = None,
        has_teacher: bool = False,
        models: Mapping[str, torch.nn.Module] | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.sources = SourceBuilder(
            config.data_seed if config.data_seed is not None else config.seed, datasets
        )
        self.scorer = DifficultyScorer(
            seed=config.seed,
            cache=ScoreCache(cache_dir),
            models=models,
            default_model=config.model,
            progress=progress,
        )
        self._has_teacher = has_teacher or config.teacher is not None
        self.stages: list[Stage] = []
        for index, stage_config in enumerate(config.resolved_stages()):
            self.stages.append(self._build_stage(index, stage_config))
        for stage, start in zip(self.stages, self.start_steps, strict=True):
            stage.planned_start = start
        if config.global_lr is not None:
            peak = config.global_lr.lr
            shape = config.global_lr.schedule.build(self.total_steps, self.stages[0].context)
            run_lr: Schedule = lambda step: peak * shape(step)  # noqa: E731
            for stage in self.stages:
                stage.global_lr = run_lr

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Curriculum:
        """Load and build a curriculum from a YAML or TOML file."""
        return cls(load_config(path), **kwargs)

    # --- construction -----------------------------------------------------------------

    def _build_stage(self, index: int, cfg: StageConfig) -> Stage:
        field = f"stages[{index}]"
        built = [
            self._source(s, field=f"{field}.data.sources[{k}]")
            for k, s in enumerate(cfg.data.sources)
        ]
        own = [dataset for dataset, _ in built]
        batch_size = cfg.batch_size
        assert batch_size is not None and cfg.optimizer is not None
        epoch_samples = int(sum(len(d) for d in own))
        ctx = TimeContext(batch_size, tokens_per_sample(own[0], cfg.seq_len), epoch_samples)
        steps = self._stage_steps(cfg, ctx, field)
        ctx = TimeContext(ctx.batch_size, ctx.tokens_per_sample, ctx.epoch_samples, steps)
        own_weights = [_weight_schedule(s.weight, steps, ctx) for s in cfg.data.sources]
        datasets = list(own)
        weights: list[Schedule] = list(own_weights)
        labels = [(s.label, False) for s in cfg.data.sources]
        replay = cfg.data.replay
        if replay > 0:
            if index == 0:
                raise ConfigError(f"{field}.data.replay: the first stage has no earlier stage")
            weights = [_scaled_share(w, own_weights, 1 - replay) for w in own_weights]
            earlier = self.stages[:index]
            for prev in earlier:
                # Replay draws evenly from earlier stages and, within one, in proportion
                # to the source weights at that stage's start.
                prev_static = [w(0) for w in prev.weights[: len(prev.config.data.sources)]]
                total = sum(prev_static)
                for k, source in enumerate(prev.config.data.sources):
                    datasets.append(prev.data.datasets[k])
                    weights.append(constant(replay / len(earlier) * prev_static[k] / total))
                    labels.append((f"{prev.name}/{source.label}", True))
        data = ConcatSources(datasets)
        paced = None
        if cfg.pacing is not None:
            scores = built[0][1]
            assert scores is not None  # config validation: pacing needs a scored source
            order = ordering(scores, cfg.pacing.order, self.config.seed, index)
            class_labels = None
            if cfg.pacing.class_balanced:
                targets = fetch(own[0], np.arange(len(own[0])))[1]
                class_labels = targets.reshape(len(own[0]), -1)[:, 0].numpy()
            paced = (order, pacing_function(cfg.pacing, steps), class_labels)
        warmup_steps = 0
        if cfg.optimizer.warmup is not None and (index == 0 or cfg.handoff != "carry"):
            warmup_steps = min(
                ctx.to_steps(
                    Duration.parse(cfg.optimizer.warmup), field=f"{field}.optimizer.warmup"
                ),
                steps,
            )
        body = cfg.optimizer.schedule.build(max(steps - warmup_steps, 1), ctx)
        multiplier = (
            join([linear(0.0, 1.0, warmup_steps), body], [warmup_steps]) if warmup_steps else body
        )
        shares = [float(w(0)) for w in weights]
        total_share = sum(shares)
        return Stage(
            index=index,
            config=cfg,
            steps=steps,
            context=ctx,
            data=data,
            weights=weights,
            sources=[
                SourceShare(label, len(d), share / total_share, is_replay)
                for (label, is_replay), d, share in zip(labels, datasets, shares, strict=True)
            ],
            loss=StageLoss.build(cfg.loss, field=f"{field}.loss", has_teacher=self._has_teacher),
            warmup_steps=warmup_steps,
            lr_multiplier=multiplier,
            seed=self.config.seed,
            paced=paced,
        )

    def _source(self, source: SourceConfig, *, field: str) -> tuple[Any, np.ndarray | None]:
        """A source's dataset (restricted by ``select``) and its difficulty scores, if any."""
        dataset = self.sources.build(source, field=field)
        if source.difficulty is None:
            return dataset, None
        identity = json.dumps(
            {"builtin": source.builtin, "factory": source.factory, "ref": source.ref,
             "name": source.name if source.dataset is not None else None, "args": source.args,
             "seed": self.config.seed},
            sort_keys=True, default=str,
        )  # fmt: skip
        scores = self.scorer.scores(
            dataset, source.difficulty, identity=identity, field=f"{field}.difficulty"
        )
        if source.select is None:
            return dataset, scores
        keep = select_indices(scores, source.select)
        return IndexSubset(dataset, keep), scores[keep]

    def _stage_steps(self, cfg: StageConfig, ctx: TimeContext, field: str) -> int:
        duration = Duration.parse(cfg.duration, field=f"{field}.duration")
        if duration.unit is TimeUnit.FRACTION:
            assert self.config.total is not None  # checked by config validation
            duration = Duration.parse(self.config.total).scaled(duration.value)
        return ctx.to_steps(duration, field=f"{field}.duration")

    # --- queries ----------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        """Planned steps of the whole run (upper bound once stages can end early)."""
        return sum(s.steps for s in self.stages)

    @cached_property
    def start_steps(self) -> list[int]:
        """Planned global start step of every stage."""
        starts, acc = [], 0
        for stage in self.stages:
            starts.append(acc)
            acc += stage.steps
        return starts

    def state_at(self, step: int) -> TrainState:
        """Counters at global ``step`` of the planned timeline (stages run their full length)."""
        if not 0 <= step <= self.total_steps:
            raise ValueError(f"step {step} outside the curriculum's {self.total_steps} steps")
        samples = tokens = 0
        for stage, start in zip(self.stages, self.start_steps, strict=True):
            if step < start + stage.steps:
                local = step - start
                return TrainState(
                    step,
                    stage.index,
                    local,
                    samples + stage.context.samples(local),
                    tokens + stage.context.tokens(local),
                )
            samples += stage.context.samples(stage.steps)
            tokens += stage.context.tokens(stage.steps)
        return TrainState(step, len(self.stages), 0, samples, tokens)

    def stage_at(self, step: int) -> Stage:
        """The stage that global ``step`` belongs to in the planned timeline."""
        return self.stages[min(self.state_at(step).stage_index, len(self.stages) - 1)]

    def evals_for(self, stage: Stage) -> list[EvalConfig]:
        """Evaluation sets active during ``stage``: the curriculum's plus the stage's own."""
        return [*self.config.evals, *stage.config.evals]

    def eval_dataset(self, ev: EvalConfig) -> Any:
        return self.sources.build(ev.data, field=f"evals[{ev.name}].data")

    def steps(
        self, start: TrainState | None = None, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[StepInfo]:
        """Every step from ``start`` (the beginning by default) to the end, in order.

        The own-loop entry point: each :class:`StepInfo` gives the stage, the batch, the
        loss and the learning rate of that step.
        """
        state = start or TrainState()
        step = state.step
        for stage in self.stages[state.stage_index :]:
            first = state.stage_step if stage.index == state.stage_index else 0
            for stage_step in range(first, stage.steps):
                yield StepInfo(self, stage, step, stage_step, rank, world_size)
                step += 1

    def build_model(self) -> torch.nn.Module:
        """The model declared in the config's ``model`` section, seeded by the curriculum seed."""
        if self.config.model is None:
            raise ConfigError("model: the config declares no model; pass one to fit()")
        return build_model(self.config.model, seed=self.config.seed)

    def build_teacher(self) -> torch.nn.Module | None:
        """The frozen teacher declared in the config's ``teacher`` section, if any."""
        if self.config.teacher is None:
            return None
        teacher = build_model(self.config.teacher, seed=self.config.seed, field="teacher")
        teacher.eval().requires_grad_(False)
        return teacher


def _weight_schedule(weight: Any, steps: int, ctx: TimeContext) -> Schedule:
    if isinstance(weight, int | float):
        return constant(float(weight))
    return weight.build(steps, ctx)


def _scaled_share(weight: Schedule, group: list[Schedule], scale: float) -> Schedule:
    """``weight`` normalised within ``group`` and scaled to ``scale`` of the batch."""

    def schedule(step: float) -> float:
        total = sum(max(g(step), 0.0) for g in group)
        return scale * max(weight(step), 0.0) / total if total > 0 else scale / len(group)

    return schedule

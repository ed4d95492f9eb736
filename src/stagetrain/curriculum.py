"""The runtime curriculum: validated config turned into stages that produce batches.

:class:`Curriculum` is the functional core that both the built-in loop
(:func:`stagetrain.fit`) and a user's own loop drive. It knows, for every stage, how
many steps it lasts, which samples each step draws, the stage's loss and its
learning rate at every stage-local step. It holds no training progress: that lives
in the counters of :class:`~stagetrain.state.TrainState`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagetrain import lr_search
from stagetrain.apportion import constant_value
from stagetrain.batch import BatchFormat
from stagetrain.config import (
    CurriculumConfig,
    EvalConfig,
    SourceConfig,
    StageConfig,
    load_config,
)
from stagetrain.data import (
    ConcatSources,
    IndexSubset,
    SourceBuilder,
    fetch,
    mixture_tokens_per_sample,
    tokens_per_sample,
)
from stagetrain.difficulty import DifficultyScorer, ScoreCache, select_indices
from stagetrain.errors import ConfigError
from stagetrain.losses import StageLoss
from stagetrain.modelio import ModelIO
from stagetrain.ownloop import StepIterator
from stagetrain.pacing import ordering, pacing_function
from stagetrain.registry import build_model, import_path
from stagetrain.schedules import Schedule, constant, join, linear
from stagetrain.sources.mixture import mean_tokens_per_sample, token_weight_schedules
from stagetrain.stage import SourceShare, Stage
from stagetrain.state import TrainState
from stagetrain.time import Duration, TimeContext, TimeUnit


class Curriculum:
    """A validated curriculum with its stages built.

    Args:
        config: the curriculum declaration.
        datasets: in-memory datasets referred to as ``"@name"`` in the config.
        has_teacher: whether a teacher model will be available (for ``kl_distill``);
            implied when the config declares ``teacher``.
        models: in-memory reference models for difficulty scorers (``"@name"``).
        cache_dir: where difficulty scores are cached (default ``$STAGETRAIN_CACHE``).
        progress: show progress bars while scoring.

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
        self.has_teacher = has_teacher or config.teacher is not None
        self.fmt = BatchFormat(
            pad_id=config.batch.pad_id,
            ignore_index=config.batch.ignore_index,
            label_keys=tuple(config.batch.label_keys),
        )
        self._forward = _resolve_forward(config.batch.forward)
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
        self.scorer.io = ModelIO(self.fmt, forward=self._forward)
        self.score_digests: dict[str, str] = {}
        """SHA-256 of the difficulty scores each scored source used, by config field
        (a checkpoint keeps them, so resume notices changed scores)."""
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
        for stage in self.stages:
            lr_search.check_stage(stage, config)  # lr: auto: bad options fail here

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Curriculum:
        """Load and build a curriculum from a YAML or TOML file."""
        return cls(load_config(path), **kwargs)

    # --- construction -----------------------------------------------------------------

    def model_io(self, loss: StageLoss) -> ModelIO:
        """The calling convention for a stage or evaluation whose loss is ``loss``."""
        batch = self.config.batch
        pass_labels = batch.pass_labels if batch.pass_labels is not None else loss.uses_model_loss
        return ModelIO(self.fmt, pass_labels, batch.shift_labels, self._forward)

    def _build_stage(self, index: int, cfg: StageConfig) -> Stage:
        field = f"stages[{index}]"
        built = [
            self._source(s, field=f"{field}.data.sources[{k}]", seq_len=cfg.seq_len)
            for k, s in enumerate(cfg.data.sources)
        ]
        own = [dataset for dataset, _ in built]
        batch_size = cfg.batch_size
        assert batch_size is not None and cfg.optimizer is not None and cfg.loss is not None
        # An epoch of a token source is a pass over its tokens, not over every window.
        epoch_samples = round(sum(float(getattr(d, "samples_per_pass", len(d))) for d in own))
        initial = [
            float(s.weight) if isinstance(s.weight, int | float) else 1.0 for s in cfg.data.sources
        ]
        tokens = mixture_tokens_per_sample(own, initial, cfg.seq_len, self.fmt)
        ctx = TimeContext(batch_size, tokens, epoch_samples)
        steps = self._stage_steps(cfg, ctx, field)
        duration_steps = steps
        steps = lr_search.training_steps(cfg, steps, field=field)  # lr: auto, count_budget
        ctx = TimeContext(ctx.batch_size, ctx.tokens_per_sample, ctx.epoch_samples, steps)
        own_weights = [_weight_schedule(s.weight, steps, ctx) for s in cfg.data.sources]
        if cfg.data.weight_unit == "tokens":
            per_sample = [mean_tokens_per_sample(d, cfg.seq_len) for d in own]
            own_weights = token_weight_schedules(own_weights, per_sample)
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
                    datasets.append(_at_seq_len(prev.data.datasets[k], cfg.seq_len))
                    weights.append(constant(replay / len(earlier) * prev_static[k] / total))
                    labels.append((f"{prev.name}/{source.label}", True))
        data = ConcatSources(datasets, self.fmt, cfg.seq_len)
        paced = None
        if cfg.pacing is not None:
            scores = built[0][1]
            assert scores is not None  # config validation: pacing needs a scored source
            order = ordering(scores, cfg.pacing.order, self.config.seed, index)
            class_labels = None
            if cfg.pacing.class_balanced:
                target = ModelIO(self.fmt).target(fetch(own[0], np.arange(len(own[0])), self.fmt))
                if target is None:
                    raise ConfigError(f"{field}.pacing.class_balanced: the source has no targets")
                class_labels = target.reshape(len(own[0]), -1)[:, 0].numpy()
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
        shape = (
            join([linear(0.0, 1.0, warmup_steps), body], [warmup_steps]) if warmup_steps else body
        )
        shares = [float(w(0)) for w in weights]
        total_share = sum(shares)
        loss = StageLoss.build(cfg.loss, field=f"{field}.loss", has_teacher=self.has_teacher)
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
            loss=loss,
            io=self.model_io(loss),
            warmup_steps=warmup_steps,
            lr_shape=shape,
            seed=self.config.seed,
            paced=paced,
            tokens_per_source=[tokens_per_sample(d, cfg.seq_len, self.fmt) for d in datasets],
            duration_steps=duration_steps,
        )

    def _source(
        self, source: SourceConfig, *, field: str, seq_len: int | None = None
    ) -> tuple[Any, np.ndarray | None]:
        """A source's dataset (restricted by ``select``) and its difficulty scores, if any."""
        dataset = self.sources.build(source, field=field, seq_len=seq_len)
        if source.difficulty is None:
            return dataset, None
        identity = json.dumps(
            {"builtin": source.builtin, "factory": source.factory, "ref": source.ref,
             "name": source.name if source.dataset is not None else None, "args": source.args,
             "seed": self.config.seed, "seq_len": seq_len},
            sort_keys=True, default=str,
        )  # fmt: skip
        scores = self.scorer.scores(
            dataset, source.difficulty, identity=identity, field=f"{field}.difficulty"
        )
        self.score_digests[field] = hashlib.sha256(scores.tobytes()).hexdigest()
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
                    step=step,
                    stage_index=stage.index,
                    stage_step=local,
                    samples=samples + stage.context.samples(local),
                    tokens=tokens + stage.context.tokens(local),
                )
            samples += stage.context.samples(stage.steps)
            tokens += stage.context.tokens(stage.steps)
        return TrainState(step=step, stage_index=len(self.stages), samples=samples, tokens=tokens)

    def stage_at(self, step: int) -> Stage:
        """The stage that global ``step`` belongs to in the planned timeline."""
        return self.stages[min(self.state_at(step).stage_index, len(self.stages) - 1)]

    def evals_for(self, stage: Stage) -> list[EvalConfig]:
        """Evaluation sets active during ``stage``: the curriculum's plus the stage's own."""
        return [*self.config.evals, *stage.config.evals]

    def eval_field(self, ev: EvalConfig) -> str:
        """The config path of an evaluation (``evals[0]``, ``stages[1].evals[0]``)."""
        for i, e in enumerate(self.config.evals):
            if e is ev or e.name == ev.name:
                return f"evals[{i}]"
        for s, stage in enumerate(self.config.stages):
            for i, e in enumerate(stage.evals):
                if e is ev or e.name == ev.name:
                    return f"stages[{s}].evals[{i}]"
        return f"evals[{ev.name}]"

    def eval_seq_len(self, ev: EvalConfig, stage: Stage | None = None) -> int | None:
        """The sequence length an evaluation runs at (its own, else the stage's)."""
        return ev.seq_len or (stage.config.seq_len if stage is not None else None)

    def eval_dataset(self, ev: EvalConfig, stage: Stage | None = None) -> Any:
        """The dataset of an evaluation (viewed at its sequence length during ``stage``)."""
        field = f"{self.eval_field(ev)}.data"
        return self.sources.build(ev.data, field=field, seq_len=self.eval_seq_len(ev, stage))

    def steps(
        self, start: TrainState | None = None, *, rank: int = 0, world_size: int = 1
    ) -> StepIterator:
        """Every step from ``start`` (the beginning by default) to the end, in order.

        The own-loop entry point: each :class:`StepInfo` gives the stage, the batch, the
        loss and the learning rate of that step, and the stage hooks
        (:meth:`StepInfo.enter_stage`, :meth:`StepInfo.report`).
        """
        return StepIterator(self, start, rank, world_size)

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


def _at_seq_len(dataset: Any, seq_len: int | None) -> Any:
    """A replayed source seen at the replaying stage's sequence length, when it can be."""
    if seq_len is not None and hasattr(dataset, "with_seq_len"):
        return dataset.with_seq_len(seq_len)
    return dataset  # batches of other lengths are cut or padded to the stage's


def _resolve_forward(forward: Any) -> Any:
    if forward is None or callable(forward):
        return forward
    fn = import_path(forward, field="batch.forward")
    if not callable(fn):
        raise ConfigError(f"batch.forward: {forward!r} is not callable")
    return fn


def _weight_schedule(weight: Any, steps: int, ctx: TimeContext) -> Schedule:
    if isinstance(weight, int | float):
        return constant(float(weight))
    return weight.build(steps, ctx)


def _scaled_share(weight: Schedule, group: list[Schedule], scale: float) -> Schedule:
    """``weight`` normalised within ``group`` and scaled to ``scale`` of the batch."""
    values = [constant_value(g) for g in [weight, *group]]
    if all(v is not None for v in values):  # constant weights stay constant: O(1) sampling
        own, *rest = (max(float(v or 0.0), 0.0) for v in values)
        total = sum(rest)
        return constant(scale * own / total if total > 0 else scale / len(group))

    def schedule(step: float) -> float:
        total = sum(max(g(step), 0.0) for g in group)
        return scale * max(weight(step), 0.0) / total if total > 0 else scale / len(group)

    return schedule

"""Control arms derived from one curriculum: the same training, different data.

An arm keeps the curriculum's **stage structure** and replaces only each stage's
**data**. Kept at every position ``k``: the number of stages, each stage's name and
length (its planned steps; its tokens when the arm's samples hold a different number
of tokens, see below), batch size, ``grad_accum``, optimizer (name, LR, weight decay,
betas, momentum, warmup, schedule, ``grad_clip``, ``lr_multipliers``), hand-off,
``freeze``, advance rule and stage evaluations — hence the same optimizer settings and
LR at every step. Changed: a stage's *data*, which is its sources (and mixture
weights), ``replay``, ``pacing``, ``seq_len`` and ``loss`` (the loss belongs to the
data's task).

================ =====================================================================
arm              data at position ``k`` (of ``N`` stages)
================ =====================================================================
``curriculum``   the curriculum as declared
``baseline``     the final stage's data, uniformly (its pacing and replay dropped):
                 the target task only
``union``        every distinct sample of every stage once, uniformly: sources are
                 told apart by what they are (builtin / factory / ref / in-memory
                 object, args), never by label; selections of one source are merged
                 into the samples they cover, each counted once; weight = size
``anti``         stage ``N-1-k``'s data (stages reversed), with its pacing order
                 reversed too (easy-first <-> hard-first); a one-stage paced
                 curriculum is the same stage revealed hardest first
``easy-only``    the first stage's data, uniformly (its pacing dropped)
``random-order`` the same stages and pacing, each paced stage over a random order
================ =====================================================================

Where an arm's data makes a part of the structure meaningless, this is what happens:

* ``replay`` draws from earlier stages: ``baseline``, ``union`` and ``easy-only``
  have none (one dataset throughout). ``anti`` keeps each position's replay fraction,
  so its later stages replay what *it* trained first — except in a paced stage, which
  allows no replay.
* Advance rules stay at their position and judge the arm's own metrics, so with an
  advance rule a stage boundary can fall at a different step in each arm.
* ``union`` uses the final stage's ``seq_len`` and loss (one stage has one of each).
* **Token budgets.** When the arm's samples at position ``k`` hold a different number
  of tokens than the curriculum's (short then long context), the stage keeps the
  curriculum's *tokens* instead of its steps, and the warmup and advance minimum keep
  their fraction of the stage; schedules inside a stage already run over the stage's
  length. LR schedule lengths written in absolute units then cannot follow and are
  refused (write them as ``dur``, a fraction of the stage).

The curriculum's own ``global_lr`` is kept (it is a function of the global step) and
refused only together with token budgets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from stagetrain.config import (
    CurriculumConfig,
    DataConfig,
    LossTerm,
    OptimizerConfig,
    PacingConfig,
    SelectConfig,
    SourceConfig,
    StageConfig,
    format_validation_error,
)
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.errors import ConfigError
from stagetrain.time import Duration, TimeUnit

ARMS = ("curriculum", "baseline", "union", "anti", "easy-only", "random-order")
"""Every arm ``compare`` can derive, in display order."""

_FLIPPED = {"curriculum": "anti", "anti": "curriculum", "random": "random"}


@dataclass(frozen=True)
class _Data:
    """What an arm may change at one position, and the tokens per sample it implies."""

    data: DataConfig
    pacing: PacingConfig | None
    seq_len: int | None
    loss: list[LossTerm]
    tokens_per_sample: int
    epoch_samples: int | None


def _data_of(stage: StageConfig, built: Stage) -> _Data:
    ctx = built.context
    return _Data(
        stage.data, stage.pacing, stage.seq_len, _loss(stage), ctx.tokens_per_sample,
        ctx.epoch_samples,
    )  # fmt: skip


def _loss(stage: StageConfig) -> list[LossTerm]:
    """A resolved stage's loss terms (resolution fills in inherited losses)."""
    assert stage.loss is not None, "arms work on resolved stages"
    return stage.loss


def _plain(data: _Data) -> _Data:
    """The same samples drawn uniformly: no pacing, no replay, no unused scoring."""
    sources = [
        s if s.select is not None else s.model_copy(update={"difficulty": None})
        for s in data.data.sources
    ]
    plain = _rebuilt(DataConfig, data.data, sources=sources, replay=0.0)
    return _Data(plain, None, data.seq_len, data.loss, data.tokens_per_sample, data.epoch_samples)


def derive_arm(curriculum: Curriculum, arm: str) -> CurriculumConfig:
    """The config of ``arm`` (see the module docstring); :class:`ConfigError` if underivable."""
    if arm not in ARMS:
        raise ConfigError(f"arms: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    config = curriculum.config
    if arm == "curriculum":
        return config
    if arm == "random-order":
        return _random_order(config)
    resolved = config.resolved_stages()
    built = curriculum.stages
    own = [_data_of(s, b) for s, b in zip(resolved, built, strict=True)]
    n = len(resolved)
    paced = any(s.pacing is not None for s in resolved)
    if n < 2 and arm in ("union", "easy-only"):
        raise ConfigError(f"arms: {arm!r} needs a curriculum of at least two stages")
    if n < 2 and not paced:
        raise ConfigError(
            f"arms: {arm!r} of a one-stage curriculum without pacing is the curriculum itself"
        )
    if arm == "baseline":
        datas = [_plain(own[-1])] * n
    elif arm == "easy-only":
        datas = [_plain(own[0])] * n
    elif arm == "union":
        datas = [_union(resolved, built)] * n
    else:  # anti
        datas = [_reversed_position(own[n - 1 - k], resolved[k].data.replay) for k in range(n)]
    stages = [
        _stage(arm, k, stage, b, d)
        for k, (stage, b, d) in enumerate(zip(resolved, built, datas, strict=True))
    ]
    by_tokens = any(
        d.tokens_per_sample != b.context.tokens_per_sample
        for d, b in zip(datas, built, strict=True)
    )
    if config.global_lr is not None and by_tokens:
        raise ConfigError(
            f"arms: {arm!r} trains at a token budget (its samples hold a different number of "
            "tokens), which a global_lr over steps cannot follow; remove global_lr"
        )
    return _validated(arm, CurriculumConfig, config, stages=stages)


def _random_order(config: CurriculumConfig) -> CurriculumConfig:
    if not any(s.pacing is not None for s in config.stages):
        raise ConfigError("arms: 'random-order' needs a stage with pacing")
    stages = [
        s
        if s.pacing is None
        else s.model_copy(update={"pacing": s.pacing.model_copy(update={"order": "random"})})
        for s in config.stages
    ]
    return config.model_copy(update={"stages": stages})


def _reversed_position(data: _Data, replay: float) -> _Data:
    """Another stage's data at this position: its pacing order reversed, this replay."""
    pacing = data.pacing
    if pacing is not None:
        pacing = pacing.model_copy(update={"order": _FLIPPED[pacing.order]})
        replay = 0.0  # a paced stage draws only from its own ordered source
    moved = _rebuilt(DataConfig, data.data, replay=replay)
    return _Data(moved, pacing, data.seq_len, data.loss, data.tokens_per_sample, data.epoch_samples)


def _stage(arm: str, k: int, stage: StageConfig, built: Stage, data: _Data) -> StageConfig:
    """Position ``k`` of the arm: the curriculum's structure, ``data``'s data."""
    assert stage.optimizer is not None
    optimizer = stage.optimizer
    same_tokens = data.tokens_per_sample == built.context.tokens_per_sample
    where = f"arms: {arm!r}: stages[{k}]"

    def length(steps: int) -> str:
        # in steps when the arm's samples are like the curriculum's, else in its tokens
        return f"{steps}ba" if same_tokens else f"{built.context.tokens(steps)}tok"

    if built.warmup_steps:
        warmup = (
            f"{built.warmup_steps}ba"
            if same_tokens
            else f"{built.warmup_steps / built.steps!r}dur"  # the same fraction of the stage
        )
        optimizer = optimizer.model_copy(update={"warmup": warmup})
    if not same_tokens:
        _check_relative(optimizer, where)
    elif data.epoch_samples != built.context.epoch_samples and _uses_epochs(optimizer):
        raise ConfigError(
            f"{where}.optimizer: schedule lengths in epochs ('ep') depend on the data, which "
            "this arm changes; write them in steps ('ba') or as fractions ('dur')"
        )
    advance = stage.advance
    if advance is not None and advance.min_duration is not None:
        minimum = built.context.to_steps(
            Duration.parse(advance.min_duration), field=f"{where}.advance.min_duration"
        )
        advance = advance.model_copy(update={"min_duration": length(minimum)})
    return _validated(
        arm,
        StageConfig,
        stage,
        data=data.data,
        pacing=data.pacing,
        seq_len=data.seq_len,
        loss=data.loss,
        duration=length(built.steps),
        optimizer=optimizer,
        advance=advance,
    )


def _schedule_lengths(value: Any) -> list[str]:
    """Every duration written inside a schedule config (recursively)."""
    out: list[str] = []
    if isinstance(value, BaseModel):
        for name, field_value in value:
            if name in ("length", "warmup", "decay") and isinstance(field_value, str):
                out.append(field_value)
            elif name == "boundaries" and isinstance(field_value, list):
                out.extend(str(b) for b in field_value)
            else:
                out.extend(_schedule_lengths(field_value))
    elif isinstance(value, list):
        for item in value:
            out.extend(_schedule_lengths(item))
    return out


def _uses_epochs(optimizer: OptimizerConfig) -> bool:
    return any(
        Duration.parse(text).unit is TimeUnit.EPOCH
        for text in _schedule_lengths(optimizer.schedule)
    )


def _check_relative(optimizer: OptimizerConfig, where: str) -> None:
    absolute = [
        text
        for text in _schedule_lengths(optimizer.schedule)
        if Duration.parse(text).unit is not TimeUnit.FRACTION
    ]
    if absolute:
        raise ConfigError(
            f"{where}.optimizer.schedule: lengths {absolute} are absolute, but this arm trains "
            "the stage at a token budget with a different number of steps; write them as "
            "fractions of the stage ('0.5dur')"
        )


# --- union -------------------------------------------------------------------------------


def _identity(source: SourceConfig) -> str:
    """What a source *is* (not what it is called): two equal identities = one dataset."""
    return json.dumps(
        {
            "builtin": source.builtin,
            "factory": source.factory,
            "ref": source.ref,
            "object": None if source.dataset is None else id(source.dataset),
            "args": source.args,
        },
        sort_keys=True,
        default=str,
    )


_RANK_KINDS = ("easiest", "hardest", "quantiles")


def _select_kind(select: SelectConfig) -> str:
    kinds = ("easiest", "hardest", "quantiles", "scores")
    return next(k for k in kinds if getattr(select, k) is not None)


def _positions(select: SelectConfig, n: int) -> tuple[int, int]:
    """The rank positions ``[start, stop)`` a rank-based selection keeps (as in
    :func:`stagetrain.difficulty.select_indices`)."""
    if select.easiest is not None:
        return 0, max(1, round(select.easiest * n))
    if select.hardest is not None:
        return n - max(1, round(select.hardest * n)), n
    assert select.quantiles is not None
    low, high = select.quantiles
    return round(low * n), round(high * n)


def _merge(intervals: list[tuple[float, float]], *, touching: bool) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, stop in sorted(intervals):
        if merged and (start < merged[-1][1] or (touching and start == merged[-1][1])):
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def _union_group(members: list[tuple[SourceConfig, Any]]) -> list[tuple[SourceConfig, int]]:
    """One underlying source used by several stages -> disjoint sources and their sizes."""
    first = members[0][0]
    full = next((dataset for source, dataset in members if source.select is None), None)
    if full is not None:
        plain = first.model_copy(update={"select": None, "difficulty": None})
        return [(plain, len(full))]
    difficulties = {json.dumps(s.difficulty.model_dump(mode="json") if s.difficulty else None)
                    for s, _ in members}  # fmt: skip
    kinds = {_select_kind(s.select) for s, _ in members if s.select is not None}
    label = first.label
    if len(difficulties) > 1 or (kinds - set(_RANK_KINDS) and len(kinds) > 1):
        raise ConfigError(
            f"arms: 'union' cannot count every sample of {label!r} once: its stages select "
            "from it with different difficulty scorers or different kinds of selection; "
            "select with one scorer and rank-based selections (easiest, hardest, quantiles)"
        )
    if kinds == {"scores"}:
        # closed score ranges: overlapping or touching ones cover one range of samples
        ranged = [(s.select.scores, d) for s, d in members if s.select and s.select.scores]
        out_scores = []
        for low_s, high_s in _merge([r for r, _ in ranged], touching=True):
            inside = [d for (lo, hi), d in ranged if low_s <= lo and hi <= high_s]
            # sizes as drawn at the config's own seed (a score range's size depends on data)
            size = len(set().union(*(set(d.indices.tolist()) for d in inside)))
            select = SelectConfig(scores=(low_s, high_s))
            out_scores.append((first.model_copy(update={"select": select}), size))
        return out_scores
    n = len(members[0][1].dataset)  # an IndexSubset of the underlying source
    pieces = _merge(
        [_positions(s.select, n) for s, _ in members if s.select is not None], touching=True
    )
    if pieces == [(0, n)]:
        return [(first.model_copy(update={"select": None, "difficulty": None}), n)]
    out = []
    for start, stop in pieces:
        low, high = int(start) / n, int(stop) / n
        # round(low * n) must give back the same positions (it does: the error is < 1/2)
        assert round(low * n) == start and round(high * n) == stop
        select = SelectConfig(quantiles=(low, high))
        out.append((first.model_copy(update={"select": select}), int(stop - start)))
    return out


def _union(resolved: list[StageConfig], built: list[Stage]) -> _Data:
    """Every distinct sample once, equally likely; the final stage's sources first, so the
    stage's tokens per sample (read from its first source) are the final stage's."""
    order = [len(resolved) - 1, *range(len(resolved) - 1)]
    groups: dict[str, list[tuple[SourceConfig, Any]]] = {}
    for j in order:
        for k, source in enumerate(resolved[j].data.sources):
            groups.setdefault(_identity(source), []).append((source, built[j].data.datasets[k]))
    sources: list[SourceConfig] = []
    names: set[str] = set()
    for members in groups.values():
        for source, size in _union_group(members):
            name = source.label
            suffix = 2
            while name in names:
                name, suffix = f"{source.label}-{suffix}", suffix + 1
            names.add(name)
            sources.append(source.model_copy(update={"name": name, "weight": float(size)}))
    final = resolved[-1]
    data = _rebuilt(DataConfig, final.data, sources=sources, replay=0.0)
    total = int(sum(size for size in (s.weight for s in sources) if isinstance(size, float)))
    return _Data(
        data, None, final.seq_len, _loss(final), built[-1].context.tokens_per_sample, total
    )


# --- helpers -----------------------------------------------------------------------------


def _rebuilt(cls: type[Any], base: BaseModel, **updates: Any) -> Any:
    """``base`` with ``updates``, validated again (nested config objects are kept as they
    are, so in-memory datasets survive)."""
    try:
        return cls.model_validate({**dict(base), **updates})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def _validated(arm: str, cls: type[Any], base: BaseModel, **updates: Any) -> Any:
    try:
        return _rebuilt(cls, base, **updates)
    except ConfigError as exc:
        raise ConfigError(f"arms: {arm!r}: {exc}") from None


def parse_arms(text: str | Sequence[str]) -> list[str]:
    """Arm names from ``"curriculum,baseline"`` or a list, validated (no repeats)."""
    names = [a.strip() for a in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("arms: give at least one arm")
    for name in names:
        if name not in ARMS:
            raise ConfigError(f"arms: unknown arm {name!r}; choose from {', '.join(ARMS)}")
        if names.count(name) > 1:
            raise ConfigError(f"arms: {name!r} is listed twice; each arm runs once per seed")
    return names

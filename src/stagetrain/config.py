"""The curriculum as a typed, validated config.

A :class:`CurriculumConfig` is the whole declaration: ordered stages plus the seed,
the model, evaluation sets and checkpointing. It is built the same way from YAML,
TOML or Python (:func:`load_config`, :func:`parse_config`, or the constructors), and
validated up front: every problem is reported as a :class:`~stagetrain.errors.ConfigError`
naming the field, e.g. ``stages[1].duration: duration must be positive, got '0ba'``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from stagetrain.errors import ConfigError
from stagetrain.schedules import ConstantSchedule, ScheduleConfig
from stagetrain.time import Duration, TimeUnit

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[no-redef]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
BUILTIN_LOSSES = (
    "cross_entropy",
    "bce_with_logits",
    "hinge",
    "nll",
    "mse",
    "l1",
    "smooth_l1",
    "kl_distill",
    "model",
)
"""Loss names known without an import path (see :mod:`stagetrain.losses`)."""
BUILTIN_METRICS = (
    "loss",
    "accuracy",
    "error",
    "top_k_accuracy",
    "perplexity",
    "token_accuracy",
    "exact_match",
)
"""Metric names known without an import path (see :mod:`stagetrain.metrics`)."""


def callable_name(fn: Any) -> str:
    """``"module:qualname"`` of a Python callable, as configs and fingerprints show it."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{name}"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def _check_duration(value: str | None) -> str | None:
    """Field validator body: the field name is added by pydantic's error location."""
    if value is not None:
        Duration.parse(value, field="")
    return value


class ModelConfig(_Config):
    """How a model is built: a built-in name or a factory import path, with args.

    ``weights`` (optional) is a file of trained parameters — a ``state_dict`` saved with
    ``torch.save``, a ``.safetensors`` file, a stagetrain checkpoint, or a run directory
    (its newest intact checkpoint) — loaded without unpickling code.
    """

    builtin: str | None = None
    factory: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelConfig:
        if (self.builtin is None) == (self.factory is None):
            raise ValueError("model needs exactly one of 'builtin' or 'factory'")
        return self


class DifficultyConfig(_Config):
    """How hard each sample is (higher score = harder).

    ========== ==================================================================
    scorer     score of a sample
    ========== ==================================================================
    length     its length (tokens not equal to ``pad_id``; elements for non-token data)
    loss       a reference model's loss on it ("transfer" scoring; ``model``)
    confidence 1 - the reference model's probability of the true class (``model``)
    self_taught the loss of a quick model trained on the other folds of the data
    file       read from ``path`` (.npy or text, one number per sample)
    callable   ``fn``: ``(inputs, targets) -> scores`` per batch, an import path
    ========== ==================================================================
    """

    scorer: Literal["length", "loss", "confidence", "self_taught", "file", "callable"]
    model: ModelConfig | str | None = None
    """Reference model (``loss``/``confidence``; optional for ``self_taught``, whose default is
    the curriculum's model); a string ``"@name"`` names a model passed to ``Curriculum``."""
    path: str | None = None
    fn: str | None = None
    pad_id: int | None = None
    batch_size: int = Field(default=1024, gt=0)
    steps: int = Field(default=300, gt=0)
    """self_taught: training steps of each fold's quick model."""
    lr: float = Field(default=1e-3, gt=0)
    folds: int = Field(default=2, ge=2)
    """self_taught: each fold is scored by a model trained on the others (cross-fitting)."""

    @model_validator(mode="after")
    def _needs(self) -> DifficultyConfig:
        needs = {"loss": "model", "confidence": "model", "file": "path", "callable": "fn"}
        required = needs.get(self.scorer)
        if required and getattr(self, required) is None:
            raise ValueError(f"scorer {self.scorer!r} needs '{required}'")
        return self


class SelectConfig(_Config):
    """Which part of a scored source a stage uses: exactly one of the four ways."""

    easiest: float | None = Field(default=None, gt=0, le=1)
    """The easiest fraction (0.3 = the easiest 30 %)."""
    hardest: float | None = Field(default=None, gt=0, le=1)
    quantiles: tuple[float, float] | None = None
    """A quantile range of the scores, e.g. [0.3, 1.0]."""
    scores: tuple[float, float] | None = None
    """A range of raw scores [low, high]."""

    @model_validator(mode="after")
    def _one(self) -> SelectConfig:
        given = [
            k for k in ("easiest", "hardest", "quantiles", "scores") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "select needs exactly one of easiest, hardest, quantiles, scores; "
                f"got {given or 'none'}"
            )
        if self.quantiles is not None:
            low, high = self.quantiles
            if not 0.0 <= low < high <= 1.0:
                raise ValueError(
                    f"quantiles must satisfy 0 <= low < high <= 1, got [{low}, {high}]"
                )
        if self.scores is not None and not self.scores[0] <= self.scores[1]:
            raise ValueError(f"scores range is empty: {list(self.scores)}")
        return self


class SourceConfig(_Config):
    """One data source. Exactly one of ``builtin``, ``factory``, ``ref`` or ``dataset``.

    Written in a file as a mapping, or as a string shorthand: ``"parity"`` (built-in),
    ``"pkg.mod:factory"`` (import path) or ``"@name"`` (an in-memory dataset handed to
    :func:`stagetrain.fit` as ``datasets={"name": ...}``).
    """

    name: str | None = None
    """Label used in logs and the plan; defaults to the builtin/factory/ref text."""
    builtin: str | None = None
    """A built-in dataset of stagetrain (see ``stagetrain.registry.BUILTIN_SOURCES``)."""
    factory: str | None = None
    """Import path ``"pkg.mod:fn"`` of a function ``(**args) -> Dataset``."""
    ref: str | None = None
    """Name of an in-memory dataset passed to ``fit(datasets=...)``."""
    dataset: Any = Field(default=None, exclude=True)
    """An in-memory dataset object (Python only; not serialised)."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the factory."""
    weight: float | ScheduleConfig = 1.0
    """Mixture weight: a number, or a schedule over stage-local steps."""
    difficulty: DifficultyConfig | None = None
    """How to score the source's samples (needed by ``select`` and by stage ``pacing``)."""
    select: SelectConfig | None = None
    """Use only part of the source, chosen by difficulty."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            if data.startswith("@"):
                return {"ref": data[1:]}
            return {"factory": data} if ":" in data else {"builtin": data}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceConfig:
        given = [
            k for k in ("builtin", "factory", "ref", "dataset") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "a data source needs exactly one of builtin, factory, ref or dataset; "
                f"got {given or 'none'}"
            )
        if self.dataset is not None and self.name is None:
            raise ValueError("an in-memory dataset needs a 'name' (used in logs and fingerprints)")
        if isinstance(self.weight, float | int) and not self.weight > 0:
            raise ValueError(f"weight must be positive, got {self.weight}")
        if self.select is not None and self.difficulty is None:
            raise ValueError("'select' needs a 'difficulty' scorer on the same source")
        return self

    @property
    def label(self) -> str:
        """Human-readable name of the source."""
        return self.name or self.builtin or self.factory or f"@{self.ref}"


class DataConfig(_Config):
    """A stage's data: one source or a weighted mixture, plus optional replay.

    ``replay`` is the fraction of every batch drawn from the sources of earlier stages
    (in proportion to their weights there), the rest from ``sources``.
    """

    sources: list[SourceConfig] = Field(min_length=1)
    replay: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_unit: Literal["samples", "tokens"] = "samples"
    """What the sources' ``weight`` shares: samples (default) or tokens — with ``tokens``,
    a source of 128-token samples next to one of 256 gets twice the samples for an equal
    weight (see :mod:`stagetrain.sources.mixture`). ``replay`` is a share of samples."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"sources": [data]}
        if isinstance(data, list):
            return {"sources": data}
        if isinstance(data, dict) and "sources" not in data:
            own = ("replay", "weight_unit")
            source = {k: v for k, v in data.items() if k not in own}
            out: dict[str, Any] = {"sources": [source]}
            out.update({k: data[k] for k in own if k in data})
            return out
        return data

    @model_validator(mode="after")
    def _unique_labels(self) -> DataConfig:
        labels = [s.label for s in self.sources]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"sources need distinct names; repeated: {dupes} (set 'name')")
        return self


class LossTerm(_Config):
    """One loss term: a built-in name (see :mod:`stagetrain.losses`), an import path
    ``"pkg.mod:fn"``, or (Python only) a callable ``(output, target, **args) -> loss``."""

    name: str | Callable[..., Any]
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) or callable(data) else data

    @field_validator("name")
    @classmethod
    def _known(cls, name: str | Callable[..., Any]) -> str | Callable[..., Any]:
        if isinstance(name, str) and name not in BUILTIN_LOSSES and ":" not in name:
            raise ValueError(
                f"unknown loss {name!r}; expected one of {', '.join(BUILTIN_LOSSES)} "
                "or an import path 'pkg.mod:fn'"
            )
        return name

    @field_serializer("name")
    def _serialize_name(self, name: str | Callable[..., Any]) -> str:
        return name if isinstance(name, str) else callable_name(name)

    @property
    def label(self) -> str:
        """The term's name in logs (a callable's ``module:qualname``)."""
        return self.name if isinstance(self.name, str) else callable_name(self.name)


class MetricSpec(_Config):
    """One evaluation metric: a built-in name (``accuracy``; ``top_k_accuracy`` with
    ``args: {k: 5}``), an import path, or (Python only) a callable
    ``(outputs, batch) -> {key: value}`` or a ``torchmetrics.Metric``; ``key`` names
    the value of a torchmetrics or callable metric."""

    name: Any
    args: dict[str, Any] = Field(default_factory=dict)
    key: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return data if isinstance(data, dict) else {"name": data}

    @field_validator("name")
    @classmethod
    def _known(cls, name: Any) -> Any:
        if isinstance(name, str):
            if name not in BUILTIN_METRICS and ":" not in name:
                raise ValueError(
                    f"unknown metric {name!r}; expected one of {', '.join(BUILTIN_METRICS)} "
                    "or an import path 'pkg.mod:fn'"
                )
        elif not callable(name) and not hasattr(name, "update"):
            raise ValueError("a metric is a name, a callable or a torchmetrics Metric")
        return name

    @field_serializer("name")
    def _serialize_name(self, name: Any) -> str:
        return name if isinstance(name, str) else callable_name(name)

    def produced_keys(self) -> list[str] | None:
        """The keys this metric writes, or None when known only at run time."""
        if self.name == "top_k_accuracy":
            return [f"top{self.args.get('k', 5)}_accuracy"]
        if isinstance(self.name, str) and self.name in BUILTIN_METRICS:
            return [self.name]
        # A callable's keys are those of the dict it returns and a torchmetrics metric's
        # is its ``key``: known for sure once it ran (fit's preflight checks them).
        return None


class BatchConfig(_Config):
    """How batches map onto the model (see :mod:`stagetrain.modelio`)."""

    pad_id: int = 0
    """Padding value of token ids when items of different lengths are collated."""
    ignore_index: int = -100
    """Padding value of labels; losses and metrics skip it."""
    label_keys: list[str] = Field(default_factory=lambda: ["labels"])
    """Keys of a mapping batch that hold the targets."""
    pass_labels: bool | None = None
    """Give the label keys to the model; default: only when a loss term is ``model``."""
    shift_labels: bool | None = None
    """Targets are causal-LM labels (= input ids) to shift against the logits; default: on
    for mapping batches when the model is a ``...ForCausalLM`` / ``...LMHeadModel``."""
    forward: str | Callable[..., Any] | None = None
    """``(model, batch) -> outputs`` replacing the calling convention (import path or callable)."""

    @field_serializer("forward")
    def _serialize_forward(self, fn: str | Callable[..., Any] | None) -> str | None:
        return fn if fn is None or isinstance(fn, str) else callable_name(fn)


class OptimizerConfig(_Config):
    """Optimizer and learning-rate policy of a stage.

    The learning rate at stage-local step ``t`` is ``lr * warmup(t) * schedule(t)``,
    where the linear warmup applies only to the first stage and after a ``rewarm`` or
    ``reset`` hand-off.
    """

    name: str | Callable[..., Any] = "adamw"
    """A ``torch.optim`` class (``adamw``, ``adam``, ``sgd``, ``rmsprop``, ... any case), an
    import path ``"pkg.mod:Optimizer"`` or (Python) a callable ``(param_groups, **kw)``."""
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    warmup: str | None = None
    """Linear warmup length (from 0 to ``lr``), e.g. ``"100ba"`` or ``"0.05dur"``."""
    schedule: ScheduleConfig = Field(default_factory=ConstantSchedule)
    """LR multiplier over the stage (stage-local time), after warmup."""
    grad_clip: float | None = Field(default=None, gt=0)
    """Clip the global gradient norm to this value."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other keyword arguments of the optimizer class (``nesterov``, ``alpha``, ...)."""
    no_decay: list[str] | None = None
    """Parameter-name globs exempt from weight decay. Default: every parameter with fewer
    than two dimensions (biases, norm weights) — as nanoGPT, torchtitan and the Hugging
    Face Trainer do — when ``weight_decay > 0``; ``[]`` decays everything."""
    lr_multipliers: dict[str, float] = Field(default_factory=dict)
    """Parameter-name glob -> factor on the learning rate (first match wins), e.g.
    ``{"router.*": 100}`` to train a router faster than the model. Every pattern must
    match some parameter. Fixed by the stage that builds the optimizer."""

    @field_validator("lr_multipliers")
    @classmethod
    def _multipliers(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, factor in value.items():
            if not factor > 0:
                raise ValueError(f"lr_multipliers[{pattern!r}]: must be > 0, got {factor}")
        return value

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, value: str | None) -> str | None:
        return _check_duration(value)

    @field_validator("name")
    @classmethod
    def _optimizer_name(cls, name: str | Callable[..., Any]) -> str | Callable[..., Any]:
        if isinstance(name, str) and ":" not in name:
            import torch.optim

            known = {n.lower(): n for n in dir(torch.optim) if _is_optimizer_class(torch.optim, n)}
            if name.lower() not in known:
                raise ValueError(
                    f"unknown optimizer {name!r}; expected a torch.optim class "
                    f"({', '.join(sorted(known))}) or an import path 'pkg.mod:Optimizer'"
                )
        return name

    @field_serializer("name")
    def _serialize_name(self, name: str | Callable[..., Any]) -> str:
        return name if isinstance(name, str) else callable_name(name)

    @property
    def label(self) -> str:
        """The optimizer's name, lower-cased for torch.optim classes."""
        return (
            self.name.lower()
            if isinstance(self.name, str) and ":" not in self.name
            else (self.name if isinstance(self.name, str) else callable_name(self.name))
        )


def _is_optimizer_class(module: Any, name: str) -> bool:
    import torch.optim

    obj = getattr(module, name)
    return (
        isinstance(obj, type)
        and issubclass(obj, torch.optim.Optimizer)
        and obj is not torch.optim.Optimizer
    )


Handoff = Literal["carry", "rewarm", "reset"]


class PacingConfig(_Config):
    """Fraction of the stage's (difficulty-sorted) data visible at stage-local step t.

    With ``T`` the stage length, ``s = t / (a T)``, ``b`` the starting fraction
    (Wu, Dyer & Neyshabur 2021; Platanios et al. 2019 with ``c0 = b`` and ``a T`` the time
    to full competence), all capped at 1:

    ==================== =========================================================
    kind                 g(t)
    ==================== =========================================================
    step                 ``b`` while ``t < a T``, then 1 (a two-stage curriculum)
    linear               ``b + (1 - b) s``
    root                 ``b + (1 - b) s^(1/p)`` (root-p; p = 2 is the square root)
    exp                  ``b + (1 - b) (e^(10 s) - 1) / (e^10 - 1)``
    log                  ``b + (1 - b) (1 + 0.1 ln(s + e^-10))``
    competence_linear    ``min(1, t (1 - b) / (a T) + b)``
    competence_sqrt      ``min(1, sqrt(t (1 - b^2) / (a T) + b^2))``
    ==================== =========================================================

    Batches are drawn uniformly (with replacement across steps) from the visible
    part; ``order`` is easy-first (``curriculum``), hard-first (``anti``) or a seeded
    random order (``random``, the control with the same pacing).
    """

    kind: Literal["step", "linear", "root", "exp", "log", "competence_linear", "competence_sqrt"]
    a: float = Field(default=0.5, gt=0, le=1)
    b: float = Field(default=0.2, gt=0, le=1)
    p: float = Field(default=2.0, gt=0)
    order: Literal["curriculum", "anti", "random"] = "curriculum"
    class_balanced: bool = False
    """Draw every class equally often from the visible part (Hacohen & Weinshall 2019)."""


class AdvanceConfig(_Config):
    """Move to the next stage when a metric says the model is ready (or at ``duration``).

    Checked after each evaluation of ``metric`` (``"EVAL.KEY"``). ``threshold``: advance at
    the first evaluation reaching it. ``patience``: advance when ``patience`` evaluations
    in a row improved on the best by less than ``delta``. The stage's ``duration`` is the
    maximum; ``min_duration`` keeps it from ending sooner.
    """

    metric: str
    threshold: float | None = None
    patience: int | None = Field(default=None, ge=1)
    delta: float = Field(default=0.0, ge=0)
    mode: Literal["max", "min"] | None = None
    """Direction of improvement; default max for accuracy, min for loss."""
    min_duration: str | None = None

    @model_validator(mode="after")
    def _rule(self) -> AdvanceConfig:
        if (self.threshold is None) == (self.patience is None):
            raise ValueError("advance needs exactly one of 'threshold' or 'patience'")
        if "." not in self.metric:
            raise ValueError(f"metric must be 'EVAL.KEY' like 'val.accuracy', got {self.metric!r}")
        _check_duration(self.min_duration)
        return self

    @property
    def maximize(self) -> bool:
        if self.mode:
            return self.mode == "max"
        key = self.metric.rpartition(".")[2]
        return not (key.endswith("loss") or key in ("error", "perplexity"))


class EvalConfig(_Config):
    """An evaluation set, run every ``every`` steps and at the end of each stage."""

    name: str
    data: SourceConfig
    every: str | None = None
    """Interval (a duration); defaults to the curriculum's ``eval_every``."""
    metrics: list[MetricSpec] = Field(
        default_factory=lambda: [MetricSpec(name="loss"), MetricSpec(name="accuracy")]
    )
    """Built-in names, import paths, callables or torchmetrics (see :mod:`stagetrain.metrics`)."""
    loss: LossTerm = Field(default_factory=lambda: LossTerm(name="cross_entropy"))
    """The loss behind the ``loss`` metric (a name, import path or callable; ``model``)."""
    batch_size: int = Field(default=1024, gt=0)
    max_samples: int | None = Field(default=None, gt=0)
    seq_len: int | None = Field(default=None, gt=0)
    """Evaluate at this sequence length in every stage (default: the stage's ``seq_len``)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"names use letters, digits, '_', '.', '-'; got {value!r}")
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: str | None) -> str | None:
        return _check_duration(value)

    def produced_keys(self) -> list[str] | None:
        """``NAME.KEY`` of every value this evaluation logs; None when a metric's keys are
        known only at run time (custom metrics)."""
        keys: list[str] = []
        for metric in self.metrics:
            produced = metric.produced_keys()
            if produced is None:
                return None
            keys += [f"{self.name}.{k}" for k in produced]
        return keys


class StageConfig(_Config):
    """One stage of the curriculum: data, loss, optimizer, hand-off and duration."""

    name: str
    data: DataConfig
    duration: str
    """How long the stage runs: '500ba', '64000sp', '1e6tok', '2ep' or '0.5dur' of ``total``."""
    loss: list[LossTerm] | None = None
    """Loss terms; inherited from the previous stage when omitted (the first stage's
    default is ``cross_entropy``)."""
    optimizer: OptimizerConfig | None = None
    """Inherited from the previous stage when omitted (the first stage gets the defaults)."""
    handoff: Handoff = "carry"
    """What crosses into this stage: carry (optimizer state, no warmup), rewarm (state,
    warmup restarts), reset (fresh optimizer, warmup)."""
    freeze: list[str] = Field(default_factory=list)
    """Glob patterns of parameter names kept fixed during this stage (``"encoder.*"``)."""
    batch_size: int | None = Field(default=None, gt=0)
    """Global batch size; defaults to the curriculum's ``batch_size``."""
    seq_len: int | None = Field(default=None, gt=0)
    """Truncate token sequences to this length (inputs, and targets of the same length)."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step: each rank's share of the batch is split this many ways."""
    evals: list[EvalConfig] = Field(default_factory=list)
    """Evaluation sets run only during this stage (in addition to the curriculum's)."""
    pacing: PacingConfig | None = None
    """Reveal the stage's data gradually by difficulty (needs one source with ``difficulty``)."""
    advance: AdvanceConfig | None = None
    """End the stage early on a metric; ``duration`` is then the maximum."""

    @model_validator(mode="after")
    def _pacing_source(self) -> StageConfig:
        if self.pacing is not None:
            sources = self.data.sources
            if len(sources) != 1 or sources[0].difficulty is None or self.data.replay:
                raise ValueError(
                    "pacing needs exactly one data source with a 'difficulty' scorer and no replay"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _loss_shorthand(cls, data: Any) -> Any:
        loss = data.get("loss") if isinstance(data, dict) else None
        if isinstance(loss, str | dict | LossTerm) or (
            callable(loss) and not isinstance(loss, list)
        ):
            data = {**data, "loss": [loss]}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"names use letters, digits, '_', '.', '-'; got {value!r}")
        return value

    @field_validator("duration")
    @classmethod
    def _duration(cls, value: str) -> str:
        _check_duration(value)
        return value

    @field_validator("loss")
    @classmethod
    def _nonempty_loss(cls, value: list[LossTerm] | None) -> list[LossTerm] | None:
        if value is not None and not value:
            raise ValueError("a stage needs at least one loss term")
        return value


class CheckpointConfig(_Config):
    """When checkpoints are written and how many are kept."""

    every: str | None = None
    """Interval (a duration); checkpoints are also written at each stage end."""
    keep: int = Field(default=3, ge=1)
    async_save: bool = False
    """Write checkpoints in the background: training waits only while the state is
    copied to host memory (``parallel: fsdp``: ``torch.distributed.checkpoint.async_save``;
    ``ddp``: a writer thread). A checkpoint is listed in the manifest only once written."""

    @field_validator("every")
    @classmethod
    def _every(cls, value: str | None) -> str | None:
        return _check_duration(value)


class GlobalLR(_Config):
    """One learning-rate schedule over the whole run (global steps), overriding the stages'."""

    lr: float = Field(gt=0)
    schedule: ScheduleConfig = Field(default_factory=ConstantSchedule)


class NonFiniteConfig(_Config):
    """What happens when the loss is NaN or infinite.

    ``raise`` (default) stops with an error naming the step, stage and loss terms; it
    checks on the device and reads back only at logging and checkpoint time, so it costs
    no per-step synchronisation. ``skip`` drops the batch's update (at most
    ``max_consecutive_skips`` in a row). ``rollback`` restores the newest checkpoint and
    multiplies the learning rate by ``rollback_lr_factor`` (at most ``max_rollbacks``
    times). ``skip`` and ``rollback`` read the loss back every step.
    """

    policy: Literal["raise", "skip", "rollback"] = "raise"
    max_consecutive_skips: int = Field(default=10, ge=1)
    rollback_lr_factor: float = Field(default=0.5, gt=0, lt=1)
    max_rollbacks: int = Field(default=3, ge=1)


# --- parallel: how the model is spread over ranks (issue 19) ---------------------------

DTypeName = Literal["fp32", "bf16"]


class MixedPrecisionConfig(_Config):
    """FSDP2's ``MixedPrecisionPolicy``: the dtype parameters are all-gathered and computed
    in, and the dtype gradients are reduced in. The sharded parameters and the optimizer
    state stay in the model's own dtype (fp32). fp16 is not offered: it needs loss
    scaling, whose skip decision would be taken from each rank's own shard."""

    param_dtype: DTypeName = "fp32"
    reduce_dtype: DTypeName = "fp32"


_FSDP_ONLY = (
    "wrap",
    "mixed_precision",
    "reshard_after_forward",
    "cpu_offload",
    "activation_checkpointing",
)


class ParallelConfig(_Config):
    """How the model is spread over the ranks of a ``torchrun`` job.

    ``ddp`` (default) replicates the model on every rank (DistributedDataParallel) and
    writes single-file checkpoints from rank 0. ``fsdp`` shards parameters, gradients and
    optimizer state with FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6):
    each block in ``wrap`` is one shard unit, the root another; checkpoints are sharded
    (``torch.distributed.checkpoint``: every rank writes its shards, and a run resumes on
    any number of ranks). The other fields apply to ``fsdp`` only.
    """

    kind: Literal["ddp", "fsdp"] = "ddp"
    wrap: list[str] | None = None
    """Modules sharded as units: class names (``GPT2Block``) or globs over module names
    (``blocks.*``). Default: the model's ``_no_split_modules`` (transformers), else the
    children of its ``nn.ModuleList`` containers (the repeated blocks)."""
    mixed_precision: MixedPrecisionConfig = Field(default_factory=MixedPrecisionConfig)
    reshard_after_forward: bool = True
    """Free each unit's gathered parameters after its forward (all-gather again in the
    backward): less memory, more communication."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in host memory
    (``CPUOffloadPolicy``); the optimizer steps on the CPU."""
    activation_checkpointing: bool = False
    """Recompute each wrapped block's activations in the backward pass instead of storing
    them (``torch.utils.checkpoint``)."""

    @model_validator(mode="after")
    def _fsdp_only(self) -> ParallelConfig:
        if self.kind == "ddp":
            defaults = ParallelConfig(kind="fsdp")
            for name in _FSDP_ONLY:
                if getattr(self, name) != getattr(defaults, name):
                    raise ValueError(f"{name} applies to kind 'fsdp' only (kind is 'ddp')")
        if self.wrap is not None and not all(self.wrap):
            raise ValueError("wrap: entries must be non-empty class names or name globs")
        return self


class CurriculumConfig(_Config):
    """A whole curriculum: ordered stages plus everything shared by all of them."""

    name: str = "curriculum"
    seed: int = 0
    data_seed: int | None = None
    """Seed passed to data factories that accept ``seed``; defaults to ``seed``. Set it to
    vary the data draw independently of the initialisation and batch order (``stagetrain
    compare --vary``)."""
    stages: list[StageConfig] = Field(min_length=1)
    model: ModelConfig | None = None
    teacher: ModelConfig | None = None
    """A frozen model whose outputs ``kl_distill`` loss terms match (``fit(teacher=...)``
    takes precedence); built like ``model``, usually with ``weights``."""
    batch_size: int = Field(default=32, gt=0)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Padding values, label keys and the model's calling convention."""
    total: str | None = None
    """Length of the whole run; needed only by stage durations written in 'dur'."""
    evals: list[EvalConfig] = Field(default_factory=list)
    eval_every: str | None = None
    log_every: int = Field(default=10, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the forward pass (fp16 uses a gradient scaler)."""
    compile: bool = False
    """Train through ``torch.compile(model)``."""
    data_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes preparing batches ahead (0: in the training process)."""
    pin_memory: bool = False
    """Pin batches in page-locked memory for faster copies to the GPU."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """DDP (default) or FSDP2 across ranks; see :class:`ParallelConfig`."""
    global_lr: GlobalLR | None = None
    """When set, the LR at global step ``t`` is ``global_lr.lr * schedule(t)`` in every stage."""

    @field_validator("total", "eval_every")
    @classmethod
    def _durations(cls, value: str | None) -> str | None:
        return _check_duration(value)

    @field_validator("total")
    @classmethod
    def _total_unit(cls, value: str | None) -> str | None:
        if value is not None and Duration.parse(value).unit in (TimeUnit.FRACTION, TimeUnit.EPOCH):
            raise ValueError("total must be in steps, samples or tokens (ba, sp or tok)")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> CurriculumConfig:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be distinct; repeated: {dupes}")
        for i, stage in enumerate(self.stages):
            unit = Duration.parse(stage.duration).unit
            if unit is TimeUnit.FRACTION and self.total is None:
                raise ValueError(
                    f"stages[{i}].duration: {stage.duration!r} is a fraction of the run, "
                    "but the curriculum sets no 'total'"
                )
        resolved = self.resolved_stages()
        for i in range(1, len(resolved)):
            prev, cur = resolved[i - 1].optimizer, resolved[i].optimizer
            assert prev is not None and cur is not None
            if resolved[i].handoff != "reset" and prev.label != cur.label:
                raise ValueError(
                    f"stages[{i}].handoff: {resolved[i].handoff!r} keeps the optimizer state, "
                    f"but stage {resolved[i].name!r} uses {cur.label} after {prev.label}; "
                    "use handoff: reset"
                )
        for i, stage in enumerate(self.stages):
            if stage.advance is None:
                continue
            keyed = [e.produced_keys() for e in [*self.evals, *stage.evals]]
            produced = [k for keys in keyed if keys is not None for k in keys]
            custom = any(keys is None for keys in keyed)  # checked by fit's preflight
            if stage.advance.metric not in produced and not custom:
                raise ValueError(
                    f"stages[{i}].advance.metric: no evaluation of this stage produces "
                    f"{stage.advance.metric!r}; available: {produced}"
                )
            if stage.advance.min_duration is not None:
                unit_max = Duration.parse(stage.duration)
                unit_min = Duration.parse(stage.advance.min_duration)
                if unit_min.unit == unit_max.unit and unit_min.value > unit_max.value:
                    raise ValueError(
                        f"stages[{i}].advance.min_duration: {stage.advance.min_duration!r} is "
                        f"longer than the stage's duration {stage.duration!r}"
                    )
        if self.precision == "fp16" and self.parallel.kind == "fsdp":
            # torch's GradScaler checks each rank's own gradient shard for inf/NaN: the
            # ranks could disagree on skipping a step.
            raise ValueError(
                "precision: 'fp16' is not supported with parallel.kind 'fsdp' (its gradient "
                "scaler would decide per shard); use 'bf16', or parallel.mixed_precision"
            )
        eval_names = [e.name for e in self.evals] + [e.name for s in self.stages for e in s.evals]
        dupes = sorted({n for n in eval_names if eval_names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation names must be distinct; repeated: {dupes}")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """Stages with inherited fields filled in (optimizer, loss, batch size)."""
        out: list[StageConfig] = []
        previous_optimizer = OptimizerConfig()
        previous_loss = [LossTerm(name="cross_entropy")]
        for stage in self.stages:
            optimizer = stage.optimizer or previous_optimizer
            loss = stage.loss or previous_loss
            out.append(
                stage.model_copy(
                    update={
                        "optimizer": optimizer,
                        "loss": loss,
                        "batch_size": stage.batch_size or self.batch_size,
                    }
                )
            )
            previous_optimizer, previous_loss = optimizer, loss
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (in-memory datasets appear by name only)."""
        return self.model_dump(mode="json", exclude_none=True)

    def fingerprint_dict(self) -> dict[str, Any]:
        """What defines the curriculum for resume purposes (everything but log cadence)."""
        data = self.to_dict()
        for run_only in (
            "log_every",
            "checkpoint",
            "nonfinite",
            "precision",
            "compile",
            "data_workers",
            "pin_memory",
            "parallel",  # how the run is spread over ranks, not what it trains
        ):
            data.pop(run_only, None)
        return data

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`fingerprint_dict`."""
        text = json.dumps(self.fingerprint_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def format_validation_error(exc: ValidationError, source: str | None = None) -> str:
    """Turn pydantic's report into lines ``field.path: message``."""
    lines = []
    for err in exc.errors():
        loc = _format_loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the docs for allowed fields)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif isinstance(err.get("input"), str | int | float | bool):
            msg = f"{msg}, got {type(err['input']).__name__} {err['input']!r}"
        lines.append(f"{loc}: {msg}" if loc else msg)
    prefix = f"{source}: " if source else ""
    return prefix + "; ".join(lines)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_exactly_one(), SourceConfig]",) or "[" in str(part):
            # pydantic names validator wrappers in the location; they mean nothing to users.
            continue
        elif not re.fullmatch(r"[A-Za-z_][\w-]*", str(part)):
            out += f"[{str(part)!r}]"  # an odd key from the file, quoted so the path stays readable
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_config(data: dict[str, Any], *, source: str | None = None) -> CurriculumConfig:
    """Validate a plain dict (as read from YAML/TOML) into a :class:`CurriculumConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping at the top level")
    try:
        return CurriculumConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def load_config(path: str | Path) -> CurriculumConfig:
    """Read a curriculum from a ``.yaml``/``.yml`` or ``.toml`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {first_line}") from None
    return parse_config(data, source=str(path))


def config_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Readable differences between two plain config dicts: ``path: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append(f"{sub}: added {new[key]!r}")
            elif key not in new:
                out.append(f"{sub}: removed (was {old[key]!r})")
            else:
                out.extend(config_diff(old[key], new[key], sub))
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = []
        if len(old) != len(new):
            out.append(f"{path}: {len(old)} entries -> {len(new)}")
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            out.extend(config_diff(a, b, f"{path}[{i}]"))
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]

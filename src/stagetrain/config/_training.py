"""How a stage trains and is judged: losses, metrics, batches, optimizer, pacing,
advance rules, evaluations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from stagetrain.config._autolr import AutoLRConfig
from stagetrain.config._base import (
    BUILTIN_LOSSES,
    BUILTIN_METRICS,
    _check_duration,
    _Config,
    callable_name,
    check_name,
)
from stagetrain.config._sources import SourceConfig
from stagetrain.schedules import ConstantSchedule, ScheduleConfig


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


# --- lr: auto (stagetrain.lr_search) -------------------------------------------------------


class OptimizerConfig(_Config):
    """Optimizer and learning-rate policy of a stage.

    The learning rate at stage-local step ``t`` is ``lr * warmup(t) * schedule(t)``,
    where the linear warmup applies only to the first stage and after a ``rewarm`` or
    ``reset`` hand-off. ``lr: auto`` searches ``lr`` at the stage's start (see ``auto``).
    """

    name: str | Callable[..., Any] = "adamw"
    """A ``torch.optim`` class (``adamw``, ``adam``, ``sgd``, ``rmsprop``, ... any case), an
    import path ``"pkg.mod:Optimizer"`` or (Python) a callable ``(param_groups, **kw)``."""
    lr: float | Literal["auto"] = 1e-3
    """Peak learning rate, or ``auto``: searched at the stage's start (``auto`` options)."""
    auto: AutoLRConfig | None = None
    """Options of the ``lr: auto`` search (defaults when omitted)."""
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

    @field_validator("lr", mode="before")
    @classmethod
    def _lr(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto":
            try:
                value = float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                raise ValueError(f"expected a positive number or 'auto', got {value!r}") from None
        if isinstance(value, int | float) and not isinstance(value, bool) and not value > 0:
            raise ValueError(f"must be > 0, got {value}")
        return value

    @field_validator("auto")
    @classmethod
    def _auto_options(cls, value: AutoLRConfig | None, info: ValidationInfo) -> AutoLRConfig | None:
        if value is not None and info.data.get("lr", "auto") != "auto":
            raise ValueError("options of the LR search; they need lr: auto")
        return value

    @property
    def is_auto(self) -> bool:
        """Whether the stage's LR is searched (``lr: auto``)."""
        return self.lr == "auto"

    @property
    def search(self) -> AutoLRConfig:
        """The LR search's options (the defaults when ``auto`` is omitted)."""
        return self.auto if self.auto is not None else AutoLRConfig()

    @property
    def initial_lr(self) -> float:
        """The LR an optimizer is built with: ``lr``, or ``auto.lr_min`` while the LR is not
        searched yet (every driver sets each step's LR before the step)."""
        return self.search.lr_min if self.lr == "auto" else float(self.lr)

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
        return check_name(value)

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

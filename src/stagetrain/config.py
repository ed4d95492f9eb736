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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
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
BUILTIN_LOSSES = ("cross_entropy", "mse", "kl_distill")
Metric = Literal["loss", "accuracy"]
_ALL_METRICS: tuple[Metric, ...] = ("loss", "accuracy")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def _check_duration(value: str | None) -> str | None:
    """Field validator body: the field name is added by pydantic's error location."""
    if value is not None:
        Duration.parse(value, field="")
    return value


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

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"sources": [data]}
        if isinstance(data, list):
            return {"sources": data}
        if isinstance(data, dict) and "sources" not in data:
            replay = data.get("replay")
            source = {k: v for k, v in data.items() if k != "replay"}
            out: dict[str, Any] = {"sources": [source]}
            if replay is not None:
                out["replay"] = replay
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
    """One named loss term: a built-in (cross_entropy, mse, kl_distill) or an import path."""

    name: str
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in BUILTIN_LOSSES and ":" not in name:
            raise ValueError(
                f"unknown loss {name!r}; expected one of {', '.join(BUILTIN_LOSSES)} "
                "or an import path 'pkg.mod:fn'"
            )
        return name


class OptimizerConfig(_Config):
    """Optimizer and learning-rate policy of a stage.

    The learning rate at stage-local step ``t`` is ``lr * warmup(t) * schedule(t)``,
    where the linear warmup applies only to the first stage and after a ``rewarm`` or
    ``reset`` hand-off.
    """

    name: Literal["adamw", "adam", "sgd"] = "adamw"
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

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, value: str | None) -> str | None:
        return _check_duration(value)


Handoff = Literal["carry", "rewarm", "reset"]


class EvalConfig(_Config):
    """An evaluation set, run every ``every`` steps and at the end of each stage."""

    name: str
    data: SourceConfig
    every: str | None = None
    """Interval (a duration); defaults to the curriculum's ``eval_every``."""
    metrics: list[Metric] = Field(default_factory=lambda: list(_ALL_METRICS))
    loss: str = "cross_entropy"
    batch_size: int = Field(default=1024, gt=0)
    max_samples: int | None = Field(default=None, gt=0)

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


class StageConfig(_Config):
    """One stage of the curriculum: data, loss, optimizer, hand-off and duration."""

    name: str
    data: DataConfig
    duration: str
    """How long the stage runs: '500ba', '64000sp', '1e6tok', '2ep' or '0.5dur' of ``total``."""
    loss: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="cross_entropy")])
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
    evals: list[EvalConfig] = Field(default_factory=list)
    """Evaluation sets run only during this stage (in addition to the curriculum's)."""

    @model_validator(mode="before")
    @classmethod
    def _loss_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("loss"), str | dict):
            data = {**data, "loss": [data["loss"]]}
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
    def _nonempty_loss(cls, value: list[LossTerm]) -> list[LossTerm]:
        if not value:
            raise ValueError("a stage needs at least one loss term")
        return value


class ModelConfig(_Config):
    """How the CLI builds the model: a built-in name or a factory import path, with args."""

    builtin: str | None = None
    factory: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelConfig:
        if (self.builtin is None) == (self.factory is None):
            raise ValueError("model needs exactly one of 'builtin' or 'factory'")
        return self


class CheckpointConfig(_Config):
    """When checkpoints are written and how many are kept."""

    every: str | None = None
    """Interval (a duration); checkpoints are also written at each stage end."""
    keep: int = Field(default=3, ge=1)

    @field_validator("every")
    @classmethod
    def _every(cls, value: str | None) -> str | None:
        return _check_duration(value)


class GlobalLR(_Config):
    """One learning-rate schedule over the whole run (global steps), overriding the stages'.

    ``stagetrain compare`` gives every control arm the curriculum's own LR trajectory
    this way, so that arms differ only in their data.
    """

    lr: float = Field(gt=0)
    schedule: ScheduleConfig = Field(default_factory=ConstantSchedule)


class CurriculumConfig(_Config):
    """A whole curriculum: ordered stages plus everything shared by all of them."""

    name: str = "curriculum"
    seed: int = 0
    stages: list[StageConfig] = Field(min_length=1)
    model: ModelConfig | None = None
    batch_size: int = Field(default=32, gt=0)
    total: str | None = None
    """Length of the whole run; needed only by stage durations written in 'dur'."""
    evals: list[EvalConfig] = Field(default_factory=list)
    eval_every: str | None = None
    log_every: int = Field(default=10, gt=0)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
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
            if resolved[i].handoff != "reset" and prev.name != cur.name:
                raise ValueError(
                    f"stages[{i}].handoff: {resolved[i].handoff!r} keeps the optimizer state, "
                    f"but stage {resolved[i].name!r} uses {cur.name} after {prev.name}; "
                    "use handoff: reset"
                )
        eval_names = [e.name for e in self.evals] + [e.name for s in self.stages for e in s.evals]
        dupes = sorted({n for n in eval_names if eval_names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation names must be distinct; repeated: {dupes}")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """Stages with inherited fields filled in (optimizer, batch size)."""
        out: list[StageConfig] = []
        previous_optimizer = OptimizerConfig()
        for stage in self.stages:
            optimizer = stage.optimizer or previous_optimizer
            out.append(
                stage.model_copy(
                    update={
                        "optimizer": optimizer,
                        "batch_size": stage.batch_size or self.batch_size,
                    }
                )
            )
            previous_optimizer = optimizer
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (in-memory datasets appear by name only)."""
        return self.model_dump(mode="json", exclude_none=True)

    def fingerprint_dict(self) -> dict[str, Any]:
        """What defines the curriculum for resume purposes (everything but log cadence)."""
        data = self.to_dict()
        data.pop("log_every", None)
        data.pop("checkpoint", None)
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

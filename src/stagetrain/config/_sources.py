"""Where data and models come from: model, difficulty, selection, source, mixture."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    model_validator,
)

from stagetrain.config._base import _Config
from stagetrain.schedules import ScheduleConfig


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

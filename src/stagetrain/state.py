"""Training progress as counters: everything else is a function of these."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Training progress, as counters only.

    ``step`` counts completed optimizer steps over the whole run; ``stage_step`` those
    of the current stage. When ``stage_step == 0`` the stage has not started yet (its
    hand-off has not been applied).
    """

    step: int = 0
    stage_index: int = 0
    stage_step: int = 0
    samples: int = 0
    tokens: int = 0
    """Tokens as the durations count them: samples x the stage's tokens per sample."""
    real_tokens: int = 0
    """Tokens that are not padding (attention mask / targets not ignored), as trained."""
    elapsed_s: float = 0.0
    plateau_best: float | None = None
    """Best value so far of the stage's advance metric (plateau rule)."""
    plateau_waits: int = 0
    """Evaluations in a row without improvement (plateau rule)."""
    rollback_lr_scale: float = 1.0
    """Factor on every LR, lowered by each NaN rollback."""
    rollbacks: int = 0
    skipped: int = 0
    """Batches whose update was skipped for a non-finite loss."""
    optimizer_stage: int = -1
    """Index of the stage that built the current optimizer (its param-group layout)."""
    stage_start: dict[str, int] = field(default_factory=dict)
    """``step``, ``samples``, ``tokens`` and ``real_tokens`` when the current stage started."""
    lr_search: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per ``lr: auto`` stage (by name), its finished LR search: the chosen ``lr``, its
    cost (``steps``, ``samples``, ``eval_samples``), ``counted`` and ``fallback``."""

    def mark_stage_start(self) -> None:
        """Record the counters at which the current stage starts (``stage_start``)."""
        self.stage_start = {
            "step": self.step,
            "samples": self.samples,
            "tokens": self.tokens,
            "real_tokens": self.real_tokens,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainState:
        """Counters from a checkpoint; fields it lacks keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

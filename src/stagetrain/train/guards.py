"""Non-finite losses: the ``raise``, ``skip`` and ``rollback`` policies.

``raise`` (default) costs no per-step synchronisation: each step's loss and terms are
kept (detached, so no autograd graph is held) and checked in one stacked ``isfinite``
at the next *flush* — before every log line, evaluation, checkpoint and stage end,
which are host syncs anyway. So no NaN reaches an evaluation, an advance decision, a
checkpoint or ``summary.json``. ``skip`` and ``rollback`` read the loss back every
step. In a distributed run every decision is taken together (:meth:`Engine.any`), so
all ranks skip, roll back or stop at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagetrain.config import NonFiniteConfig
from stagetrain.errors import TrainingError
from stagetrain.train.engine import Engine


class Rollback(Exception):
    """Raised inside a stage to restart from the newest checkpoint (policy ``rollback``)."""


@dataclass(frozen=True)
class _Watched:
    step: int
    stage: str
    stage_step: int
    loss: torch.Tensor
    terms: tuple[tuple[str, torch.Tensor], ...]


def _describe(step: int, stage: str, stage_step: int) -> str:
    return f"non-finite loss at step {step} in stage {stage!r} (stage step {stage_step})"


class NonFiniteGuard:
    """Applies a :class:`~stagetrain.config.NonFiniteConfig` policy to each step's loss."""

    def __init__(self, config: NonFiniteConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self._pending: list[_Watched] = []
        self.consecutive_skips = 0

    @property
    def deferred(self) -> bool:
        """Whether checks wait for the next flush (policy ``raise``)."""
        return self.config.policy == "raise"

    def watch(
        self,
        step: int,
        stage: str,
        stage_step: int,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> None:
        """Keep this step's loss for the next flush (no device work, no sync)."""
        detached = tuple((k, v.detach()) for k, v in terms.items())
        self._pending.append(_Watched(step, stage, stage_step, loss.detach(), detached))

    def clear(self) -> None:
        """Forget pending losses (after a rollback restored an earlier state)."""
        self._pending = []

    def flush(self) -> None:
        """Raise :class:`TrainingError` if a step since the last flush had a non-finite loss.

        One stacked ``isfinite`` and one read-back (agreed between ranks) per flush.
        """
        pending, self._pending = self._pending, []
        local_bad = None
        if pending:
            finite = torch.isfinite(torch.stack([w.loss.float() for w in pending]))
            local_bad = ~finite
        if not self.engine.any(local_bad.any() if local_bad is not None else False):
            return
        if local_bad is None or not bool(local_bad.any()):
            raise TrainingError(
                "non-finite loss on another rank since the last check; training stops on every rank"
            )
        first = pending[int(local_bad.nonzero()[0, 0])]
        bad_terms = [name for name, value in first.terms if not torch.isfinite(value).all()]
        raise TrainingError(
            f"{_describe(first.step, first.stage, first.stage_step)}; non-finite terms: "
            f"{bad_terms or [name for name, _ in first.terms]}. Lower the LR, set grad_clip, "
            "or choose nonfinite.policy 'skip' or 'rollback'"
        )

    def check_now(
        self,
        step: int,
        stage: str,
        stage_step: int,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> str | None:
        """Policies ``skip``/``rollback``: None when the update may run, else why it may not.

        Raises:
            Rollback: under ``rollback``.
            TrainingError: when more than ``max_consecutive_skips`` batches in a row failed.
        """
        bad = not bool(torch.isfinite(loss.detach()).all())  # a per-step sync: the price
        if not self.engine.any(bad):
            self.consecutive_skips = 0
            return None
        names = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        detail = f"{_describe(step, stage, stage_step)}; terms {names or list(terms)}"
        if self.config.policy == "rollback":
            raise Rollback(detail)
        self.consecutive_skips += 1
        limit = self.config.max_consecutive_skips
        if self.consecutive_skips > limit:
            raise TrainingError(f"{detail}; more than {limit} consecutive batches skipped")
        return detail

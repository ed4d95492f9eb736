"""Evaluations during training, and the advance decisions they feed.

Before an evaluation the non-finite guard is flushed (a diverged model is never
evaluated); sums are all-reduced with the engine's device-aware collective; an
advance rule never acts on a non-finite metric — under the ``raise`` policy that is
an error, otherwise the evaluation is left out of the rule's count, with a record.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from stagetrain.advance import (
    NONFINITE_ADVICE,
    AdvanceDecision,
    check_advance,
    nonfinite_metric,
    rule_value,
)
from stagetrain.config import AdvanceConfig
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.errors import TrainingError
from stagetrain.evaluation import EvalSet, evaluate_sums, finalize
from stagetrain.logs import RunLogger
from stagetrain.state import TrainState
from stagetrain.train.engine import Engine
from stagetrain.train.guards import NonFiniteGuard
from stagetrain.train.progress import Reporter

Record = Callable[..., dict[str, Any]]
"""``record(kind, stage, **fields)``: a log record stamped with the run's counters."""


class Evaluations:
    """Runs a run's evaluations and applies its advance rules."""

    def __init__(
        self,
        *,
        curriculum: Curriculum,
        model: torch.nn.Module,
        engine: Engine,
        eval_sets: dict[str, EvalSet],
        guard: NonFiniteGuard,
        logger: RunLogger,
        reporter: Reporter,
    ) -> None:
        self.curriculum = curriculum
        self.model = model
        self.engine = engine
        self.eval_sets = eval_sets
        self.guard = guard
        self.logger = logger
        self.reporter = reporter

    def run(
        self, stage: Stage, eval_set: EvalSet, state: TrainState, record: Record, now: float
    ) -> dict[str, float]:
        """Evaluate the model on ``eval_set`` during ``stage``; logs and prints the values."""
        self.guard.flush()
        ev = eval_set.config
        info = self.engine.info
        sums = evaluate_sums(
            self.model,
            self.curriculum.eval_dataset(ev, stage),
            eval_set,
            seq_len=self.curriculum.eval_seq_len(ev, stage),
            device=self.engine.device,
            rank=info.rank,
            world_size=info.world_size,
            equal_batches=self.engine.sharded,  # FSDP: every rank runs every forward pass
        )
        metrics = finalize(eval_set, self.engine.sum(sums))
        self.logger.log(
            record(
                "eval", stage, name=ev.name, samples=state.samples, tokens=state.tokens,
                time=now, **metrics,
            )
        )  # fmt: skip
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.reporter.line(f"step {state.step:,} [{stage.name}] {ev.name}: {shown}")
        return metrics

    def decide(
        self,
        stage: Stage,
        rule: AdvanceConfig,
        metrics: dict[str, float],
        state: TrainState,
        min_steps: int,
        record: Record,
        policy: str,
    ) -> AdvanceDecision:
        """The advance rule on the metrics every rank holds (rank 0's decision is final)."""
        value = rule_value(rule, metrics, stage_index=stage.index)
        if not math.isfinite(value):
            detail = nonfinite_metric(rule, value, state.step, stage.name)
            if policy == "raise":
                raise TrainingError(detail + NONFINITE_ADVICE)
            self.logger.log(record("skip", stage, detail=detail))
            return AdvanceDecision(False)
        decision = check_advance(rule, value, state, min_steps)
        advance = self.engine.agree(decision.advance)
        return decision if advance == decision.advance else AdvanceDecision(advance, "agreed", "")

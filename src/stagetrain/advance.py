"""Advance rules: when a stage ends because the model is ready, not because time ran out.

The decision is a pure function of the evaluated metric and counters kept in
:class:`~stagetrain.state.TrainState` (so it survives resume). In a distributed
run the metric is all-reduced before the decision, so every rank computes the same
one; the loop also broadcasts rank 0's decision to rule out any float disagreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stagetrain.config import AdvanceConfig
from stagetrain.errors import TrainingError
from stagetrain.state import TrainState


@dataclass(frozen=True)
class AdvanceDecision:
    """Whether to end the stage now, why (``threshold`` / ``plateau``), and in words."""

    advance: bool
    reason: str = ""
    detail: str = ""


def check_advance(
    rule: AdvanceConfig, value: float, state: TrainState, min_steps: int
) -> AdvanceDecision:
    """Update the plateau counters with ``value`` and decide.

    ``threshold``: advance at the first evaluation with ``value >= threshold`` (``<=`` when
    minimising). ``patience``: an evaluation improves when it beats the best so far by at
    least ``delta``; advance after ``patience`` evaluations in a row without improvement.
    Never before ``min_steps`` stage-local steps.
    """
    sign = 1.0 if rule.maximize else -1.0
    if rule.threshold is not None:
        reached = sign * value >= sign * rule.threshold
        ready = reached and state.stage_step >= min_steps
        op = ">=" if rule.maximize else "<="
        return AdvanceDecision(
            ready,
            "threshold",
            f"{rule.metric} {value:.4g} {op} {rule.threshold:g}" if ready else "",
        )
    assert rule.patience is not None
    gain = math.inf if state.plateau_best is None else sign * (value - state.plateau_best)
    # With delta = 0 any strict gain counts; an equal value is no improvement.
    improved = gain >= rule.delta if rule.delta > 0 else gain > 0
    if improved:
        state.plateau_best = value
        state.plateau_waits = 0
    else:
        state.plateau_waits += 1
    ready = state.plateau_waits >= rule.patience and state.stage_step >= min_steps
    detail = (
        f"{rule.metric} did not improve by {rule.delta:g} on {state.plateau_best:.4g} "
        f"for {state.plateau_waits} evaluations"
    )
    return AdvanceDecision(ready, "plateau", detail if ready else "")


def rule_value(rule: AdvanceConfig, metrics: dict[str, float], *, stage_index: int) -> float:
    """The value an advance rule judges, from an evaluation's metrics (may be non-finite).

    Raises:
        TrainingError: when the evaluation did not produce the rule's metric.
    """
    key = rule.metric.partition(".")[2]
    if key not in metrics:
        raise TrainingError(
            f"stages[{stage_index}].advance.metric: the evaluation produced no {key!r}; "
            f"it produced {sorted(metrics)}"
        )
    return metrics[key]


def nonfinite_metric(rule: AdvanceConfig, value: float, step: int, stage: str) -> str:
    """Why an advance rule does not act on ``value`` (NaN or infinite), in words."""
    return f"{rule.metric} is {value} at step {step} in stage {stage!r}"


NONFINITE_ADVICE = (
    ": the model diverged or the metric failed; an advance rule never acts on a non-finite value"
)


def stage_end_message(name: str, step: int, decision: AdvanceDecision, planned: int) -> str:
    """The line printed when a stage ends (by its duration or by its advance rule)."""
    message = f"stage {name!r} ended at step {step:,}: {decision.detail}"
    if decision.advance:
        message += f" ({decision.reason}; planned up to {planned:,} stage steps)"
    return message

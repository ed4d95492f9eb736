"""The training values of one logging interval, summed on the device.

Per step the meter adds a few device tensors (the loss, each term, the real tokens)
and host integers (samples, padded positions); it reads anything back only when a
record is written, which is the one host sync of the training path between
evaluations. Wall time spent evaluating or checkpointing inside an interval is
excluded from its rates.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from stagetrain.state import TrainState
from stagetrain.train.engine import Engine
from stagetrain.train.step import StepResult


class IntervalMeter:
    """Sums of the current logging interval (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pending_tokens: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.loss: torch.Tensor | None = None
        self.terms: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.samples = 0
        self.padded = 0
        self.started = time.perf_counter()
        self.paused = 0.0

    def pause(self, seconds: float) -> None:
        """``seconds`` of the interval were not training (an evaluation, a checkpoint)."""
        self.paused += seconds

    def add(self, result: StepResult, samples: int) -> None:
        self.loss = result.loss if self.loss is None else self.loss + result.loss
        if len(result.terms) > 1:
            for name, value in result.terms.items():
                held = self.terms.get(name)
                self.terms[name] = value.detach() if held is None else held + value.detach()
        if result.tokens is not None:
            held_tokens = self.pending_tokens
            self.pending_tokens = (
                result.tokens if held_tokens is None else held_tokens + result.tokens
            )
        self.steps += 1
        self.samples += samples
        self.padded += result.padded

    def fold_tokens(self, state: TrainState) -> int:
        """Add the real tokens seen since the last fold (summed over ranks) to ``state``."""
        pending, self.pending_tokens = self.pending_tokens, None
        if pending is None:
            return 0
        total = int(self.engine.sum({"t": pending})["t"].item())
        state.real_tokens += total
        return total

    def drop(self) -> None:
        """Forget the interval (a rollback returned to an earlier state)."""
        self.pending_tokens = None
        self.reset()

    def fields(self, state: TrainState, lr: float, norm: torch.Tensor | None) -> dict[str, Any]:
        """The values of a ``train`` record for the interval just ended; starts a new one."""
        assert self.loss is not None
        seconds = max(time.perf_counter() - self.started - self.paused, 1e-9)
        real = self.fold_tokens(state)
        out: dict[str, Any] = {
            "loss": float(self.loss / self.steps),  # the host sync, at logging intervals only
            "lr": lr,
            "samples": state.samples,
            "tokens": state.tokens,
            "tokens_real": state.real_tokens,
            "samples_per_s": self.samples / seconds,
            "step_time": seconds / self.steps,
        }
        if real:
            out["tokens_per_s"] = real / seconds
            out["padded_tokens_per_s"] = self.padded * self.engine.info.world_size / seconds
        if norm is not None:
            out["grad_norm"] = float(norm)
        for name, value in self.terms.items():
            out[f"loss/{name}"] = float(value / self.steps)
        self.reset()
        return out

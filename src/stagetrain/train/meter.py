"""The training values of one logging interval, summed on the device.

Per step the meter adds a few device tensors (the loss, each term, the real tokens)
and host integers (samples, padded positions); it reads anything back only when a
record is written, which is the one host sync of the training path between
evaluations. Wall time spent evaluating or checkpointing inside an interval is
excluded from its rates.

Each rank sums the losses of its own share of every batch; a record reduces them over
the ranks (one collective at the logging step, which every rank reaches together) and
logs their mean, the way a step averages its micro-batches and DDP the gradients: the
loss of the global batch. A checkpoint inside an interval carries every rank's partial
sums (:meth:`IntervalMeter.partial`) and a resume puts them back
(:meth:`IntervalMeter.restore`), so the next record averages the whole interval.
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
        self.real = 0  # real tokens of the interval already folded (over all ranks)
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
        self.real += total
        return total

    def drop(self) -> None:
        """Forget the interval (a rollback returned to an earlier state)."""
        self.pending_tokens = None
        self.reset()

    def fields(self, state: TrainState, lr: float, norm: torch.Tensor | None) -> dict[str, Any]:
        """The values of a ``train`` record for the interval just ended; starts a new one."""
        assert self.loss is not None
        seconds = max(time.perf_counter() - self.started - self.paused, 1e-9)
        world = self.engine.info.world_size
        sums = {"loss": self.loss, **{f"loss/{k}": v for k, v in self.terms.items()}}
        pending, self.pending_tokens = self.pending_tokens, None
        if pending is not None:
            sums["tokens_real"] = pending
        if world > 1:  # the one collective of a record (the token count rides along)
            sums = self.engine.sum(sums)
        if "tokens_real" in sums:
            folded = int(sums.pop("tokens_real").item())
            state.real_tokens += folded
            self.real += folded
        out: dict[str, Any] = {
            # The host sync, at logging intervals only; the mean over ranks and steps.
            "loss": float(sums.pop("loss") / (world * self.steps)),
            "lr": lr,
            "samples": state.samples,
            "tokens": state.tokens,
            "tokens_real": state.real_tokens,
            "samples_per_s": self.samples / seconds,
            "step_time": seconds / self.steps,
        }
        if self.real:
            out["tokens_per_s"] = self.real / seconds
            out["padded_tokens_per_s"] = self.padded * world / seconds
        if norm is not None:
            out["grad_norm"] = float(norm)
        for key, value in sums.items():
            out[key] = float(value / (world * self.steps))
        self.reset()
        return out

    # --- the partial interval a checkpoint carries --------------------------------------

    def partial(self) -> dict[str, Any]:
        """This rank's sums of the interval so far, as plain data (a host sync: called at
        checkpoints, after :meth:`fold_tokens`). Sums keep their dtype so that a resume
        adds the next steps to exactly the same value."""
        return {
            "steps": self.steps,
            "loss": None if self.loss is None else _plain(self.loss),
            "terms": {name: _plain(value) for name, value in self.terms.items()},
            "samples": self.samples,
            "padded": self.padded,
            "real": self.real,
            "seconds": time.perf_counter() - self.started - self.paused,
        }

    def restore(self, saved: dict[str, Any] | None, step: int) -> None:
        """Start from a checkpoint's partial interval (``saved``: its ``meter`` entry, or
        None for a checkpoint written before it had one; kept only at the step it was
        written at — a ``restart-stage`` resume starts the interval afresh)."""
        self.drop()
        if not saved or saved.get("step") != step:
            return
        ranks: list[dict[str, Any]] = saved["ranks"]
        info = self.engine.info
        if len(ranks) == info.world_size:
            mine = ranks[info.rank]  # the same world size: this rank's own sums, exactly
        else:  # each rank holds the saved ranks' mean: the mean over the new ranks is it
            mine = _mean_of(ranks, info.world_size)
        if not mine["steps"] or mine["loss"] is None:
            return
        device = self.engine.device
        self.loss = _tensor(mine["loss"], device)
        self.terms = {name: _tensor(value, device) for name, value in mine["terms"].items()}
        self.steps, self.samples = int(mine["steps"]), int(mine["samples"])
        self.padded, self.real = int(mine["padded"]), int(mine["real"])
        self.started = time.perf_counter() - float(mine["seconds"])


def partials(step: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``meter`` entry of a checkpoint: every rank's :meth:`IntervalMeter.partial`."""
    return {"step": step, "ranks": ranks}


def _plain(value: torch.Tensor) -> list[Any]:
    return [float(value.item()), str(value.dtype).removeprefix("torch.")]


def _tensor(plain: list[Any], device: torch.device) -> torch.Tensor:
    return torch.tensor(plain[0], dtype=getattr(torch, plain[1]), device=device)


def _mean_of(ranks: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """One rank's share of partial sums saved by another number of ranks."""
    first, n = ranks[0], len(ranks)

    def mean(values: list[list[Any]]) -> list[Any]:
        return [sum(v[0] for v in values) / n, values[0][1]]

    return {
        **first,
        "loss": None if first["loss"] is None else mean([r["loss"] for r in ranks]),
        "terms": {k: mean([r["terms"][k] for r in ranks]) for k in first["terms"]},
        "padded": sum(int(r["padded"]) for r in ranks) // world_size,
    }

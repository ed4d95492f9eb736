"""``lr: auto`` in :func:`stagetrain.fit`: the LR search at a stage's start, resumably.

:func:`enter_stage` is the runner's one hook (after the stage's hand-off and the
engine's wrapping). For an ``lr: auto`` stage it

* at the stage's first step, runs :func:`stagetrain.lr_search.search_lr` through the
  run's engine (under DDP every rank trains the search's steps together, the held-out
  sums are all-reduced, and rank 0's result is broadcast, so all ranks agree);
* records the choice: an ``lr_search`` log record with every candidate's score, the
  short form in ``TrainState.lr_search`` (so in every later checkpoint and in
  ``summary.json``), and ``stage.auto_lr``;
* continuing a stage from a checkpoint, takes the LR recorded there (no new search).

Kills: every finished unit of a search (start score, range test, each trial) is kept
in ``checkpoints/lr_search-<stage index>.json``, keyed by a digest of the stage's
starting point (weights, optimizer state, curriculum fingerprint). A run killed during
the search — or after it, before the stage's first checkpoint — resumes from the
boundary checkpoint, finds the same digest, and reuses what was finished: a finished
search is never run again, and an interrupted one makes the same choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stagetrain.atomic import atomic_write_text
from stagetrain.batch import Batch, batch_size, to_device
from stagetrain.curriculum import Stage
from stagetrain.lr_search import SearchResult, search_lr
from stagetrain.train.step import PRECISIONS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from stagetrain.state import TrainState
    from stagetrain.train.runner import Runner


class EngineBackend:
    """The search's :class:`~stagetrain.lr_search.SearchBackend` in :func:`stagetrain.fit`:
    the run's step runner (micro-batches, autocast, fp16 scaler, DDP) and collectives."""

    def __init__(self, runner: Runner, stage: Stage) -> None:
        assert stage.config.optimizer is not None
        self.runner, self.stage = runner, stage
        self.rank = runner.engine.info.rank
        self.world_size = runner.engine.info.world_size
        self.grad_clip = stage.config.optimizer.grad_clip
        self.dtype = PRECISIONS[runner.config.precision]

    def train_step(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        runner = self.runner
        runner.train_model.train()
        result = runner.steps.forward_backward(self.stage, runner.train_model, micro_batches)
        runner.steps.update(
            runner.train_model, runner.step_optimizer, grad_clip=self.grad_clip, want_norm=False
        )
        return result.loss

    def eval_sum(self, batch: Batch) -> torch.Tensor:
        runner, stage = self.runner, self.stage
        model, teacher = runner.model, runner.steps.teacher
        batch = to_device(batch, runner.device)
        autocast = (
            torch.autocast(runner.device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        model.eval()
        try:
            with torch.no_grad(), autocast:
                pred = stage.io.predict(model, batch)
                teacher_pred = None
                if stage.loss.needs_teacher:
                    assert teacher is not None
                    teacher_pred = stage.io.predict(teacher, batch)
                loss = stage.loss(pred, teacher=teacher_pred, model=model)[0]
            return loss.detach().double() * batch_size(batch)
        finally:
            model.train()

    def all_sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.runner.engine.sum(values)

    def agree(self, flag: bool) -> bool:
        return self.runner.engine.agree(flag)

    def broadcast(self, obj: Any) -> Any:
        return self.runner.engine.gather(obj)[0]

    def extra_state(self) -> dict[str, Any]:
        scaler = self.runner.steps.scaler
        return {"scaler": scaler.state_dict()} if scaler is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        scaler = self.runner.steps.scaler
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])


def _tensor_bytes(value: torch.Tensor) -> bytes:
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _digest_into(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(_tensor_bytes(value))
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(f"K{key!r}".encode())
            _digest_into(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _digest_into(digest, item)
    else:
        digest.update(f"V{value!r}".encode())


def start_key(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str, stage: Stage
) -> str:
    """SHA-256 of a search's starting point: weights, optimizer state, curriculum, stage."""
    digest = hashlib.sha256(f"{fingerprint}/{stage.index}/{stage.name}".encode())
    _digest_into(digest, model.state_dict())
    _digest_into(digest, optimizer.state_dict())
    return digest.hexdigest()


class FileCache:
    """A search's finished units in a JSON file (rank 0 reads and writes; see module doc)."""

    def __init__(self, path: Path, key: str, *, enabled: bool) -> None:
        self.path, self.key, self.enabled = path, key, enabled
        self.units: dict[str, Any] = {}
        self.reused = 0

    def load(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("key") != self.key:
            return {}  # another starting point (another run, a changed stage): start afresh
        units = data.get("units")
        self.units = dict(units) if isinstance(units, dict) else {}
        self.reused = len(self.units)
        return dict(self.units)

    def put(self, key: str, value: Any) -> None:
        if not self.enabled:
            return
        self.units[key] = value
        atomic_write_text(self.path, json.dumps({"key": self.key, "units": self.units}))


def _rounded(values: list[float | None]) -> list[float | None]:
    return [None if v is None else float(f"{v:.6g}") for v in values]


def record_fields(result: SearchResult) -> dict[str, Any]:
    """The ``lr_search`` log record's fields (JSON; non-finite values as None)."""
    return {
        "lr": result.lr,
        "rule": result.rule,
        "pick": result.pick,
        "edge": result.edge,
        "candidates": result.candidates,
        "trials": [
            {"lr": t.lr, "rung": t.rung, "steps": t.steps, "score": t.score, "diverged": t.diverged}
            for t in result.trials
        ],
        "start_score": result.start_score,
        "range_lrs": _rounded(list(result.range_lrs)),
        "range_losses": _rounded(result.range_losses),
        "search_steps": result.steps,
        "search_samples": result.samples,
        "eval_samples": result.eval_samples,
        "holdout": result.holdout,
        "counted": result.counted,
        "fallback": result.fallback,
    }


def counted_search(state: TrainState, stage: Stage) -> str:
    """How a ``count_budget`` stage spent its duration, for its end's detail ("" when its
    search was not counted, or it had none)."""
    search = state.lr_search.get(stage.name)
    if not search or not search.get("counted"):
        return ""
    return f": {search['steps']:,} search steps (counted) + {state.stage_step:,} trained"


def enter_stage(runner: Runner, stage: Stage) -> None:
    """The LR of an ``lr: auto`` stage: searched at its first step, else from the state."""
    opt = stage.config.optimizer
    if opt is None or not opt.is_auto:
        return
    state = runner.state
    known = state.lr_search.get(stage.name)
    if state.stage_step > 0 and known is not None:
        stage.auto_lr = float(known["lr"])
        return
    assert runner.optimizer is not None
    engine = runner.engine
    key = (
        start_key(runner.model, runner.optimizer, runner.config.fingerprint(), stage)
        if engine.is_main
        else ""
    )
    path = runner.run_dir / "checkpoints" / f"lr_search-{stage.index}.json"
    cache = FileCache(path, key, enabled=engine.is_main)
    started = time.perf_counter()
    result = search_lr(
        stage,
        runner.model,
        runner.optimizer,
        EngineBackend(runner, stage),
        seed=runner.config.seed,
        cache=cache,
    )
    runner.meter.pause(time.perf_counter() - started)
    stage.auto_lr = result.lr
    state.lr_search[stage.name] = result.summary()
    runner.logger.log(
        runner.record("lr_search", stage, **record_fields(result), time=runner.elapsed())
    )
    counted = "counted in the stage" if result.counted else "not counted"
    reused = f"; reused {cache.reused} finished units" if cache.reused else ""
    runner.reporter.line(
        f"stage {stage.name!r}: lr auto -> {result.lr:.3g} (search {result.steps:,} steps, "
        f"{result.samples:,} samples, {counted}{reused})"
    )
    if result.fallback:
        detail = (
            f"every candidate LR diverged ({', '.join(f'{c:.3g}' for c in result.candidates)}); "
            f"training with the smallest, {result.lr:.3g}"
        )
        runner.logger.log(
            runner.record(
                "warning", stage, source="lr_search", detail=detail, time=runner.elapsed()
            )
        )
        runner.reporter.line(f"warning: stage {stage.name!r}: {detail}")

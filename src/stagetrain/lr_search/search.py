"""The search itself: range test, then successive halving, then restore."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stagetrain.batch import Batch
from stagetrain.config import AutoLRConfig
from stagetrain.errors import ConfigError
from stagetrain.optim import apply_lr
from stagetrain.rng import rng_state, set_rng_state
from stagetrain.seeding import derive_seed

if TYPE_CHECKING:
    from stagetrain.curriculum import Stage


# --- checks before training -----------------------------------------------------------------


from stagetrain.lr_search.backend import (
    SearchBackend,
    SearchCache,
    _NoCache,
)
from stagetrain.lr_search.checks import horizon
from stagetrain.lr_search.results import (
    SearchData,
    SearchResult,
    Trial,
    _finite,
    _seed_all,
    _Snapshot,
)
from stagetrain.lr_search.rules import (
    candidate_lrs,
    pick_lr,
)


def search_lr(
    stage: Stage,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    backend: SearchBackend,
    *,
    seed: int,
    cfg: AutoLRConfig | None = None,
    cache: SearchCache | None = None,
    echo: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search the peak LR of ``stage`` from the current weights and optimizer state.

    Everything the search changes is put back bitwise before it returns (weights,
    optimizer state, ``backend.extra_state()``, the torch, CUDA, NumPy and Python random
    generators); ``stage.auto_lr`` is left for the caller to set.

    Args:
        stage: the stage (its data, loss, batch size and mixture).
        model: the unwrapped model (snapshotted and restored; evaluated on the held-out slice).
        optimizer: the stage's optimizer after its hand-off (its LR is set per step).
        backend: how to train and evaluate (:class:`LocalBackend` in one process).
        seed: the run's seed (same seed, same starting point: same choice).
        cfg: the search's options (default: the stage's ``optimizer.auto``).
        cache: finished units to reuse and to record into (a resumed search).
        echo: receives a line per finished unit.

    Returns:
        The :class:`SearchResult`; under several ranks, rank 0's on every rank.

    Example:
        >>> backend = LocalBackend(stage, model, optimizer)  # doctest: +SKIP
        >>> stage.auto_lr = search_lr(stage, model, optimizer, backend, seed=0).lr  # doctest: +SKIP
    """
    assert stage.config.optimizer is not None
    cfg = cfg if cfg is not None else stage.config.optimizer.search
    cache = cache if cache is not None else _NoCache()
    say = echo or (lambda line: None)
    stage_steps = horizon(stage)
    range_steps = cfg.range_steps
    rungs = cfg.rungs(stage_steps)
    longest = max([range_steps] + [steps for _, steps in rungs])
    data = SearchData(stage, cfg, seed, longest)
    rank, world = backend.rank, backend.world_size
    micro = stage.config.grad_accum
    batch = stage.batch_size
    if batch % world or (batch // world) < micro:
        raise ConfigError(
            f"stages[{stage.index}].batch_size: {batch} cannot be split over {world} ranks "
            f"and {micro} micro-batches"
        )

    from stagetrain.stepdata import micro_slices  # stepdata imports the curriculum module

    def step_batches(step: int) -> list[Batch]:
        indices = data.batch(step)
        share = indices[rank * (batch // world) : (rank + 1) * (batch // world)]
        return [stage.fetch(share[part]) for part in micro_slices(len(share), micro)]

    def held_out_loss() -> float:
        share = np.array_split(data.holdout, world)[rank]
        chunk = max(batch // world, 1)
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, len(share), chunk):
            total = total + backend.eval_sum(stage.fetch(share[start : start + chunk])).cpu()
        summed = backend.all_sum({"loss": total, "n": torch.tensor(float(len(share)))})
        return float(summed["loss"].item() / max(summed["n"].item(), 1.0))

    def mean_loss(loss: torch.Tensor) -> float:
        summed = backend.all_sum({"loss": loss.detach().double()})
        return float(summed["loss"].item()) / world

    def train(lr: float, steps: int, on_loss: Callable[[int, float], bool] | None = None) -> int:
        """Train ``steps`` at constant ``lr`` (or the range-test ramp): steps run."""
        for step in range(steps):
            apply_lr(optimizer, lr if on_loss is None else ramp[step])
            loss = mean_loss(backend.train_step(step_batches(step)))
            stop = not math.isfinite(loss) if on_loss is None else on_loss(step, loss)
            if backend.agree(stop):
                return step + 1
        return steps

    ratio = (cfg.lr_max / cfg.lr_min) ** (1.0 / (range_steps - 1))
    ramp = [cfg.lr_min * ratio**i for i in range(range_steps)]
    snapshot = _Snapshot(model, optimizer, backend)
    saved_rng = rng_state()
    done: dict[str, Any] = backend.broadcast(cache.load() if rank == 0 else None) or {}

    def unit(key: str, run: Callable[[], Any]) -> Any:
        if key in done:
            value = done[key]
        else:
            snapshot.restore()
            _seed_all(derive_seed(seed, "lr_search", stage.index, key, rank))
            value = run()
            cache.put(key, value)
        return value

    try:
        start = unit("start", lambda: _finite(held_out_loss()))
        start_score = math.inf if start is None else float(start)

        def range_test() -> dict[str, Any]:
            losses: list[float] = []
            state = {"avg": 0.0, "best": math.inf}

            def watch(step: int, loss: float) -> bool:
                losses.append(loss)
                if not math.isfinite(loss):
                    return True
                state["avg"] = cfg.smoothing * state["avg"] + (1 - cfg.smoothing) * loss
                avg = state["avg"] / (1 - cfg.smoothing ** (step + 1))
                state["best"] = min(state["best"], avg)
                return step >= 2 and avg > cfg.divergence * state["best"]

            ran = train(0.0, range_steps, watch)
            return {"steps": ran, "losses": [_finite(v) for v in losses]}

        ranged = unit("range", range_test)
        steps_run = int(ranged["steps"])
        range_losses: list[float | None] = ranged["losses"]
        finite = []
        for value in range_losses:
            if value is None:
                break
            finite.append(value)
        pick, edge, curve = pick_lr(ramp, finite, cfg)
        shown = "none: diverged at once" if edge is None else f"{edge:.3g}"
        say(f"range test: {steps_run} steps, edge {shown}, pick {pick:.3g} ({cfg.rule})")
        candidates = candidate_lrs(pick, cfg)
        trials: list[Trial] = []
        alive = list(candidates)
        limit = cfg.divergence * start_score if math.isfinite(start_score) else math.inf
        for rung, (_count, steps) in enumerate(rungs):
            scored: list[Trial] = []
            for lr in alive:

                def trial(lr: float = lr, steps: int = steps) -> dict[str, Any]:
                    ran = train(lr, steps)
                    score = held_out_loss() if ran == steps else math.nan
                    return {"steps": ran, "score": _finite(score)}

                outcome = unit(f"trial lr={lr!r} steps={steps}", trial)
                steps_run += int(outcome["steps"])
                score = outcome["score"]
                diverged = score is None or score > limit
                scored.append(Trial(lr, rung, steps, None if diverged else score, diverged))
                shown = "diverged" if diverged else f"held-out loss {score:.4g}"
                say(f"rung {rung}: lr {lr:.3g}, {steps} steps: {shown}")
            trials += scored
            ranked = sorted(
                scored, key=lambda t: (t.score is None, t.score if t.score is not None else 0, t.lr)
            )
            keep = max(len(alive) // cfg.eta, 1)
            alive = [t.lr for t in ranked[:keep] if not t.diverged]
        last = [t for t in trials if t.rung == trials[-1].rung and not t.diverged]
        fallback = not last
        chosen = min(candidates) if fallback else min(last, key=lambda t: (t.score, t.lr)).lr
    finally:
        snapshot.restore()
        set_rng_state(saved_rng)
    held = len(data.holdout)
    result = SearchResult(
        lr=chosen,
        rule=cfg.rule,
        pick=pick,
        edge=edge,
        range_lrs=ramp[: len(range_losses)],
        range_losses=range_losses,
        range_smoothed=[float(v) for v in curve],
        start_score=_finite(start_score),
        trials=trials,
        steps=steps_run,
        samples=steps_run * batch,
        eval_samples=held * (1 + len(trials)),
        holdout=held,
        counted=cfg.count_budget,
        fallback=fallback,
        candidates=candidates,
    )
    # Every rank computed the same result from all-reduced values; rank 0's is the one.
    return SearchResult.from_dict(backend.broadcast(result.to_dict()))

"""``stagetrain lr-find``: one stage's LR search on its own, with a plot for a human.

The search is the one ``lr: auto`` runs (:mod:`stagetrain.lr_search`), from the model's
initial weights — or from a run directory's checkpoint at the stage, to see what the
stage would choose at its real starting point. It writes ``lr-find-<stage>.png`` (the
range test's loss against the LR, raw and smoothed, with the edge, the pick and the
candidates; beside it every candidate's held-out loss per rung) and
``lr-find-<stage>.json`` (the whole :class:`~stagetrain.lr_search.SearchResult`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stagetrain.atomic import atomic_write_text
from stagetrain.checkpoint import CheckpointStore, load_checkpoint
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.distributed import DistInfo
from stagetrain.errors import CheckpointError, ConfigError
from stagetrain.handoff import apply_freeze, enter_stage, trainable_flags
from stagetrain.lr_search import LocalBackend, SearchResult, horizon, search_lr
from stagetrain.state import TrainState
from stagetrain.train import resume
from stagetrain.train.engine import TorchEngine


@dataclass
class LRFindResult:
    """What ``lr-find`` found and wrote."""

    result: SearchResult
    png: Path
    json: Path
    start: str
    """Where the search started: ``initial weights`` or the checkpoint used."""


def stage_named(curriculum: Curriculum, name: str) -> Stage:
    """The stage called ``name``."""
    for stage in curriculum.stages:
        if stage.name == name:
            return stage
    names = [s.name for s in curriculum.stages]
    raise ConfigError(f"--stage: the curriculum has no stage {name!r}; its stages: {names}")


def _checkpoint_at(run_dir: Path, stage: Stage) -> tuple[dict[str, Any], str]:
    """The checkpoint closest to the start of ``stage`` (its boundary one when kept)."""
    store = CheckpointStore(run_dir / "checkpoints")
    entries = store.entries()
    if not entries:
        raise CheckpointError(f"{run_dir}: no checkpoint to start the search from")
    found: list[tuple[int, dict[str, Any], str]] = []
    seen: list[str] = []
    for entry in entries:
        file = store.directory / entry.file
        payload = load_checkpoint(file)
        resume.check_payload(payload, str(file))
        state = TrainState.from_dict(payload["state"])
        seen.append(f"{entry.file} (stage {state.stage_index}, stage step {state.stage_step})")
        if state.stage_index == stage.index:
            found.append((state.stage_step, payload, str(file)))
    if not found:
        raise CheckpointError(
            f"{run_dir}: no checkpoint in stage {stage.name!r} (index {stage.index}); "
            f"kept: {', '.join(seen)}"
        )
    _, payload, path = min(found, key=lambda f: f[0])
    return payload, path


def lr_find(
    curriculum: Curriculum,
    stage_name: str,
    out: Path,
    *,
    run_dir: Path | None = None,
    device: str | torch.device | None = None,
    echo: Any = print,
) -> LRFindResult:
    """Run ``stage_name``'s LR search alone; write its plot and scores under ``out``.

    The stage's ``optimizer.auto`` options apply (the defaults when its LR is not
    ``auto``). Nothing of a run directory is changed.
    """
    stage = stage_named(curriculum, stage_name)
    config = curriculum.config
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )  # fmt: skip
    model = curriculum.build_model().to(dev)
    teacher = curriculum.build_teacher()
    if teacher is not None:
        teacher.to(dev).eval()
    trainable = trainable_flags(model)
    torch.manual_seed(config.seed)
    if run_dir is None:
        start = "the model's initial weights"
        optimizer = enter_stage(stage.config, stage.index, model, None, trainable)
    else:
        payload, path = _checkpoint_at(Path(run_dir), stage)
        state = TrainState.from_dict(payload["state"])
        engine = TorchEngine(DistInfo(0, 1, 0), dev)
        optimizer = resume.restore(payload, curriculum, model, state, engine)
        start = f"{path} (stage step {state.stage_step})"
        if state.stage_step == 0:  # a boundary checkpoint: the stage's hand-off comes next
            optimizer = enter_stage(stage.config, stage.index, model, optimizer, trainable)
        else:
            field = f"stages[{stage.index}].freeze"
            apply_freeze(model, stage.config.freeze, trainable, field=field)
    assert stage.config.optimizer is not None
    cfg = stage.config.optimizer.search
    steps = cfg.search_steps(horizon(stage))
    echo(f"lr-find: stage {stage.name!r} from {start}: {steps:,} search steps")
    result = search_lr(
        stage,
        model,
        optimizer,
        LocalBackend(stage, model, optimizer, teacher=teacher, device=dev),
        seed=config.seed,
        cfg=cfg,
        echo=lambda line: echo("  " + line),
    )
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"lr-find-{stage.name}.json"
    atomic_write_text(
        json_path,
        json.dumps({"stage": stage.name, "start": start, **result.to_dict()}, indent=1),
    )
    png_path = out / f"lr-find-{stage.name}.png"
    plot(result, png_path, title=f"{config.name}: stage {stage.name!r}")
    return LRFindResult(result, png_path, json_path, start)


def plot(result: SearchResult, path: Path, *, title: str = "") -> None:
    """The range test (loss vs LR) beside the candidates' held-out losses per rung."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lrs = result.range_lrs
    raw = [math.nan if v is None else v for v in result.range_losses]
    left.plot(lrs, raw, color="0.7", lw=1, label="training loss")
    smoothed = result.range_smoothed
    left.plot(lrs[: len(smoothed)], smoothed, color="C0", lw=2, label="smoothed")
    if result.edge is not None:
        left.axvline(result.edge, color="C3", ls="--", lw=1, label=f"edge {result.edge:.3g}")
    left.axvline(result.pick, color="C2", ls="--", lw=1, label=f"pick {result.pick:.3g}")
    for lr in result.candidates:
        left.axvline(lr, color="C1", alpha=0.25, lw=4)
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        left.set_ylim(low - 0.1 * (high - low + 1e-12), high + 0.5 * (high - low + 1e-12))
    left.set_xscale("log")
    left.set_xlabel("learning rate (range test, one step each)")
    left.set_ylabel("loss")
    left.set_title("LR range test (candidates shaded)")
    left.legend(fontsize=8)
    rungs = sorted({t.rung for t in result.trials})
    for rung in rungs:
        trials = [t for t in result.trials if t.rung == rung]
        ok = [t for t in trials if not t.diverged]
        right.plot(
            [t.lr for t in ok], [t.score for t in ok], "o-",
            label=f"rung {rung}: {trials[0].steps} steps",
        )  # fmt: skip
        bad = [t.lr for t in trials if t.diverged]
        if bad:
            right.plot(bad, [result.start_score or 0.0] * len(bad), "x", color="C3")
    right.axvline(result.lr, color="k", ls=":", label=f"chosen {result.lr:.3g}")
    if result.start_score is not None:
        right.axhline(result.start_score, color="0.6", lw=1, label="at the stage's start")
    right.set_xscale("log")
    right.set_xlabel("learning rate (constant)")
    right.set_ylabel("held-out loss")
    right.set_title("successive halving (x: diverged)" + (" — fallback" if result.fallback else ""))
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""What a search records (trials, results), the data it draws from, and the snapshot that
puts the model, optimizer and generators back bitwise."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stagetrain.config import AutoLRConfig
from stagetrain.sampler import StageSampler
from stagetrain.seeding import derive_seed

if TYPE_CHECKING:
    from stagetrain.curriculum import Stage


# --- checks before training -----------------------------------------------------------------


from stagetrain.lr_search.backend import (
    SearchBackend,
)
from stagetrain.lr_search.checks import (
    holdout_counts,
)


@dataclass
class Trial:
    """One candidate trained in one rung of successive halving."""

    lr: float
    rung: int
    steps: int
    """Steps it was to train (fewer ran when it diverged)."""
    score: float | None
    """Held-out loss after training; None when it diverged."""
    diverged: bool


@dataclass
class SearchResult:
    """What a search found and what it cost (all JSON-able through :meth:`to_dict`)."""

    lr: float
    """The chosen peak LR."""
    rule: str
    pick: float
    """The range test's pick."""
    edge: float | None
    """LR of the smoothed range-test loss's minimum."""
    range_lrs: list[float]
    range_losses: list[float | None]
    """Training loss at each range-test step (None: not finite)."""
    range_smoothed: list[float]
    start_score: float | None
    """Held-out loss at the stage's start (None: not finite)."""
    trials: list[Trial]
    steps: int
    """Training steps the search ran (of the stage's batch size)."""
    samples: int
    eval_samples: int
    """Samples of the held-out passes (forward only)."""
    holdout: int
    counted: bool
    fallback: bool = False
    candidates: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        fields = dict(data)
        fields["trials"] = [Trial(**t) for t in data["trials"]]
        return cls(**fields)

    def summary(self) -> dict[str, Any]:
        """The short form kept in the train state (checkpoint, ``summary.json``)."""
        return {
            "lr": self.lr,
            "steps": self.steps,
            "samples": self.samples,
            "eval_samples": self.eval_samples,
            "counted": self.counted,
            "fallback": self.fallback,
        }

    def scores(self) -> dict[str, float | None]:
        """Each candidate's score in the last rung it reached (``"%g" % lr`` keys)."""
        out: dict[str, float | None] = {}
        for trial in self.trials:  # in rung order: later rungs overwrite
            out[f"{trial.lr:.4g}"] = trial.score
        return out


# --- the search --------------------------------------------------------------------------------


class SearchData:
    """The held-out slice and the search's own batches for one stage (module docstring)."""

    def __init__(self, stage: Stage, cfg: AutoLRConfig, seed: int, steps: int) -> None:
        field = f"stages[{stage.index}].optimizer.auto.holdout"
        counts = holdout_counts(stage, cfg, field=field)
        sizes, offsets = stage.data.sizes, stage.data.offsets
        held: list[np.ndarray] = []
        for k, (count, size) in enumerate(zip(counts, sizes, strict=True)):
            rng = np.random.default_rng([derive_seed(seed, "lr_search", "holdout"), stage.index, k])
            held.append(np.sort(rng.choice(int(size), int(count), replace=False)).astype(np.int64))
        self.held = held
        self.holdout = np.concatenate([h + offsets[k] for k, h in enumerate(held)])
        self.rest_sizes = sizes - counts
        self.rest_offsets = np.concatenate([[0], np.cumsum(self.rest_sizes)[:-1]])
        self.offsets = offsets
        self.sampler = StageSampler(
            self.rest_sizes,
            stage.weights,
            stage.batch_size,
            max(steps, 1),
            derive_seed(seed, "lr_search", "batches"),
            stage.index,
        )

    def _to_data(self, positions: np.ndarray) -> np.ndarray:
        """Positions among the non-held-out samples -> indices into the stage's data."""
        source = np.searchsorted(self.rest_offsets, positions, side="right") - 1
        out = np.empty_like(positions)
        for k in np.unique(source):
            mask = source == k
            local = positions[mask] - self.rest_offsets[k]
            # The i-th sample not held out is i plus the held-out samples before it.
            shifted = self.held[k] - np.arange(len(self.held[k]))
            out[mask] = local + np.searchsorted(shifted, local, side="right") + self.offsets[k]
        return out

    def batch(self, step: int) -> np.ndarray:
        """Indices (into the stage's data) of the search's global batch ``step``."""
        return self._to_data(self.sampler.global_batch(step))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # every device's generator
    np.random.seed(seed)
    random.seed(seed)


class _Snapshot:
    """A CPU copy of the weights, optimizer state and driver state, put back bitwise."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, backend: SearchBackend
    ) -> None:
        self.model, self.optimizer, self.backend = model, optimizer, backend
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.optim = _cpu_copy(optimizer.state_dict())
        self.extra = copy.deepcopy(backend.extra_state())

    def restore(self) -> None:
        self.model.load_state_dict(self.weights)
        # load_state_dict keeps tensors that already have the parameter's dtype and device:
        # hand it a fresh copy, or the next steps would update the snapshot in place.
        self.optimizer.load_state_dict(copy.deepcopy(self.optim))
        self.model.zero_grad(set_to_none=True)
        self.backend.load_extra_state(copy.deepcopy(self.extra))


def _cpu_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None

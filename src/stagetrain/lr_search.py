"""``lr: auto``: a stage's peak learning rate, searched at its start on its own data.

A stage of harder data (or longer context) often wants another learning rate than the
stage before it, and which one is known only by trying. The search tries, from the
exact point where the stage starts (the weights and optimizer state after its
hand-off), in two measurements:

1. **LR range test** (Smith 2017, "Cyclical learning rates"): ``range_steps`` steps
   whose LR grows geometrically from ``lr_min`` to ``lr_max``, stopped once the loss
   diverges (its moving average exceeds ``divergence`` x its lowest, or it is not
   finite). For the pick the loss curve is smoothed by an exponential moving average
   run forwards and then backwards, which has no lag along the LR axis (values above
   the starting level capped first, so a diverging tail does not leak backwards). The
   *edge* is the LR where the smoothed loss is lowest — if it dipped at least 5 %
   below its starting level; on a plateau (no such dip: the minimum would be noise) it
   is the *divergence point*, the last LR before the loss's moving average first rises
   5 % above its starting level (and the earlier of the two when both exist). The
   pick is, by ``rule``:

   * ``divergence`` (default): ``fraction`` (default 0.1) x the edge — the classic
     "a tenth of where the loss turns";
   * ``steepest``: the LR below the edge where the smoothed loss falls fastest per unit
     of log(LR).

2. **Successive halving** (Jamieson & Talwalkar 2016): ``candidates`` LRs, the pick x
   ``spread``^k for k centred on 0 (five candidates: pick/4 ... 4 pick, i.e. the edge
   / 40 ... the edge x 0.4 by default), each trained
   from the stage's start for ``trial_steps`` at its constant LR and scored by the
   stage's own loss on a held-out slice; the best ``1 / eta`` train again from the
   start for ``eta`` x as many steps, and so on down to two; the best of the last rung
   wins. A candidate whose training loss is not finite, or whose held-out loss exceeds
   ``divergence`` x the held-out loss at the stage's start, has diverged and never
   wins. When every candidate of the last rung diverged the smallest candidate is
   chosen and the result says ``fallback`` (drivers log a warning).

The stage then trains with the chosen LR as its peak, times its warmup and schedule
(the search itself runs at constant LRs and without the stage's warmup). Trials of a
few steps favour LRs that make quick progress: on long stages of noisy tasks they can
choose higher LRs than the best for the whole stage (short-horizon bias; see
benchmarks/README.md for how large that is on the built-in recipes).

Determinism: every unit of the search (the start score, the range test, each trial)
begins from the same snapshot with the random generators seeded by (seed, stage,
unit, rank), so each unit's result is a pure function of the stage's starting point.
A search repeated — or resumed after a crash from the units it had finished, kept by
a :class:`SearchCache` — makes the same choice. Afterwards the weights, the optimizer
state, the driver's own state (an fp16 loss scale) and every random generator are put
back bitwise.

Data: the search never draws from the stage's training stream. Of each source of the
stage (replayed ones included) a seeded random share of ``holdout`` samples is held
out, in proportion to the stage's mixture at its first step; the search's batches are
drawn from the rest by a :class:`~stagetrain.sampler.StageSampler` of its own seed,
with the stage's batch size and mixture weights, and every trial sees the same batches
(common random numbers make candidates comparable with few steps)::

    source k of the stage:  [ held out: h_k samples, score ][ the rest: search batches ]
    (the stage itself still trains on all of its data, as planned)

Budget: ``range_steps + sum_k n_k x trial_steps x eta^k`` training steps of the
stage's batch size (:attr:`~stagetrain.config.AutoLRConfig.search_steps`) and one
held-out pass per trial. They are not part of the stage's duration unless
``count_budget: true``, which shortens the stage's training by the search's steps.

Drivers: :func:`stagetrain.fit` runs the search at the start of every ``lr: auto``
stage (through its engine: DDP ranks train the search together, rank 0 decides);
``stagetrain lr-find`` runs it alone and plots it; a user's own loop calls
:func:`search_lr` with a :class:`LocalBackend` and sets ``stage.auto_lr``.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from stagetrain.apportion import apportion
from stagetrain.batch import Batch, batch_size, to_device
from stagetrain.config import AutoLRConfig, CurriculumConfig, StageConfig
from stagetrain.errors import ConfigError
from stagetrain.optim import apply_lr, takes_lr
from stagetrain.rng import rng_state, set_rng_state
from stagetrain.sampler import StageSampler
from stagetrain.seeding import derive_seed

if TYPE_CHECKING:
    from stagetrain.curriculum import Stage

__all__ = [
    "LocalBackend",
    "SearchBackend",
    "SearchCache",
    "SearchResult",
    "Trial",
    "check_stage",
    "describe_search",
    "search_lr",
    "training_steps",
]


# --- checks before training -----------------------------------------------------------------


def training_steps(cfg: StageConfig, steps: int, *, field: str) -> int:
    """The steps a stage trains: its duration, less the search's when it is counted.

    Raises:
        ConfigError: when the search needs more steps than the stage has.
    """
    opt = cfg.optimizer
    if opt is None or not opt.is_auto:
        return steps
    auto = opt.search
    need = auto.search_steps
    counted = auto.count_budget
    if need > steps or (counted and need >= steps):
        raise ConfigError(
            f"{field}.optimizer.auto: the LR search trains {need:,} steps "
            f"({auto.range_steps} range test + {need - auto.range_steps:,} trials), "
            f"{'not less than' if counted and need == steps else 'more than'} the stage's "
            f"{steps:,}; lower range_steps, trial_steps or candidates"
        )
    return steps - need if counted else steps


def check_stage(stage: Stage, config: CurriculumConfig) -> None:
    """An ``lr: auto`` stage can be searched: its optimizer has an LR, no ``global_lr``
    overrides it, and its data can spare the held-out slice.

    Raises:
        ConfigError: naming the field.
    """
    opt = stage.config.optimizer
    if opt is None or not opt.is_auto:
        return
    field = f"stages[{stage.index}].optimizer"
    if config.global_lr is not None:
        raise ConfigError(
            f"{field}.lr: 'auto' has no effect under global_lr, which sets every stage's "
            "LR; remove one of them"
        )
    if not takes_lr(opt, field=field):
        raise ConfigError(
            f"{field}.lr: 'auto' needs an optimizer with a learning rate; {opt.label} takes "
            "no 'lr' argument"
        )
    holdout_counts(stage, opt.search, field=f"{field}.auto.holdout")


def holdout_counts(stage: Stage, cfg: AutoLRConfig, *, field: str) -> np.ndarray:
    """Held-out samples per source: ``holdout`` shared by the mixture at the stage's start."""
    sizes = stage.data.sizes
    total = int(sizes.sum())
    wanted = cfg.holdout if isinstance(cfg.holdout, int) else round(cfg.holdout * total)
    counts = apportion(stage.weights, max(int(wanted), 1), 1)[0]
    for k, (count, size) in enumerate(zip(counts, sizes, strict=True)):
        if count > size // 2:
            label = stage.sources[k].label
            raise ConfigError(
                f"{field}: holding out {int(count):,} of the {int(size):,} samples of source "
                f"{label!r} would leave less than half for the search; the stage is too small "
                f"for a held-out slice of {cfg.holdout!r} (lower holdout)"
            )
    return counts


def describe_search(stage: Stage) -> str:
    """The search's budget in words, for ``plan`` ("" unless the stage's LR is ``auto``)."""
    opt = stage.config.optimizer
    if opt is None or not opt.is_auto:
        return ""
    auto = opt.search
    steps = auto.search_steps
    counted = "counted" if auto.count_budget else "not counted"
    return f"search {steps:,} steps ({steps * stage.batch_size:,} samples, {counted})"


# --- how the search trains and scores ----------------------------------------------------------


class SearchBackend(Protocol):
    """How the search trains and evaluates (the driver's engine), see :class:`LocalBackend`.

    Every rank calls the same methods in the same order: ``train_step`` and ``eval_sum``
    may run collectives (DDP's gradient all-reduce), ``all_sum``, ``agree`` and
    ``broadcast`` are collectives.
    """

    rank: int
    world_size: int

    def train_step(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Forward, backward and one optimizer step at the LR already set; this rank's
        mean loss."""
        ...

    def eval_sum(self, batch: Batch) -> torch.Tensor:
        """The stage's loss on ``batch`` (no gradients, eval mode) times its sample count."""
        ...

    def all_sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over ranks."""
        ...

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        ...

    def extra_state(self) -> dict[str, Any]:
        """Driver state the search changes besides the weights and optimizer (a loss scale)."""
        ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...


class LocalBackend:
    """A :class:`SearchBackend` for one process: plain forward, backward and step.

    Args:
        stage: the stage searched (its calling convention, loss and ``grad_clip``).
        model: the model, on ``device``.
        optimizer: its optimizer for the stage (after the stage's hand-off).
        teacher: the frozen teacher, for ``kl_distill`` terms.
        device: where batches go (default: the model's device).
    """

    rank = 0
    world_size = 1

    def __init__(
        self,
        stage: Stage,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        teacher: torch.nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.stage, self.model, self.optimizer, self.teacher = stage, model, optimizer, teacher
        first = next(iter(model.parameters()), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu")
        )  # fmt: skip
        assert stage.config.optimizer is not None
        self.grad_clip = stage.config.optimizer.grad_clip

    def _loss(self, batch: Batch) -> torch.Tensor:
        stage = self.stage
        pred = stage.io.predict(self.model, batch)
        teacher_pred = None
        if stage.loss.needs_teacher:
            assert self.teacher is not None, "a kl_distill term needs the teacher"
            with torch.no_grad():
                teacher_pred = stage.io.predict(self.teacher, batch)
        return stage.loss(pred, teacher=teacher_pred, model=self.model)[0]

    def train_step(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        self.model.train()
        total = torch.zeros((), device=self.device)
        for micro in micro_batches:
            loss = self._loss(to_device(micro, self.device)) / len(micro_batches)
            loss.backward()
            total = total + loss.detach()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def eval_sum(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        try:
            with torch.no_grad():
                batch = to_device(batch, self.device)
                return self._loss(batch).detach().double() * batch_size(batch)
        finally:
            self.model.train()

    def all_sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return values

    def agree(self, flag: bool) -> bool:
        return flag

    def broadcast(self, obj: Any) -> Any:
        return obj

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


class SearchCache(Protocol):
    """Finished units of a search (JSON-able values by key), so a resumed search skips them.

    Only rank 0's :meth:`load` is used (it is broadcast); every rank calls :meth:`put`.
    """

    def load(self) -> dict[str, Any]:
        """The units finished so far."""
        ...

    def put(self, key: str, value: Any) -> None: ...


class _NoCache:
    def load(self) -> dict[str, Any]:
        return {}

    def put(self, key: str, value: Any) -> None:
        pass


# --- results ---------------------------------------------------------------------------------


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


DIP = 0.05
"""A range test's loss must fall (rise) this fraction below (above) its starting level for
a minimum (a divergence) to count: loss noise on a plateau is smaller."""


def _ema(x: np.ndarray, beta: float) -> np.ndarray:
    """The bias-corrected exponential moving average of ``x`` (causal)."""
    out = np.empty_like(x)
    avg = 0.0
    for i, v in enumerate(x):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def _start_level(x: np.ndarray) -> float:
    """The curve's starting level: the median of its first tenth (at least three points)."""
    return float(np.median(x[: max(3, len(x) // 10)]))


def smooth(values: Sequence[float] | np.ndarray, beta: float) -> np.ndarray:
    """A zero-phase exponential moving average: forwards, then backwards over the result
    (bias-corrected both ways), so a drop or a rise is not shifted along the axis.

    Values above the curve's starting level are capped there first: a diverging tail,
    often 10-100x the loss, would otherwise leak backwards into the LRs just before it
    and hide the minimum."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return x
    x = np.minimum(x, _start_level(x))
    return _ema(_ema(x, beta)[::-1], beta)[::-1]


def range_edge(losses: Sequence[float], beta: float) -> tuple[int, np.ndarray]:
    """Index of the range test's edge and the smoothed curve.

    When the smoothed loss dips :data:`DIP` below its starting level, the edge is its
    minimum. On a plateau (no such dip: the minimum is noise) it is the *divergence
    point*, the last step before the loss's causal moving average first rises above the
    starting level by :data:`DIP` or by three standard deviations of that average on
    the plateau, whichever is more (the noise estimated from the first half's spread).
    """
    x = np.asarray(losses, dtype=np.float64)
    curve = smooth(x, beta)
    start = _start_level(x)
    low = int(np.argmin(curve))
    if curve[low] < start * (1 - DIP):
        return low, curve
    half = x[: max(3, len(x) // 2)]
    noise = 1.4826 * float(np.median(np.abs(half - np.median(half))))
    margin = max(DIP * abs(start), 3 * noise * math.sqrt((1 - beta) / (1 + beta)))
    above = np.nonzero(_ema(x, beta) > start + margin)[0]
    return (max(int(above[0]) - 1, 0) if len(above) else len(x) - 1), curve


def pick_lr(
    lrs: Sequence[float], losses: Sequence[float], cfg: AutoLRConfig
) -> tuple[float, float | None, np.ndarray]:
    """The range test's pick, its edge and the smoothed curve (see the module docstring).

    ``losses`` are the finite losses of the first ``len(losses)`` LRs of ``lrs``.
    """
    if len(losses) < 2:
        # Diverged at once: the smallest LR tried is the only evidence.
        return float(lrs[0]), None, np.asarray(losses, dtype=np.float64)
    low, curve = range_edge(losses, cfg.smoothing)
    edge = float(lrs[low])
    if cfg.rule == "divergence":
        return cfg.fraction * edge, edge, curve
    if low == 0:
        return float(lrs[0]), edge, curve
    slope = np.gradient(curve[: low + 1], np.log(np.asarray(lrs[: low + 1], dtype=np.float64)))
    return float(lrs[int(np.argmin(slope))]), edge, curve


def candidate_lrs(pick: float, cfg: AutoLRConfig) -> list[float]:
    """``pick x spread^k`` for ``candidates`` values of k centred on 0, ascending."""
    first = -((cfg.candidates - 1) // 2)
    return [pick * cfg.spread ** (first + i) for i in range(cfg.candidates)]


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
    longest = max([cfg.range_steps] + [steps for _, steps in cfg.rungs()])
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

    ratio = (cfg.lr_max / cfg.lr_min) ** (1.0 / (cfg.range_steps - 1))
    ramp = [cfg.lr_min * ratio**i for i in range(cfg.range_steps)]
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

            ran = train(0.0, cfg.range_steps, watch)
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
        for rung, (_count, steps) in enumerate(cfg.rungs()):
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

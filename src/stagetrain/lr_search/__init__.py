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
   *edge* is the LR where the smoothed loss is lowest — if it dipped below its
   starting level by more than a margin, 5 % of it or 1.5 standard deviations of the
   per-step loss noise, whichever is more; on a plateau (no such dip: the minimum
   would be noise) it is the *divergence point*, the last LR at which the loss's
   moving average is still within that margin of its starting level (the last, not
   the first beyond it: a noisy per-batch loss crosses any threshold by chance on a
   long plateau, and comes back). The pick is, by ``rule``:

   * ``divergence`` (default): ``fraction`` (default 0.5) x the edge, the top of the
     candidates' ladder (the classic single pick is a tenth of where the loss turns;
     the ladder reaches below that);
   * ``steepest``: the LR below the edge where the smoothed loss falls fastest per unit
     of log(LR).

2. **Successive halving** (Jamieson & Talwalkar 2016): ``candidates`` LRs, the pick x
   ``spread``^k for k = 0, -1, ... (``ladder: below``, the default: five candidates
   with spread sqrt(10), the edge / 2 ... the edge / 200) or k centred on 0 (``ladder:
   centred``), each trained from the stage's start for
   ``trial_steps`` (a count, or a share of the stage's steps) at its constant LR and
   scored by the stage's own loss on a held-out slice; the best ``1 / eta`` train
   again from the start for ``eta`` x as many steps, and so on down to two; the best of
   the last rung wins. A candidate whose training loss is not finite, or whose held-out loss exceeds
   ``divergence`` x the held-out loss at the stage's start, has diverged and never
   wins. When every candidate of the last rung diverged the smallest candidate is
   chosen and the result says ``fallback`` (drivers log a warning).

The stage then trains with the chosen LR as its peak, times its warmup and schedule
(the search itself runs at constant LRs and without the stage's warmup). Trials of a
few steps favour LRs that make quick progress: on long stages of noisy tasks they can
choose higher LRs than the best for the whole stage (short-horizon bias; see
benchmarks/README.md for how large that is on the built-in recipes), which is why the
default ladder lies below the pick.

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
stage's batch size (:meth:`~stagetrain.config.AutoLRConfig.search_steps`) and one
held-out pass per trial. They are not part of the stage's duration unless
``count_budget: true``, which shortens the stage's training by the search's steps.

Drivers: :func:`stagetrain.fit` runs the search at the start of every ``lr: auto``
stage (through its engine: DDP ranks train the search together, rank 0 decides);
``stagetrain lr-find`` runs it alone and plots it; a user's own loop calls
:func:`search_lr` with a :class:`LocalBackend` and sets ``stage.auto_lr``.
"""

from __future__ import annotations

from stagetrain.lr_search.backend import LocalBackend as LocalBackend
from stagetrain.lr_search.backend import SearchBackend as SearchBackend
from stagetrain.lr_search.backend import SearchCache as SearchCache
from stagetrain.lr_search.checks import check_stage as check_stage
from stagetrain.lr_search.checks import describe_search as describe_search
from stagetrain.lr_search.checks import holdout_counts as holdout_counts
from stagetrain.lr_search.checks import horizon as horizon
from stagetrain.lr_search.checks import training_steps as training_steps
from stagetrain.lr_search.results import SearchData as SearchData
from stagetrain.lr_search.results import SearchResult as SearchResult
from stagetrain.lr_search.results import Trial as Trial
from stagetrain.lr_search.rules import candidate_lrs as candidate_lrs
from stagetrain.lr_search.rules import pick_lr as pick_lr
from stagetrain.lr_search.rules import range_edge as range_edge
from stagetrain.lr_search.rules import smooth as smooth
from stagetrain.lr_search.search import search_lr as search_lr

__all__ = [
    "LocalBackend",
    "SearchBackend",
    "SearchCache",
    "SearchData",
    "SearchResult",
    "Trial",
    "candidate_lrs",
    "check_stage",
    "describe_search",
    "holdout_counts",
    "horizon",
    "pick_lr",
    "range_edge",
    "search_lr",
    "smooth",
    "training_steps",
]

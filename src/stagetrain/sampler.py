"""Deterministic, communication-free sampling of each step's batch.

The sample indices of global batch ``t`` in a stage are a pure function of
``(seed, stage index, stage-local step t)``; a rank takes its slice of that batch by
``(rank, world_size)``. Nothing depends on what was drawn before, so resume restores
only counters (never "skip the first N batches") and ranks never talk to each other.

Each source is an endless stream of epochs; epoch ``e`` of source ``k`` is a
permutation seeded by ``(seed, stage, k, e)``. A mixture gives each step a whole
number of samples per source (:class:`Apportionment`): source ``k``'s stream position
at the start of step ``t`` is its cumulative count ``C_k(t)``, and step ``t`` draws
positions ``[C_k(t), C_k(t + 1))``. Layout::

    ideal cumulative share      P_j(t) = B * sum_{u < t} (p_0(u) + ... + p_{j-1}(u))
    prefix floors               F_j(t) = floor(P_j(t) + 1/2),  F_0 = 0,  F_n = B t
    cumulative count            C_k(t) = F_{k+1}(t) - F_k(t)

For constant weights ``P_j(t) = B t S_j`` is evaluated in exact rational arithmetic,
so any step's counts and cursor cost O(number of sources), whatever the stage length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stagetrain.apportion import CHUNK as CHUNK
from stagetrain.apportion import SHARE_POINTS as SHARE_POINTS
from stagetrain.apportion import Apportionment as Apportionment
from stagetrain.apportion import apportion as apportion
from stagetrain.apportion import constant_value as constant_value
from stagetrain.schedules import Schedule


def rank_share(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous slice of a global batch split evenly over ``world_size``."""
    if len(batch) % world_size:
        raise ValueError(f"batch size {len(batch)} is not divisible by world size {world_size}")
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


class StageSampler:
    """Indices of each step's batch for one stage, into the concatenation of its sources.

    Construction and every query are independent of the stage's length for constant
    weights (see :class:`Apportionment` for scheduled ones).

    Args:
        sizes: number of samples in each source.
        weights: mixture weight of each source: a number or a schedule (stage-local time).
        batch_size: global batch size.
        steps: stage length in steps.
        seed: curriculum seed.
        stage_index: position of the stage in the curriculum.
    """

    def __init__(
        self,
        sizes: Sequence[int] | np.ndarray,
        weights: Sequence[Schedule | float],
        batch_size: int,
        steps: int,
        seed: int,
        stage_index: int,
    ) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.stage_index = stage_index
        self.apportionment = Apportionment(weights, batch_size, steps)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._recent: dict[int, np.ndarray] = {}

    @property
    def counts(self) -> np.ndarray:
        """Samples per source of every step, shape ``(steps, sources)`` (O(steps) memory)."""
        return self.apportionment.rows()

    @property
    def cursor(self) -> np.ndarray:
        """Stream position of every source at the start of every step and at the end,
        shape ``(steps + 1, sources)`` (O(steps) memory; use :meth:`step_cursor`)."""
        return np.array([self.apportionment.cumulative(t) for t in range(self.steps + 1)])

    def step_cursor(self, step: int) -> np.ndarray:
        """Stream position of every source at the start of ``step``."""
        return self.apportionment.cumulative(step)

    def step_counts(self, step: int) -> np.ndarray:
        """Samples each source gives to ``step``."""
        return self.apportionment.counts(step)

    def resume_state(self, step: int) -> dict[str, Any] | None:
        """Counters that let a resumed process reach ``step`` at once (scheduled weights
        only; see :meth:`Apportionment.resume_state`). Store it in the checkpoint."""
        return self.apportionment.resume_state(step)

    def restore(self, state: dict[str, Any] | None) -> None:
        """Use what :meth:`resume_state` returned (before drawing the resumed steps)."""
        self.apportionment.restore(state)

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            rng = np.random.default_rng([self.seed, self.stage_index, source, epoch])
            size = int(self.sizes[source])
            # Shuffle in place in 4-byte integers: memory stays at 4 bytes per sample.
            perm = np.arange(size, dtype=np.int32 if size < 2**31 else np.int64)
            rng.shuffle(perm)
            # Keep only the two most recent epochs per source: a step spans at most two.
            stale = [k for k in self._perm_cache if k[0] == source and k[1] < epoch - 1]
            for k in stale:
                del self._perm_cache[k]
            self._perm_cache[key] = perm
        return perm

    def _stream(self, source: int, start: int, count: int) -> np.ndarray:
        """Positions ``[start, start + count)`` of a source's endless epoch stream."""
        size = int(self.sizes[source])
        parts = []
        # Slices of at most two epochs per step in practice; a loop keeps it general.
        while count > 0:
            epoch, offset = divmod(start, size)
            take = min(count, size - offset)
            parts.append(self._permutation(source, epoch)[offset : offset + take])
            start += take
            count -= take
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out.astype(np.int64)

    def global_batch(self, step: int) -> np.ndarray:
        """All ``batch_size`` indices of stage-local step ``step``, in a shuffled order."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside the stage's {self.steps} steps")
        if len(self.sizes) == 1:  # one source: its stream advances by a batch a step
            return self._stream(0, step * self.batch_size, self.batch_size)
        cursor = self._cumulative(step)
        counts = self._cumulative(step + 1) - cursor
        parts = [
            self._stream(k, int(cursor[k]), int(counts[k])) + self.offsets[k]
            for k in range(len(self.sizes))
            if counts[k] > 0
        ]
        if len(parts) == 1:
            return parts[0]  # one source: its epoch permutation is already shuffled
        batch = np.concatenate(parts)
        # Interleave sources so that every rank's slice sees the mixture, not one source.
        rng = np.random.default_rng([self.seed, self.stage_index, step, 0x5EED])
        return batch[rng.permutation(len(batch))]

    def _cumulative(self, step: int) -> np.ndarray:
        """``Apportionment.cumulative``, remembering the last two answers: consecutive steps
        ask for ``step + 1`` and then for it again as the next step's start."""
        hit = self._recent.get(step)
        if hit is None:
            hit = self.apportionment.cumulative(step)
            if len(self._recent) >= 2:
                self._recent.pop(next(iter(self._recent)))
            self._recent[step] = hit
        return hit

    def rank_batch(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This rank's contiguous share of the global batch of ``step``."""
        return rank_share(self.global_batch(step), rank, world_size)

    def source_totals(self) -> np.ndarray:
        """Samples drawn from each source over the whole stage (exact)."""
        return self.apportionment.totals()

    def source_shares(self) -> np.ndarray:
        """Each source's share of the stage's samples (see :meth:`Apportionment.shares`)."""
        return self.apportionment.shares()

    def source_repeats(self) -> np.ndarray:
        """How many passes over each source the stage makes (samples drawn / size)."""
        return self.source_shares() * (self.batch_size * self.steps) / self.sizes

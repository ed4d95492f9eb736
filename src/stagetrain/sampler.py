"""Deterministic, communication-free sampling of each step's batch.

The sample indices of global batch ``t`` in a stage are a pure function of
``(seed, stage index, stage-local step t)``; a rank takes its slice of that batch by
``(rank, world_size)``. Nothing depends on what was drawn before, so resume restores
only counters (never "skip the first N batches") and ranks never talk to each other.

Each source is an endless stream of epochs; epoch ``e`` of source ``k`` is a
permutation seeded by ``(seed, stage, k, e)``. A mixture gives each step a whole
number of samples per source by carrying the rounding error forward (so over any
window the shares match the weights to within one sample per source), and the
cumulative counts are precomputed once when the stage is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stagetrain.schedules import Schedule


def rank_share(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous slice of a global batch split evenly over ``world_size``."""
    if len(batch) % world_size:
        raise ValueError(f"batch size {len(batch)} is not divisible by world size {world_size}")
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def apportion(weights: Sequence[Schedule], batch_size: int, steps: int) -> np.ndarray:
    """Samples per source for every step: an int array of shape ``(steps, n_sources)``.

    Each row sums to ``batch_size``; the running totals stay within one sample of
    ``batch_size * cumulative share`` for every source (largest-remainder rounding with
    the remainder carried to the next step).
    """
    n = len(weights)
    if n == 1:
        return np.full((steps, 1), batch_size, dtype=np.int64)
    counts = np.empty((steps, n), dtype=np.int64)
    carry = np.zeros(n)
    for t in range(steps):
        w = np.array([max(float(f(t)), 0.0) for f in weights])
        total = w.sum()
        share = w / total if total > 0 else np.full(n, 1.0 / n)
        desired = batch_size * share + carry
        base = np.floor(desired).astype(np.int64)
        short = batch_size - int(base.sum())
        if short > 0:
            base[np.argsort(-(desired - base), kind="stable")[:short]] += 1
        elif short < 0:  # only through float error; take from the largest overshoot
            base[np.argsort(desired - base, kind="stable")[:-short]] -= 1
        counts[t] = base
        carry = desired - base
    return counts


class StageSampler:
    """Indices of each step's batch for one stage, into the concatenation of its sources.

    Args:
        sizes: number of samples in each source.
        weights: mixture weight schedule of each source (stage-local time).
        batch_size: global batch size.
        steps: stage length in steps (counts are precomputed for these).
        seed: curriculum seed.
        stage_index: position of the stage in the curriculum.
    """

    def __init__(
        self,
        sizes: Sequence[int] | np.ndarray,
        weights: Sequence[Schedule],
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
        counts = apportion(weights, batch_size, steps)
        self.counts = counts
        # cursor[t, k]: stream position of source k at the start of step t.
        self.cursor = np.vstack([np.zeros((1, len(sizes)), np.int64), np.cumsum(counts, axis=0)])
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

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
        parts = [
            self._stream(k, int(self.cursor[step, k]), int(self.counts[step, k])) + self.offsets[k]
            for k in range(len(self.sizes))
            if self.counts[step, k] > 0
        ]
        if len(parts) == 1:
            return parts[0]  # one source: its epoch permutation is already shuffled
        batch = np.concatenate(parts)
        # Interleave sources so that every rank's slice sees the mixture, not one source.
        rng = np.random.default_rng([self.seed, self.stage_index, step, 0x5EED])
        return batch[rng.permutation(len(batch))]

    def rank_batch(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This rank's contiguous share of the global batch of ``step``."""
        return rank_share(self.global_batch(step), rank, world_size)

    def source_repeats(self) -> np.ndarray:
        """How many passes over each source the stage makes (stream length / size)."""
        return self.cursor[-1] / self.sizes

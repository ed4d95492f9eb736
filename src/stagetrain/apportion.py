"""How many samples of each source every step of a mixture draws (the apportionment).

A mixture gives each step a whole number of samples per source: source ``k``'s stream
position at the start of step ``t`` is its cumulative count ``C_k(t)``, and step ``t``
draws positions ``[C_k(t), C_k(t + 1))``. Layout::

    ideal cumulative share      P_j(t) = B * sum_{u < t} (p_0(u) + ... + p_{j-1}(u))
    prefix floors               F_j(t) = floor(P_j(t) + 1/2),  F_0 = 0,  F_n = B t
    cumulative count            C_k(t) = F_{k+1}(t) - F_k(t)

For constant weights ``P_j(t) = B t S_j`` is evaluated in exact rational arithmetic,
so any step's counts and cursor cost O(number of sources), whatever the stage length;
scheduled weights are computed in lazily cached blocks.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import lcm
from typing import Any

import numpy as np

from stagetrain.schedules import Schedule

CHUNK = 1 << 16
"""Steps per lazily computed block of a scheduled (or repaired) mixture."""
SHARE_POINTS = 4096
"""Blocks of the midpoint rule that estimates a long scheduled stage's shares."""


def constant_value(weight: Schedule | float) -> float | None:
    """The value of a constant weight (a number, or a schedule from ``constant``), else None."""
    if isinstance(weight, int | float):
        return float(weight)
    value = getattr(weight, "constant_value", None)
    return float(value) if isinstance(value, int | float) else None


@dataclass
class _Split:
    """Prefix floors of one node: its amount split over ``children`` (source index or node)."""

    children: list[_Split | int]
    numerators: list[int]
    """``S_j * denominator`` for the prefix shares ``S_1 .. S_{m-1}`` of the m children."""
    denominator: int
    weights: tuple[Fraction, ...] = ()
    """The children's weights (kept for the drift bound of two-way splits)."""

    def apportion(self, amount: int, out: list[int]) -> None:
        twice, den = 2 * amount, 2 * self.denominator
        floors = [(twice * num + self.denominator) // den for num in self.numerators]
        bounds = [0, *floors, amount]
        for child, low, high in zip(self.children, bounds[:-1], bounds[1:], strict=True):
            if isinstance(child, int):
                out[child] = high - low
            else:
                child.apportion(high - low, out)


class Apportionment:
    """How many samples each source gives to each step of a mixture stage.

    Guarantees, for every step ``t`` (``C(t)`` the cumulative counts, ``B`` the batch):

    * every step's counts are whole, non-negative and sum to ``B``;
    * ``|C_k(t) - ideal_k(t)| <= 1`` for every source, where ``ideal_k(t)`` is ``B`` times
      the sum of source ``k``'s share over steps ``0 .. t-1`` (the prefix floors of the
      module docstring; each ``F_j`` is within 1/2 of ``P_j``), with the exceptions below;
    * counts depend on nothing but ``(weights, B, t)``: any step can be asked for first.

    The two sources with the smallest shares are placed first and last in the prefix
    order: a source there can never get a negative count; a source in the middle could
    only if it got less than one sample per step. So when three or more sources get less
    than one sample per step:

    * constant weights: those sources form one group at an end of the order, split
      among themselves by a binary tree of two-way prefix floors (always non-negative;
      :attr:`drift_bound` is the proven bound on the distance from the ideal, about 1);
    * scheduled weights: a step that would give a source a negative count gives it
      nothing and takes the difference from the sources with the largest counts, until
      the prefix floors are met again (within two samples in every case tested).

    Cost: constant weights (numbers or ``constant(...)``): O(sources) integer operations
    per query, exact, nothing stored, whatever the stage length. Scheduled weights:
    blocks of :data:`CHUNK` steps are computed in order and cached lazily (the cursor at
    each block start, and the two most recent blocks): the first query of step ``t``
    costs ``t * sources`` weight evaluations (about a microsecond each); later queries
    near it are free.

    Args:
        weights: one weight per source: a number or a schedule of the stage-local step.
            Negative values count as 0; steps where every weight is 0 split evenly.
        batch_size: samples per step (``B``).
        steps: length of the stage; steps ``0 .. steps - 1`` exist.
        chunk: steps per cached block of a scheduled mixture (tests use small ones).
    """

    def __init__(
        self,
        weights: Sequence[Schedule | float],
        batch_size: int,
        steps: int,
        *,
        chunk: int = CHUNK,
    ) -> None:
        if not weights:
            raise ValueError("a mixture needs at least one source")
        self.n = len(weights)
        self.batch_size = int(batch_size)
        self.steps = int(steps)
        self.chunk = int(chunk)
        self._fns: list[Schedule] = [_as_schedule(w) for w in weights]
        # One source takes the whole batch whatever its weight schedule says.
        values = [1.0] if self.n == 1 else [constant_value(w) for w in weights]
        self.constant = all(v is not None for v in values)
        self.drift_bound = 1.0
        """Proven bound on ``|C_k(t) - ideal_k(t)|`` (constant weights)."""
        self._tree: _Split | None = None
        if self.constant:
            self._tree, self.drift_bound = _constant_tree(
                [max(v or 0.0, 0.0) for v in values], self.batch_size
            )
            self.order = np.arange(self.n)
        else:
            self.order = _end_order(self._min_shares())
        self._inverse = np.argsort(self.order)
        # Block b starts at step b * chunk: (cursor in prefix order, ideal prefix sums).
        self._starts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()

    # --- queries ------------------------------------------------------------------------

    def cumulative(self, step: int) -> np.ndarray:
        """``C(step)``: samples drawn from each source in steps ``0 .. step - 1``."""
        if not 0 <= step <= self.steps:
            raise IndexError(f"step {step} outside the stage's {self.steps} steps")
        if self._tree is not None:
            out = [0] * self.n
            self._tree.apportion(self.batch_size * int(step), out)
            return np.array(out, dtype=np.int64)
        block, offset = divmod(step, self.chunk)
        if offset == 0 and block > 0 and block - 1 in self._blocks:
            block, offset = block - 1, self.chunk
        return self._block(block)[offset][self._inverse]

    def counts(self, step: int) -> np.ndarray:
        """Samples each source gives to ``step`` (whole, non-negative, summing to the batch)."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside the stage's {self.steps} steps")
        return self.cumulative(step + 1) - self.cumulative(step)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Counts of steps ``start .. stop - 1`` as an array of shape ``(steps, sources)``.

        Memory grows with the number of steps: meant for short stages and tests.
        """
        stop = self.steps if stop is None else stop
        cumulative = np.array([self.cumulative(t) for t in range(start, stop + 1)])
        return np.diff(cumulative, axis=0).reshape(stop - start, self.n)

    def totals(self) -> np.ndarray:
        """Samples drawn from each source over the whole stage (``C(steps)``)."""
        return self.cumulative(self.steps)

    def shares(self) -> np.ndarray:
        """Each source's share of the stage's samples, without per-step arrays.

        Exact for constant weights and for scheduled stages of at most :data:`CHUNK`
        steps; longer scheduled stages use the midpoint rule over :data:`SHARE_POINTS`
        equal blocks (``SHARE_POINTS * sources`` weight evaluations), accurate to about
        ``1 / SHARE_POINTS`` per discontinuity of a weight schedule.
        """
        if self.constant or self.steps <= self.chunk:
            return self.totals() / (self.batch_size * self.steps)
        edges = np.linspace(0, self.steps, SHARE_POINTS + 1)
        mids = np.floor((edges[:-1] + edges[1:]) / 2)
        return (self._share_rows(mids) * np.diff(edges)[:, None]).sum(axis=0) / self.steps

    def resume_state(self, step: int) -> dict[str, Any] | None:
        """What lets a new process reach ``step`` of a scheduled mixture without
        recomputing the blocks before it (``None`` for constant weights: not needed).

        Plain numbers (lists of ints and floats): store it in the checkpoint and pass it
        to :meth:`restore` after resume. The counts that follow are bit-identical.
        """
        if self._tree is not None:
            return None
        block = min(step, self.steps) // self.chunk
        self._block(block)
        cursor, prefix = self._starts[block]
        return {
            "block": block,
            "chunk": self.chunk,
            "cursor": [int(c) for c in cursor],
            "prefix": [float(p) for p in prefix],
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        """Seed the block cache from :meth:`resume_state` (ignored when it does not fit)."""
        if self._tree is not None or not state or state.get("chunk") != self.chunk:
            return
        cursor = np.asarray(state["cursor"], dtype=np.int64)
        prefix = np.asarray(state["prefix"], dtype=float)
        if cursor.shape != (self.n,) or prefix.shape != (self.n - 1,):
            return
        self._starts.setdefault(int(state["block"]), (cursor, prefix))

    # --- scheduled weights: lazily computed blocks ---------------------------------------

    def _share_rows(self, steps: np.ndarray) -> np.ndarray:
        """Shares of every source (original order) at each of ``steps``: shape (len, n)."""
        times = [float(t) for t in steps]
        # One pass per source with map: about 4x faster than a Python loop over rows.
        columns = [np.fromiter(map(w, times), dtype=float, count=len(times)) for w in self._fns]
        raw = np.stack(columns, axis=1) if times else np.zeros((0, self.n))
        raw = np.where(np.isfinite(raw) & (raw > 0), raw, 0.0)
        total = raw.sum(axis=1, keepdims=True)
        even = np.full_like(raw, 1.0 / self.n)
        return np.where(total > 0, raw / np.where(total > 0, total, 1.0), even)

    def _min_shares(self) -> list[float]:
        """Each source's smallest share at up to 257 evenly spread steps (picks the ends)."""
        probe = np.unique(np.floor(np.linspace(0, max(self.steps - 1, 0), num=257)))
        return self._share_rows(probe).min(axis=0).tolist()

    def _block(self, block: int) -> np.ndarray:
        """Cumulative counts (prefix order) at steps ``block * chunk .. + chunk``."""
        cached = self._blocks.get(block)
        if cached is not None:
            self._blocks.move_to_end(block)
            return cached
        if not self._starts:
            self._starts[0] = (np.zeros(self.n, np.int64), np.zeros(self.n - 1))
        while block not in self._starts:  # forward from the nearest known block start
            self._compute(max(b for b in self._starts if b < block))
        return self._compute(block)

    def _compute(self, block: int) -> np.ndarray:
        cursor, prefix = self._starts[block]
        first = block * self.chunk
        steps = np.arange(first, min(first + self.chunk, self.steps) + 1)
        shares = self._share_rows(steps[:-1].astype(float))[:, self.order]
        increments = self.batch_size * np.cumsum(shares, axis=1)[:, :-1]
        sums = prefix + np.vstack([np.zeros((1, self.n - 1)), np.cumsum(increments, axis=0)])
        floors = np.floor(sums + 0.5).astype(np.int64)
        totals = (self.batch_size * steps)[:, None]
        # Float sums can only break the order of the F_j by rounding: restore it.
        floors = np.minimum(np.maximum.accumulate(np.maximum(floors, 0), axis=1), totals)
        targets = np.diff(np.hstack([np.zeros_like(totals), floors, totals]), axis=1)
        rows = _follow(targets, cursor)
        self._starts.setdefault(block + 1, (rows[-1].copy(), sums[-1]))
        self._blocks[block] = rows
        while len(self._blocks) > 2:
            self._blocks.popitem(last=False)
        return rows


def _as_schedule(weight: Schedule | float) -> Schedule:
    if isinstance(weight, int | float):
        value = float(weight)
        return lambda _step: value
    return weight


def _constant_tree(weights: list[float], batch_size: int) -> tuple[_Split, float]:
    """The prefix-floor tree of constant weights, and its bound on the drift."""
    if any(math.isinf(w) for w in weights):  # the limit: infinite weights share evenly
        weights = [1.0 if math.isinf(w) else 0.0 for w in weights]
    exact = [Fraction(w) if math.isfinite(w) else Fraction(0) for w in weights]
    if sum(exact) == 0:
        exact = [Fraction(1)] * len(weights)
    total = sum(exact, Fraction(0))
    tiny = [k for k in range(len(exact)) if batch_size * exact[k] < total]
    items: list[tuple[Fraction, _Split | int]] = [(exact[k], k) for k in range(len(exact))]
    if len(tiny) >= 3:
        # Below one sample per step, only the two ends of a prefix order are safe: group
        # the tiny sources and split the group's samples by two-way prefix floors only.
        # (weight, tie-break, node), merged in Huffman order: lightest two first
        heap: list[tuple[Fraction, int, _Split | int]] = [(exact[k], k, k) for k in tiny]
        heapq.heapify(heap)
        counter = len(exact)
        while len(heap) > 1:
            wa, _, a = heapq.heappop(heap)
            wb, _, b = heapq.heappop(heap)
            node = _binary(a, wa, b, wb)
            heapq.heappush(heap, (wa + wb, counter, node))
            counter += 1
        group_weight, _, group = heap[0]
        items = [(exact[k], k) for k in range(len(exact)) if k not in tiny]
        items.append((group_weight, group))
    order = _end_order([float(w / total) for w, _ in items])
    children = [items[i][1] for i in order]
    root = _prefix_split([items[i][0] for i in order], children)
    # Drift: the ends of the root's order are within 1/2, the middle within 1; a two-way
    # split of a node with drift e gives its children r e + 1/2 (r = their share of it).
    bound = 0.0
    for position, child in enumerate(children):
        own = 0.5 if position in (0, len(children) - 1) else 1.0
        below = own if isinstance(child, int) else _tree_drift(child, own)
        bound = max(bound, below)
    return root, bound


def _binary(a: _Split | int, wa: Fraction, b: _Split | int, wb: Fraction) -> _Split:
    return _prefix_split([wa, wb], [a, b])


def _tree_drift(node: _Split, drift: float) -> float:
    """Worst drift below a two-way split whose own drift is ``drift``."""
    total = sum(node.weights, Fraction(0))
    worst = 0.0
    for child, weight in zip(node.children, node.weights, strict=True):
        share = float(weight / total) if total else 0.5
        child_drift = share * drift + 0.5
        worst = max(
            worst, child_drift if isinstance(child, int) else _tree_drift(child, child_drift)
        )
    return worst


def _prefix_split(weights: list[Fraction], children: list[_Split | int]) -> _Split:
    total = sum(weights, Fraction(0))
    prefix: list[Fraction] = []
    running = Fraction(0)
    for w in weights[:-1]:
        running += w
        prefix.append(running / total if total else Fraction(len(prefix) + 1, len(weights)))
    denominator = lcm(*(p.denominator for p in prefix)) if prefix else 1
    return _Split(children, [int(p * denominator) for p in prefix], denominator, tuple(weights))


def _normalised(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values] if total > 0 else [1.0 / len(values)] * len(values)


def _end_order(shares: Sequence[float]) -> np.ndarray:
    """Prefix order with the smallest share first and the second smallest last."""
    ranked = sorted(range(len(shares)), key=lambda k: (shares[k], k))
    if len(ranked) < 3:
        return np.array(ranked, dtype=np.int64)
    middle = sorted(ranked[2:])
    return np.array([ranked[0], *middle, ranked[1]], dtype=np.int64)


def _follow(targets: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Cumulative counts that follow ``targets`` from ``start`` without ever decreasing.

    Rows where the targets already grow are taken as they are (vectorised); a step that
    would take a sample back from a source instead gives that source nothing and takes
    the difference from the sources with the largest counts, until the targets are met.
    """
    rows = targets.copy()
    rows[0] = start
    m = len(rows) - 1
    shrinks: np.ndarray = np.asarray((np.diff(targets, axis=0) < 0).any(axis=1))
    i = 0
    while i < m:
        if np.array_equal(rows[i], targets[i]):
            ahead = np.flatnonzero(shrinks[i:])
            if len(ahead) == 0:
                rows[i + 1 :] = targets[i + 1 :]
                break
            j = i + int(ahead[0])
            rows[i + 1 : j + 1] = targets[i + 1 : j + 1]
            i = j
        step = targets[i + 1] - rows[i]
        if step.min() < 0:
            excess = int(-step[step < 0].sum())
            step[step < 0] = 0
            for _ in range(excess):
                step[int(np.argmax(step))] -= 1
        rows[i + 1] = rows[i] + step
        i += 1
    return rows


def apportion(weights: Sequence[Schedule | float], batch_size: int, steps: int) -> np.ndarray:
    """Samples per source for every step: an int array of shape ``(steps, n_sources)``.

    The materialised form of :class:`Apportionment` (memory grows with ``steps``): each
    row sums to ``batch_size`` and the running totals stay within one sample of
    ``batch_size * cumulative share`` for every source.
    """
    return Apportionment(weights, batch_size, steps).rows()

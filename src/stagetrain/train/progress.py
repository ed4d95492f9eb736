"""What a run prints while it trains.

* On a terminal with ``progress=True``: a tqdm bar (stage, loss, LR, ETA); evaluations,
  stage changes and resumes are written above it.
* Elsewhere (a log file, a batch job) with ``progress=True``: one plain line per
  logging interval and per evaluation — no carriage-return bar spam.
* ``progress=False`` (``--no-progress``): only evaluations, stage changes and resumes.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Reporter:
    """Prints a run's progress (only the main rank creates an enabled one)."""

    def __init__(self, *, enabled: bool, progress: bool, total: int, initial: int) -> None:
        self.enabled = enabled
        self.interval_lines = enabled and progress and not _is_tty()
        self.bar: Any = tqdm(
            total=total,
            initial=initial,
            disable=not (enabled and progress and _is_tty()),
            dynamic_ncols=True,
            unit="step",
        )

    def line(self, text: str) -> None:
        """An event worth a line of its own (evaluation, stage change, resume)."""
        if not self.enabled:
            return
        if not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def stage(self, index: int, count: int, name: str) -> None:
        self.bar.set_description(f"[{index + 1}/{count}] {name}")

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def shrink(self, steps: int) -> None:
        """The planned total lost ``steps`` (a stage ended early)."""
        if self.bar.total is not None:
            self.bar.total -= steps
            self.bar.refresh()

    def goto(self, step: int) -> None:
        self.bar.n = step
        self.bar.refresh()

    def train(self, record: dict[str, Any]) -> None:
        """A training record: on the bar, or as a plain line off a terminal."""
        loss, lr = record.get("loss"), record.get("lr")
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif self.interval_lines:
            rate = record.get("samples_per_s")
            print(
                f"step {record['step']:,} [{record['stage']}] loss {loss:.4f} lr {lr:.3g}"
                + (f" | {rate:,.0f} samples/s" if rate else ""),
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()

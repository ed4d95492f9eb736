"""An analysed comparison in words: the verdicts and the summary table."""

from __future__ import annotations

import math

from stagetrain.compare.analysis import Analysis
from stagetrain.stats import PairedDifference, PairedTimes

FEW_SEEDS = 8
"""Below this many seeds the table says the means' bootstrap intervals are rough."""


def _p(p_value: float, p_se: float) -> str:
    return f"p = {p_value:.3g}" + (f" ± {p_se:.1g}" if p_se else "")


def verdict(diff: PairedDifference | None, higher_is_better: bool) -> str:
    """Plain words for a paired difference, read from the same test as its interval."""
    if diff is None:
        return "—"
    if not diff.significant():
        return f"no significant difference ({_p(diff.p_value, diff.p_se)})"
    better = (diff.mean > 0) == higher_is_better
    return f"{'better' if better else 'worse'} than baseline ({_p(diff.p_value, diff.p_se)})"


def time_verdict(times: PairedTimes | None) -> str:
    """Plain words for the paired comparison of steps to the target."""
    if times is None:
        return "—"
    counts = f"sooner on {times.faster}/{times.n}, later on {times.slower}/{times.n}"
    if not times.significant():
        return f"no significant difference ({counts}; {_p(times.p_value, times.p_se)})"
    word = "sooner" if times.faster > times.slower else "later"
    return f"{word} ({counts}; {_p(times.p_value, times.p_se)})"


def _interval(low: float, high: float, fmt: str) -> str:
    if math.isnan(low) or math.isnan(high):
        return "[—]"
    return f"[{low:{fmt}}, {high:{fmt}}]"


def markdown_table(analysis: Analysis) -> str:
    """The summary table printed to the terminal and embedded in the report."""
    m = analysis.metric
    unit = {"step": "steps"}.get(analysis.time_unit, analysis.time_unit)
    target = "—" if analysis.target is None else f"{analysis.target:.4g}"
    lines = [
        f"Target metric: {m} ({'higher' if m.higher_is_better else 'lower'} is better); "
        f"time-to-target threshold {target}; seeds {analysis.seeds} "
        f"(varying {' and '.join(analysis.vary)})",
        "",
        "| arm | runs ok | final median [IQR] | final mean [95% CI] "
        "| Δ final vs baseline [95% CI] | verdict | reached target [95% CI] "
        f"| median {unit} to target | median seconds to target | {unit} to target vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    unbounded = False
    for a in analysis.arms:
        ok = f"{len(a.runs) - len(a.failed)}/{len(a.runs)}"
        if a.final is None:
            lines.append(f"| {a.arm} | {ok} | failed | | | | | | | |")
            continue
        f = a.final
        d = a.versus_baseline
        if d is None:
            delta = "—"
        else:
            delta = f"{d.mean:+.4f} {_interval(d.ci_low, d.ci_high, '+.4f')}"
            unbounded = unbounded or math.isinf(d.ci_low) or math.isinf(d.ci_high)
        t, s = a.time, a.seconds
        reached = (
            "—"
            if t is None
            else f"{t.reached}/{t.n} {_interval(t.reached_low, t.reached_high, '.2f')}"
        )
        steps = "—" if t is None or t.median is None else f"{t.median:,.0f}"
        secs = "—" if s is None or s.median is None else f"{s.median:.1f}"
        lines.append(
            f"| {a.arm} | {ok} | {f.median:.4f} [{f.q25:.4f}, {f.q75:.4f}] | "
            f"{f.mean:.4f} {_interval(f.ci_low, f.ci_high, '.4f')} | {delta} | "
            f"{verdict(d, m.higher_is_better)} | {reached} | {steps} | {secs} | "
            f"{time_verdict(a.time_versus_baseline)} |"
        )
    notes = [
        "",
        "Δ: mean paired difference; its interval is the sign-flip test inverted, so the "
        "verdict (p < 0.05) and the interval always agree. Final mean: BCa bootstrap "
        f"interval. Median {unit} / seconds to target: shown only when more than half the "
        "runs reached it (an evaluated step; misses count as slower than any hit).",
    ]
    if analysis.time_unit != "step":
        notes.append(
            f"Time to target is counted in {unit}: the arms' runs end at different steps "
            "(their stages keep a budget in tokens or samples), so steps would not compare "
            "equal amounts of training."
        )
    n = len(analysis.seeds)
    if n < FEW_SEEDS:
        notes.append(
            f"With {n} seeds the BCa intervals of the means are rough: a bootstrap of {n} "
            "values undercovers (its 95 % interval holds the true mean less often than "
            "that); the Δ test is exact at any number of seeds."
        )
    if unbounded:
        notes.append(
            f"An interval of ±inf: with {n} seeds the smallest possible p is "
            f"{2 / 2**n:.3g}, so no shift can be excluded at 95 %; use more seeds."
        )
    failures = [r for a in analysis.arms for r in a.failed]
    for r in failures:
        notes.append(f"\n{r.arm} seed {r.seed}: {r.status}{': ' + r.error if r.error else ''}")
    return "\n".join(lines + notes)

"""``report``: plots and one self-contained HTML page for a comparison directory."""

from __future__ import annotations

import base64
import html
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagetrain.compare import Analysis, ArmAnalysis, analyze, markdown_table
from stagetrain.errors import ConfigError

ARM_COLORS = {
    "curriculum": "#1f77b4",
    "baseline": "#d62728",
    "union": "#2ca02c",
    "anti": "#9467bd",
    "easy-only": "#ff7f0e",
    "random-order": "#8c564b",
}


def machine_description() -> str:
    """One line about the machine the report was made on."""
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPU cores, {device}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def curve_band(arm: ArmAnalysis, axis: str, grid: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """Median and quartiles over the arm's seeds of the metric on ``grid`` (``axis``:
    step, time or tokens).

    Each run is interpolated on the grid between its own evaluations; the band is NaN
    beyond the point where the arm's first run ends (and before the last one starts),
    so the median is always over every run, never over the survivors.
    """
    curves, firsts, lasts = [], [], []
    for run in arm.runs:
        if run.status != "completed" or not run.curve:
            continue
        x = np.array([p[axis] for p in run.curve], dtype=float)
        y = np.array([p["value"] for p in run.curve], dtype=float)
        curves.append(np.interp(grid, x, y))
        firsts.append(x[0])
        lasts.append(x[-1])
    if not curves:
        return None
    inside = (grid >= max(firsts)) & (grid <= min(lasts))
    stack = np.vstack(curves)
    return tuple(np.where(inside, np.percentile(stack, q, axis=0), np.nan) for q in (50, 25, 75))


def plot_curves(analysis: Analysis, axis: str, path: Path) -> Path:
    """Target metric against ``axis`` ('step', 'time' or 'tokens') per arm: median, IQR band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    xs = [p[axis] for a in analysis.arms for r in a.runs for p in r.curve]
    if xs:
        grid = np.linspace(0, max(xs), 300)
        for arm in analysis.arms:
            band = curve_band(arm, axis, grid)
            if band is None:
                continue
            color = ARM_COLORS.get(arm.arm)
            median, q25, q75 = band
            ax.plot(grid, median, label=arm.arm, color=color, lw=2)
            ax.fill_between(grid, q25, q75, color=color, alpha=0.2)
        _shade_stages(ax, analysis, axis)
    if analysis.target is not None:
        ax.axhline(analysis.target, color="grey", ls=":", lw=1, label="target")
    ax.set_xlabel(
        {
            "step": "optimizer step",
            "time": "wall-clock seconds",
            "tokens": "tokens (samples for non-token data)",
        }[axis]
    )
    ax.set_ylabel(str(analysis.metric))
    ax.set_title(
        f"{analysis.metric}: median over {len(analysis.seeds)} seeds, IQR shaded "
        "(each curve ends where the arm's first run ends)",
        fontsize=9,
    )
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _shade_stages(ax: Any, analysis: Analysis, axis: str) -> None:
    """Shade the curriculum arm's stages on the step, time or tokens axis."""
    arm = next((a for a in analysis.arms if a.arm == "curriculum"), None)
    if arm is None:
        return
    runs = [r for r in arm.runs if r.stage_starts and r.curve]
    if not runs:
        return
    starts = runs[0].stage_starts
    # Stage starts differ a little between seeds in time (and in tokens after an early
    # advance): shade at the median over seeds.
    field = {"step": 0, "time": 2, "tokens": 3}[axis]
    starts_x = [
        float(np.median([r.stage_starts[i][field] for r in runs if len(r.stage_starts) > i]))
        for i in range(len(starts))
    ]
    end = max(p[axis] for r in runs for p in r.curve)
    edges = [*starts_x, end]
    for i, (_, name, *_) in enumerate(starts):
        if i % 2 == 0:
            ax.axvspan(edges[i], edges[i + 1], color="grey", alpha=0.08, lw=0)
        ax.text(
            edges[i],
            1.0,
            f" {name}",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
            color="dimgrey",
        )


def plot_box(analysis: Analysis, path: Path) -> Path:
    """Box plot of the final metric per arm, with each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    labels, data = [], []
    for arm in analysis.arms:
        values = [r.final for r in arm.runs if r.status == "completed" and r.final is not None]
        if values:
            labels.append(arm.arm)
            data.append(values)
    if data:
        ax.boxplot(data, tick_labels=labels)
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, start=1):
            ax.scatter(
                i + rng.uniform(-0.08, 0.08, len(values)),
                values,
                s=14,
                color="black",
                alpha=0.6,
                zorder=3,
            )
    ax.set_ylabel(f"final {analysis.metric}")
    ax.set_title("final metric per arm (one dot per seed)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table_html(markdown: str) -> str:
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    out = ["<table>"]
    for i, row in enumerate(rows):
        if i == 1:
            continue  # the |---| separator
        cells = [c.strip() for c in row.strip("|").split("|")]
        tag = "th" if i == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def report_name(*, target: float | None, metric: str | None) -> str:
    """Suffix of the files of a non-default report, e.g. ``-test.loss-target-2.4``."""
    suffix = f"-{metric}" if metric is not None else ""
    return suffix + (f"-target-{target:g}" if target is not None else "")


def write_report(
    out_dir: str | Path,
    *,
    target: float | None = None,
    metric: str | None = None,
    out: str | Path | None = None,
) -> tuple[Path, str]:
    """Write PNG plots and an HTML page; returns the HTML path and the table.

    Args:
        out_dir: the comparison directory.
        target: time-to-target threshold (default: the comparison's ``--target``, else the
            baseline's median final value).
        metric: ``EVAL.KEY`` to report instead of the comparison's own metric.
        out: directory for the files (default ``out_dir``). In ``out_dir`` itself a
            report with a ``target`` or ``metric`` gets its own file names
            (``report-test.loss-target-2.4.html``), so the default ``report.html``
            is never overwritten by a variant.
    """
    source = Path(out_dir)
    analysis = analyze(source, target=target, metric=metric)
    dest = Path(out) if out is not None else source
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{dest}: is a file, not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    suffix = "" if out is not None else report_name(target=target, metric=metric)
    table = markdown_table(analysis)
    plots = [
        plot_curves(analysis, "step", dest / f"curve_steps{suffix}.png"),
        plot_curves(analysis, "time", dest / f"curve_time{suffix}.png"),
        plot_curves(analysis, "tokens", dest / f"curve_tokens{suffix}.png"),
        plot_box(analysis, dest / f"final_box{suffix}.png"),
    ]
    notes = [line for line in table.splitlines() if line and not line.startswith("|")]
    config_text = (source / "config.yaml").read_text()
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>stagetrain report: {html.escape(source.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; display: block; margin: 1em 0; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>Did the curriculum help?</h1>
{_table_html(table)}
<p>{"<br>".join(html.escape(n) for n in notes)}</p>
<p>Seeds are paired across arms. The p-value is an exact paired permutation (sign-flip)
test on the per-seed differences (Monte Carlo, with its standard error, above 20 seeds);
the interval beside it is the same test inverted, so "no significant difference" appears
exactly when the interval contains 0. Per-arm means carry BCa bootstrap intervals. Time to
target is censored: the fraction of runs that reached it (Clopper-Pearson interval), the
median only when more than half did, and a paired test in which a miss is slower than any
hit. Every derived arm keeps the curriculum's stages, optimizers, LR trajectory,
hand-offs and freezing, and changes only the data.</p>
<h2>Target metric against steps</h2>{_img(plots[0])}
<h2>Target metric against wall-clock time</h2>{_img(plots[1])}
<h2>Target metric against tokens seen</h2>{_img(plots[2])}
<h2>Final metric per arm</h2>{_img(plots[3])}
<h2>Machine</h2><p>{html.escape(machine_description())}</p>
<h2>Curriculum</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
    path = dest / f"report{suffix}.html"
    path.write_text(page)
    return path, table

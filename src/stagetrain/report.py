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


def _band(arm: ArmAnalysis, axis: str, grid: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """Median and quartiles over seeds of the metric, interpolated on ``grid``."""
    curves = []
    for run in arm.runs:
        if run.status != "completed" or not run.curve:
            continue
        x = np.array([p[axis] for p in run.curve], dtype=float)
        y = np.array([p["value"] for p in run.curve], dtype=float)
        # Beyond a run's last point the curve is undefined, not flat: mask it.
        inside = (grid >= x[0]) & (grid <= x[-1])
        curves.append(np.where(inside, np.interp(grid, x, y), np.nan))
    if not curves:
        return None
    stack = np.vstack(curves)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return tuple(np.nanpercentile(stack, q, axis=0) for q in (50, 25, 75))


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
            band = _band(arm, axis, grid)
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
    ax.set_title(f"{analysis.metric}: median over {len(analysis.seeds)} seeds, IQR shaded")
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


def write_report(out_dir: str | Path, *, target: float | None = None) -> tuple[Path, str]:
    """Write PNG plots and ``report.html`` into ``out_dir``; returns the HTML path and table."""
    out = Path(out_dir)
    analysis = analyze(out, target=target)
    table = markdown_table(analysis)
    plots = [
        plot_curves(analysis, "step", out / "curve_steps.png"),
        plot_curves(analysis, "time", out / "curve_time.png"),
        plot_curves(analysis, "tokens", out / "curve_tokens.png"),
        plot_box(analysis, out / "final_box.png"),
    ]
    notes = [line for line in table.splitlines() if line and not line.startswith("|")]
    config_text = (out / "config.yaml").read_text()
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>stagetrain report: {html.escape(out.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; display: block; margin: 1em 0; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>Did the curriculum help?</h1>
<p>{"<br>".join(html.escape(n) for n in notes)}</p>
{_table_html(table)}
<p>Paired differences use the same seeds for both arms: mean difference with a 95 % percentile
bootstrap interval and a two-sided Wilcoxon signed-rank p-value; "no significant difference"
means p &ge; 0.05. Every derived arm has the curriculum's total budget and LR trajectory.</p>
<h2>Target metric against steps</h2>{_img(plots[0])}
<h2>Target metric against wall-clock time</h2>{_img(plots[1])}
<h2>Target metric against tokens seen</h2>{_img(plots[2])}
<h2>Final metric per arm</h2>{_img(plots[3])}
<h2>Machine</h2><p>{html.escape(machine_description())}</p>
<h2>Curriculum</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path, table

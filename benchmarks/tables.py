"""Print the Markdown tables of benchmarks/README.md from the JSON results.

python benchmarks/tables.py loop        # from results/loop_overhead.json
python benchmarks/tables.py sampler     # from results/sampler_scale.json
python benchmarks/tables.py overhead    # from results/compare_overhead.json
python benchmarks/tables.py recipes     # rewrites results/<recipe>.md from <recipe>.json
python benchmarks/tables.py verdicts    # writes results/verdicts.md: claims vs our verdicts
python benchmarks/tables.py readme      # writes benchmarks/README.md from README.template.md
python benchmarks/tables.py recompute   # one-off: old-format recipe JSON -> current format

Every statistic and every verdict in a recipe table comes from stagetrain's own
functions (``stagetrain.stats`` and ``stagetrain.compare.verdict``) applied to the
per-seed values stored in the JSON: nothing is typed by hand.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from stagetrain.compare import time_verdict, verdict
from stagetrain.stats import (
    PairedDifference,
    paired_difference,
    paired_times,
    summarize,
    time_to_target,
)

RESULTS = Path(__file__).parent / "results"
RECIPES = ("parity", "noisy-digits", "shapes", "addition", "charlm")


def loop() -> str:
    data = json.loads((RESULTS / "loop_overhead.json").read_text())
    lines = [f"Machine: {data['machine']}.", "",
             "| model | batch | setting | hand-written samples/s | stagetrain samples/s | ratio B/A (median of pairs) | range over pairs |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        low, high = r["pair_ratio_range"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['setting']} | {r['hand_written_samples_per_s']:,} | {r['stagetrain_samples_per_s']:,} | {r['ratio_B_over_A']:.3f} | {low:.3f}–{high:.3f} |"
        )
    return "\n".join(lines)


def sampler() -> str:
    data = json.loads((RESULTS / "sampler_scale.json").read_text())
    lines = [f"Machine: {data['machine']}; batches of {data['batch']} indices.", "",
             "| sampler | samples | build s | µs per batch | resident bytes/sample | peak bytes/sample while building |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["samplers"]:
        lines.append(
            f"| {r['sampler']} | {r['n']:.0e} | {r['build_s']:.3f} | {r['draw_us_per_batch']:.1f} | {r['resident_bytes_per_sample']:.2f} | {r['build_peak_bytes_per_sample']:.2f} |"
        )
    s = data["scoring"]
    lines += ["", f"Difficulty scoring ({s['n']:,} samples, MLP 64-256-10, batches of 1,024): plain no_grad forward "
              f"{s['plain_forward_samples_per_s']:,} samples/s, `score_with_model` {s['scoring_samples_per_s']:,} samples/s, ratio {s['ratio']:.3f} (median of 5 interleaved pairs)."]  # fmt: skip
    return "\n".join(lines)


def overhead() -> str:
    path = RESULTS / "compare_overhead.json"
    if not path.exists():
        return f"(not run yet: {path.name})"
    data = json.loads(path.read_text())
    way_text = {
        "subprocess": "a process per run (before)",
        "pool": "worker pool (now)",
        "direct": "direct `fit` calls, no harness (floor)",
    }
    lines = [f"Machine: {data['machine']}{'; quick run' if data['quick'] else ''}.", "",
             "| how runs are started | parallel jobs | runs | repetitions | wall s per run (median) | overhead s per run vs direct |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        extra = "—" if r["overhead_s"] is None else f"{r['overhead_s']:.2f}"
        lines.append(
            f"| {way_text[r['way']]} | {r['jobs']} | {r['runs']} | {r['repetitions']} | {r['per_run_s']:.2f} | {extra} |"
        )
    return "\n".join(lines)


# --- recipe tables ------------------------------------------------------------------------


def _fmt_interval(low: float, high: float, fmt: str) -> str:
    if math.isnan(low) or math.isnan(high):
        return "[—]"
    return f"[{low:{fmt}}, {high:{fmt}}]"


def _pairs(
    values: list[float | None], reference: list[float | None]
) -> tuple[list[float], list[float]]:
    kept = [
        (a, b) for a, b in zip(values, reference, strict=True) if a is not None and b is not None
    ]
    return [a for a, _ in kept], [b for _, b in kept]


def paired(table: dict[str, Any], arm: str, reference: str) -> PairedDifference:
    """The tool's paired difference of two arms' final values in a stored table."""
    a, b = _pairs(table["arms"][arm]["final"], table["arms"][reference]["final"])
    return paired_difference(a, b, higher_is_better=table["higher_is_better"])


def _finished_times(arm: dict[str, Any]) -> list[float | None]:
    """Steps to target of the runs that finished (``None``: missed; failed runs left out)."""
    return [t for t, f in zip(arm["steps_to_target"], arm["final"], strict=True) if f is not None]


def _paired_times(table: dict[str, Any], arm: str, reference: str) -> Any:
    a, b = table["arms"][arm], table["arms"][reference]
    both = [
        (ta, tb)
        for ta, tb, fa, fb in zip(
            a["steps_to_target"], b["steps_to_target"], a["final"], b["final"], strict=True
        )
        if fa is not None and fb is not None
    ]
    return paired_times([x for x, _ in both], [y for _, y in both])


def table_markdown(table: dict[str, Any]) -> str:
    """One stored comparison as a Markdown table, every number computed here."""
    hib = table["higher_is_better"]
    base = table["baseline"]
    timed = table.get("target") is not None and all(
        "steps_to_target" in arm for arm in table["arms"].values()
    )
    header = (f"| arm | seeds ok | {table['metric']} median [IQR] | mean [95% CI] | Δ vs {base} [95% CI] | verdict |"
              + (" reached target [95% CI] | median steps to target | steps to target vs baseline |" if timed else ""))  # fmt: skip
    columns = header.count("|") - 1
    lines = [header, "|" + "---|" * columns]
    for label, arm in table["arms"].items():
        present = [v for v in arm["final"] if v is not None]
        if not present:
            lines.append(f"| {label} | 0/{len(arm['final'])} | failed |" + " |" * (columns - 3))
            continue
        s = summarize(present)
        if label == base:
            delta, words = "—", "—"
        else:
            d = paired(table, label, base)
            delta = f"{d.mean:+.4f} {_fmt_interval(d.ci_low, d.ci_high, '+.4f')}"
            words = verdict(d, hib).replace("than baseline", f"than {base}")
        row = (
            f"| {label} | {len(present)}/{len(arm['final'])} | {s.median:.4f} [{s.q25:.4f}, {s.q75:.4f}] "
            f"| {s.mean:.4f} {_fmt_interval(s.ci_low, s.ci_high, '.4f')} | {delta} | {words} |"
        )
        if timed:
            t = time_to_target(_finished_times(arm))
            reached = f"{t.reached}/{t.n} {_fmt_interval(t.reached_low, t.reached_high, '.2f')}"
            median = "—" if t.median is None else f"{t.median:,.0f}"
            versus = "—" if label == base else time_verdict(_paired_times(table, label, base))
            row += f" {reached} | {median} | {versus} |"
        lines.append(row)
    return "\n".join(lines)


STATISTICS_NOTE = (
    "Seeds are paired across arms. Δ: mean paired difference with the interval of the exact "
    "sign-flip test inverted, so the verdict (p < 0.05) and the interval always agree; means: "
    "BCa bootstrap intervals; time to target: censored (fraction reached with a Clopper-Pearson "
    "interval, median only when more than half reached it, misses slower than any hit)."
)


def recipe_markdown(data: dict[str, Any]) -> str:
    """``results/<recipe>.md`` from ``results/<recipe>.json``."""
    lines = [f"### {data['recipe']} ({'quick' if data['quick'] else 'full'})", "",
             f"Command: `{data['command']}`. {data.get('description', '')}".rstrip(), ""]  # fmt: skip
    if data.get("recomputed"):
        lines += [f"*{data['recomputed']}*", ""]
    for table in data["tables"]:
        if len(data["tables"]) > 1 or table.get("title"):
            lines += [f"#### {table['title']}", ""]
        target = table.get("target")
        seeds = table.get("seeds")
        facts = [
            f"metric {table['metric']} ({'higher' if table['higher_is_better'] else 'lower'} is better)"
        ]
        if target is not None:
            facts.append(f"target {target:g}")
        if seeds is not None:
            facts.append(f"seeds {seeds}")
        sentence = "; ".join(facts)
        lines += [sentence[0].upper() + sentence[1:] + ".", "", table_markdown(table), ""]
    for note in data.get("notes", []):
        lines += [note, ""]
    lines += [STATISTICS_NOTE, "", f"Machine: {data['machine']}."]
    return "\n".join(lines)


def recipes() -> None:
    for name in RECIPES:
        for stem in (name, f"{name}-quick"):
            path = RESULTS / f"{stem}.json"
            if path.exists():
                data = json.loads(path.read_text())
                if "tables" in data:
                    (RESULTS / f"{stem}.md").write_text(recipe_markdown(data) + "\n")


# --- verdicts: the published claims against the tool's verdicts ---------------------------

CLAIMS: list[dict[str, Any]] = [
    {
        "recipe": "parity",
        "source": "Abbe, Cornacchia & Lotfi 2023",
        "claim": "a biased first stage learns the k-parity that unordered training needs many more steps for",
        "checks": [("curriculum", "baseline", "better"), ("curriculum", "baseline", "sooner")],
    },
    {
        "recipe": "noisy-digits",
        "source": "Wu, Dyer & Neyshabur 2021",
        "claim": "with 20–60 % label noise a step-paced curriculum helps by a large margin",
        "checks": [("curriculum", "baseline", "better")],
        "note": "the size of the gain ('a large margin') is not tested; read Δ",
    },
    {
        "recipe": "shapes",
        "source": "Bengio et al. 2009",
        "claim": "best at a late switch epoch (S = 128 of 256); union worse than the curriculum; Basic-only poor",
        "checks": [
            ("S=16", "S=0 (Geom only)", "better"),
            ("union", "S=16", "worse"),
            ("Basic only", "S=0 (Geom only)", "worse"),
        ],
        "note": "at 1/8 of the paper's budget, with an absolute error far above the paper's",
    },
    {
        "recipe": "addition",
        "source": "Zaremba & Sutskever 2014",
        "claim": "the naive curriculum can be worse than none; 'combined' (80 % current length + 20 % all lengths) is best",
        "checks": [
            ("naive", "baseline (4 digits only)", "worse"),
            ("combined", "baseline (4 digits only)", "better"),
        ],
        "note": "at an equal, short budget every sample spent on shorter sums is one not spent on the 4-digit target; the paper trained to convergence",
    },
    {
        "recipe": "charlm",
        "source": "short → long context; Nemotron Elastic stages, Li et al. 2022",
        "claim": "training at short context first reaches the same quality with fewer tokens",
        "checks": [("curriculum", "baseline", "better")],
    },
]


_OPPOSITE = {"better": "worse", "worse": "better", "sooner": "later", "later": "sooner"}


def _check(table: dict[str, Any], arm: str, reference: str, expected: str) -> tuple[str, str]:
    """The tool's verdict on ``arm`` vs ``reference`` against the ``expected`` direction:
    ``agrees``, ``contradicts`` or ``not shown`` (no significant difference), and its text."""
    hib = table["higher_is_better"]
    if expected in ("sooner", "later"):
        words = time_verdict(_paired_times(table, arm, reference))
        text = f"steps to {table['target']:g}, {arm} vs {reference}: {words}"
    else:
        d = paired(table, arm, reference)
        words = verdict(d, hib).replace("than baseline", f"than {reference}")
        interval = _fmt_interval(d.ci_low, d.ci_high, "+.4f")
        text = f"{arm} vs {reference}: Δ {d.mean:+.4f} {interval}, {words}"
    if words.startswith(expected):
        return "agrees", text
    return ("contradicts" if words.startswith(_OPPOSITE[expected]) else "not shown"), text


def verdicts() -> str:
    lines = ["| recipe | published claim | our verdicts (stagetrain's own, from the stored seeds) | agrees? |",
             "|---|---|---|---|"]  # fmt: skip
    for claim in CLAIMS:
        path = RESULTS / f"{claim['recipe']}.json"
        if not path.exists():
            lines.append(f"| {claim['recipe']} | {claim['claim']} | (not run yet) | — |")
            continue
        data = json.loads(path.read_text())
        table = next(
            t for t in data["tables"] if all(a in t["arms"] for c in claim["checks"] for a in c[:2])
        )
        results = [_check(table, *c) for c in claim["checks"]]
        outcomes = [outcome for outcome, _ in results]
        agreed = outcomes.count("agrees")
        if agreed == len(outcomes):
            word = "yes"
        elif "contradicts" in outcomes:
            word = "no"
        else:
            word = "partly" if agreed else "not shown"
        ours = "; ".join(f"{text} [{outcome}]" for outcome, text in results)
        notes = [claim["note"]] if claim.get("note") else []
        n = len(table["seeds"])
        if 2 / 2**n >= 0.05:  # the exact test's floor, computed, not typed
            notes.append(
                f"with {n} seeds the smallest possible p is {2 / 2**n:.3g}: no test here can reach 0.05"
            )
        if notes:
            ours += ". " + "; ".join(notes)[0].upper() + "; ".join(notes)[1:]
        lines.append(
            f"| {claim['recipe']} ({claim['source']}) | {claim['claim']} | {ours} | **{word}** ({agreed} of {len(results)} checks agree) |"
        )
    return "\n".join(lines)


# --- one-off: the old per-recipe JSON layout -> the current one ---------------------------

_LEGACY = {
    "parity": ("final", "test.accuracy", True, "baseline", 0.95, "steps_to_95"),
    "noisy-digits": ("final", "test.accuracy", True, "baseline", None, None),
    "charlm": ("final_val_loss", "val.loss", False, "baseline", None, None),
    "addition": ("exact_match", "test.exact_match", True, "baseline (4 digits only)", None, None),
    "shapes": (
        "test_error",
        "early-stopped GeomShapes test error",
        False,
        "S=0 (Geom only)",
        None,
        None,
    ),
}


def recompute() -> None:
    """Rewrite old-format recipe JSON (per-seed values only) in the current format, so the
    tables get the current statistics without retraining; says so in the table."""
    for name, (key, metric, hib, baseline, target, steps_key) in _LEGACY.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        old = json.loads(path.read_text())
        if "tables" in old:
            continue
        md = (RESULTS / f"{name}.md").read_text()
        command = md.split("Command: `", 1)[1].split("`", 1)[0]
        machine = md.rsplit("Machine: ", 1)[1].strip().rstrip(".")
        arms: dict[str, dict[str, Any]] = {}
        for label in old[key]:
            arms[label] = {"final": old[key][label]}
            if steps_key:
                arms[label]["steps_to_target"] = old[steps_key][label]
        n = len(old[key][baseline])
        table = {"title": "", "metric": metric, "higher_is_better": hib, "baseline": baseline,
                 "target": target, "seeds": list(range(n)), "arms": arms}  # fmt: skip
        extra = {k: v for k, v in old.items() if k not in (key, steps_key)}
        data = {
            "recipe": name, "quick": False, "command": command, "machine": machine,
            "recomputed": (
                "Statistics recomputed by `python benchmarks/tables.py recompute` from the "
                "per-seed values stored by the earlier full run (no retraining). Those runs "
                "derived the control arms the earlier way (a one-stage baseline); in this "
                "recipe every stage shares one optimizer and carries it over, so the "
                "optimizer settings and LR per step were the ones the current arms keep."
            ),
            "tables": [table],
            "extra": extra,
        }  # fmt: skip
        path.write_text(json.dumps(data, indent=1))


def readme() -> str:
    """benchmarks/README.md: the template with every ``<!-- insert NAME -->`` replaced by
    a generated table (``loop``, ``sampler``, ``overhead``, ``verdicts``) or by
    ``results/NAME.md``."""
    template = (Path(__file__).parent / "README.template.md").read_text()
    generated = {"loop": loop, "sampler": sampler, "overhead": overhead, "verdicts": verdicts}
    out = []
    for line in template.splitlines():
        if line.startswith("<!-- insert ") and line.endswith(" -->"):
            name = line[len("<!-- insert ") : -len(" -->")]
            if name in generated:
                out.append(generated[name]())
            else:
                path = RESULTS / f"{name}.md"
                out.append(
                    path.read_text().strip() if path.exists() else f"(not run yet: {path.name})"
                )
        else:
            out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "readme":
        recipes()
        (RESULTS / "verdicts.md").write_text(verdicts() + "\n")
        (Path(__file__).parent / "README.md").write_text(readme())
    elif command == "recipes":
        recipes()
    elif command == "verdicts":
        (RESULTS / "verdicts.md").write_text(verdicts() + "\n")
    elif command == "recompute":
        recompute()
        recipes()
    else:
        print({"loop": loop, "sampler": sampler, "overhead": overhead}[command]())

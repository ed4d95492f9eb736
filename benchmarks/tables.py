"""Print the Markdown tables of benchmarks/README.md from the JSON results.

python benchmarks/tables.py loop      # from results/loop_overhead.json
python benchmarks/tables.py sampler   # from results/sampler_scale.json
python benchmarks/tables.py readme    # writes benchmarks/README.md from README.template.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


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


def readme() -> str:
    """benchmarks/README.md: the template with every ``<!-- insert NAME -->`` replaced by
    a generated table (``loop``, ``sampler``) or by ``results/NAME.md``."""
    template = (Path(__file__).parent / "README.template.md").read_text()
    out = []
    for line in template.splitlines():
        if line.startswith("<!-- insert ") and line.endswith(" -->"):
            name = line[len("<!-- insert ") : -len(" -->")]
            if name in ("loop", "sampler"):
                out.append({"loop": loop, "sampler": sampler}[name]())
            else:
                path = RESULTS / f"{name}.md"
                out.append(
                    path.read_text().strip() if path.exists() else f"(not run yet: {path.name})"
                )
        else:
            out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if sys.argv[1] == "readme":
        (Path(__file__).parent / "README.md").write_text(readme())
    else:
        print({"loop": loop, "sampler": sampler}[sys.argv[1]]())

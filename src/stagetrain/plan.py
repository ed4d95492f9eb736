"""``plan``: the dry-run timeline of a curriculum, with pre-flight warnings."""

from __future__ import annotations

from dataclasses import dataclass, field

from stagetrain.curriculum import Curriculum
from stagetrain.lr_search import describe_search


@dataclass
class StagePlan:
    """One stage's place in the timeline."""

    index: int
    name: str
    start_step: int
    end_step: int
    start_samples: int
    end_samples: int
    start_tokens: int
    end_tokens: int
    batch_size: int
    seq_len: int | None
    handoff: str
    lr_start: float
    lr_end: float
    warmup_steps: int
    sources: list[tuple[str, float, float]]
    """(label, share of samples, passes over the source)."""
    up_to: bool = False
    """True when the stage may end earlier (metric-triggered advance)."""
    loss: str = ""
    """The stage's loss terms (``cross_entropy``, ``0.5 x kl_distill``, ...)."""
    lr_auto: str = ""
    """``lr: auto``: the search's budget (then ``lr_start``/``lr_end`` are factors on the
    searched LR)."""


@dataclass
class Plan:
    """The whole timeline plus warnings (a source repeating to fill a stage, say)."""

    name: str
    seed: int
    stages: list[StagePlan]
    warnings: list[str] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step if self.stages else 0

    def format(self) -> str:
        """A human-readable table (what ``stagetrain plan`` prints)."""
        # Data without sequences counts one token per sample: a column equal to the
        # samples one would say nothing.
        tokens = any(s.seq_len or s.end_tokens != s.end_samples for s in self.stages)
        header = ["#", "stage", "steps", "samples", *(["tokens"] if tokens else []), "batch",
                  "lr start→end", "handoff"]  # fmt: skip
        rows = []
        for s in self.stages:
            up = "up to " if s.up_to else ""
            rows.append(
                [
                    str(s.index + 1),
                    s.name,
                    f"{s.start_step:,}–{up}{s.end_step:,}",
                    f"{s.start_samples:,}–{up}{s.end_samples:,}",
                    *([f"{s.start_tokens:,}–{up}{s.end_tokens:,}"] if tokens else []),
                    str(s.batch_size) + (f"×{s.seq_len}" if s.seq_len else ""),
                    ("auto ×" if s.lr_auto else "")
                    + f"{s.lr_start:.3g}→{'×' if s.lr_auto else ''}{s.lr_end:.3g}"
                    + (f" (warmup {s.warmup_steps})" if s.warmup_steps else "")
                    + (f", {s.lr_auto}" if s.lr_auto else ""),
                    s.handoff,
                ]
            )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            f"curriculum {self.name!r} (seed {self.seed}): "
            f"{len(self.stages)} stages, {self.total_steps:,} steps"
        ]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        for row, s in zip(rows, self.stages, strict=True):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            for label, share, passes in s.sources:
                lines.append(
                    f"{'':{widths[0]}}    data {label}: {share:.1%} of samples, {passes:.2f} passes"
                )
            if s.loss:
                lines.append(f"{'':{widths[0]}}    loss {s.loss}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        return "\n".join(lines)


def make_plan(curriculum: Curriculum) -> Plan:
    """Compute the timeline without training (building data and samplers only).

    Time and memory are O(number of stages x sources), independent of the durations.
    """
    stages: list[StagePlan] = []
    warnings: list[str] = []
    step = samples = tokens = 0
    for stage in curriculum.stages:
        stage.check_sources_fit()
        auto = describe_search(stage)  # lr: auto: the search's budget, else ""
        # Closed forms (constant weights) or a bounded integration (schedules): never one
        # entry per step, so planning costs the same for 10^3 and 10^12 steps.
        shares = stage.sampler.source_shares()
        repeats = stage.source_passes()
        end_samples = samples + stage.context.samples(stage.steps)
        end_tokens = tokens + stage.context.tokens(stage.steps)
        sources = []
        for k, source in enumerate(stage.sources):
            share = float(shares[k])
            sources.append((source.label, share, float(repeats[k])))
            if repeats[k] > 1:
                warnings.append(
                    f"stage {stage.name!r}: source {source.label!r} ({source.size:,} samples) "
                    f"repeats {repeats[k]:.2f} times to fill the stage"
                )
        stages.append(
            StagePlan(
                index=stage.index,
                name=stage.name,
                start_step=step,
                end_step=step + stage.steps,
                start_samples=samples,
                end_samples=end_samples,
                start_tokens=tokens,
                end_tokens=end_tokens,
                batch_size=stage.batch_size,
                seq_len=stage.config.seq_len,
                handoff=stage.config.handoff if stage.index else "start",
                lr_start=stage.lr_shape(0) if auto else stage.lr(0),
                lr_end=stage.lr_shape(stage.steps - 1) if auto else stage.lr(stage.steps - 1),
                lr_auto=auto,
                warmup_steps=stage.warmup_steps,
                sources=sources,
                up_to=stage.config.advance is not None,
                loss=" + ".join(
                    t.name if t.weight == 1.0 else f"{t.weight:g} x {t.name}"
                    for t in stage.loss.terms
                ),
            )
        )
        step += stage.steps
        samples, tokens = end_samples, end_tokens
    return Plan(curriculum.config.name, curriculum.config.seed, stages, warnings)

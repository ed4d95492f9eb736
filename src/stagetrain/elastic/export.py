"""``stagetrain extract``: one budget of a trained elastic run, checked and written.

Steps: rebuild the parent from the run's config and load its newest checkpoint;
optionally pin every budget to the nearest configuration within tolerance
(``project``); check the budget against its target (refuse beyond ``tolerance``
unless ``allow_off_target``); slice the child; compare it with the masked parent on
random token batches; write it (``stagetrain`` or ``hf`` format, see
:mod:`~stagetrain.elastic.extract`); load the written folder back and compare again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stagetrain.elastic.budgets import (
    DEFAULT_TOLERANCE,
    BudgetStatus,
    check_budgets,
    require_on_target,
)
from stagetrain.elastic.core import ElasticHost
from stagetrain.elastic.extract import (
    Child,
    Format,
    extract,
    load_extracted,
    save_extracted,
    save_hf,
)
from stagetrain.errors import ConfigError


@dataclass
class ExtractionReport:
    """What :func:`extract_run` wrote and how well it matches the parent."""

    budget: str
    status: BudgetStatus
    child_params: int
    max_abs_diff: float
    """Extracted model against the masked parent."""
    reloaded_diff: float
    """The folder loaded back against the masked parent."""
    out: Path
    format: str
    layout: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def off_target(self) -> float:
        return self.status.off_target

    def lines(self) -> list[str]:
        layout = self.layout
        return [
            f"budget {self.budget!r}: width {layout['width']}, layers {layout['layers']}, "
            f"heads {layout['heads']}, ffn {layout['ffn']}",
            f"parameters {self.child_params:,} = {self.status.fraction:.3f} of the full "
            f"{self.status.full_params:,} (target {self.status.target:.3f}; "
            f"{self.off_target:+.1%} off; tolerance {self.status.tolerance:.0%})",
            f"max |extracted - masked parent| on check batches: {self.max_abs_diff:.2e}",
            f"max |reloaded - masked parent| on check batches: {self.reloaded_diff:.2e}",
            f"wrote {self.out} ({self.format} format)",
        ]


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _vocab_and_length(host: ElasticHost) -> tuple[int, int]:
    family: Any = host.family
    return int(family.vocab), min(int(family.max_length), 64)


def _tokenizer_source(model_args: dict[str, Any], run_dir: Path) -> str | None:
    if model_args.get("tokenizer") is not None:
        return str(model_args["tokenizer"])
    pretrained = model_args.get("pretrained")
    names = ("tokenizer.json", "tokenizer_config.json")
    if pretrained and any((Path(pretrained) / n).is_file() for n in names):
        return str(pretrained)
    if (run_dir / "tokenizer").is_dir():
        return str(run_dir / "tokenizer")
    return None


def _run_config(run_dir: Path) -> Any:
    from stagetrain.config import load_config

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_config(config_path)
    if config.model is None:
        raise ConfigError(f"{config_path}: model: the run declares no model")
    return config


def load_elastic_run(run_dir: str | Path) -> ElasticHost:
    """The elastic parent of a run directory (``stagetrain run`` or :func:`stagetrain.fit`),
    rebuilt from its ``config.yaml`` with the newest checkpoint's weights (router counter
    and pins included), in evaluation mode.

    Raises:
        ConfigError: not a run directory, or its model is not elastic with budgets.
    """
    from stagetrain.registry import build_model, load_weights

    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    parent = build_model(config.model, seed=config.seed)
    if getattr(parent, "family", None) is None or getattr(parent, "router", None) is None:
        raise ConfigError(f"{run_dir / 'config.yaml'}: model: not an elastic model with budgets")
    parent.load_state_dict(load_weights(str(run_dir), field="run_dir"))
    host: Any = parent.eval()
    return host


def extract_run(
    run_dir: str | Path,
    budget: str,
    out: str | Path,
    *,
    format: Format = "stagetrain",
    tolerance: float = DEFAULT_TOLERANCE,
    allow_off_target: bool = False,
    project: bool = False,
    check_batches: int = 4,
    seed: int = 0,
) -> ExtractionReport:
    """Extract ``budget`` from the newest checkpoint of an elastic run (see the module
    docstring). Raises :class:`~stagetrain.elastic.budgets.BudgetError` when the budget
    misses its target by more than ``tolerance`` and neither ``allow_off_target`` nor
    ``project`` is set."""
    if format not in ("stagetrain", "hf"):
        raise ConfigError(f"--format: 'stagetrain' or 'hf', got {format!r}")
    run_dir = Path(run_dir)
    host: Any = load_elastic_run(run_dir)
    model_args = _run_config(run_dir).model.args
    warnings = []
    if project:
        before = {s.name: s.config for s in check_budgets(host, tolerance)}
        host.router.project(tolerance, host.layer_rank)
        after = {s.name: s.config for s in check_budgets(host, tolerance)}
        if budget in before and before[budget] != after[budget]:
            warnings.append(
                f"{budget!r} projected from {before[budget]} to {after[budget]}: the weights "
                "were not trained at the projected sizes (router.project does that in training)"
            )
    statuses = {s.name: s for s in check_budgets(host, tolerance)}
    if budget not in statuses:
        raise ConfigError(f"extract: --budget: no budget {budget!r}; budgets are {list(statuses)}")
    status = statuses[budget]
    if allow_off_target and not status.ok:
        warnings.append(f"{status.line()}; written anyway (--allow-off-target)")
    else:
        require_on_target(status)
    child = extract(host, budget)
    if child.params != status.params:
        raise ConfigError(
            f"extract: the child has {child.params:,} parameters but the config counts "
            f"{status.params:,} (a bug in the family's parameter count)"
        )
    child.model.eval()
    index = host.router.index(budget)
    vocab, length = _vocab_and_length(host)
    generator = torch.Generator().manual_seed(seed)
    batches = [
        torch.randint(0, vocab, (2, length), generator=generator) for _ in range(check_batches)
    ]
    diff = _max_diff(host, child, batches, index)
    metadata = {
        "budget": budget,
        "target": status.target,
        "params": child.params,
        "parent_params": status.full_params,
        "config": status.config,
    }
    if format == "hf":
        save_hf(child, host.family, out, tokenizer=_tokenizer_source(model_args, run_dir),
                metadata=metadata)  # fmt: skip
    else:
        save_extracted(child, out, metadata=metadata)
    reloaded = load_extracted(out)
    reloaded_diff = _max_diff(host, Child(reloaded, {}, 0, [], []), batches, index)
    return ExtractionReport(
        budget=budget,
        status=status,
        child_params=child.params,
        max_abs_diff=diff,
        reloaded_diff=reloaded_diff,
        out=Path(out),
        format=format,
        layout=child.layout(),
        warnings=warnings,
    )


@torch.no_grad()
def _max_diff(host: ElasticHost, child: Child, batches: list[torch.Tensor], index: int) -> float:
    diff = 0.0
    for tokens in batches:
        masked = host.budget_logits(tokens, index)
        diff = max(diff, float((_logits(child.model(tokens)) - masked).abs().max()))
    return diff

"""What a comparison runs: its description (``compare.json``), the arms' configs, the checks."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stagetrain.arms import derive_arm, parse_arms
from stagetrain.checkpoint import atomic_write_text
from stagetrain.compare.runs import TargetMetric, produced_metrics
from stagetrain.config import CurriculumConfig
from stagetrain.curriculum import Curriculum
from stagetrain.errors import ConfigError, StageTrainError

VARY = ("init", "data")
"""What the seeds of a comparison vary: the initialisation (and batch order), the data."""


@dataclass
class CompareSpec:
    """What a comparison runs (stored as ``compare.json``)."""

    arms: list[str]
    seeds: list[int]
    """Run labels (``runs/<arm>/seed-<label>``): the config's seed + 0, 1, ..."""
    data_seeds: list[int]
    init_seeds: list[int]
    vary: list[str]
    metric: str
    metrics: list[str]
    """Every metric the curriculum-level evaluations produce (for ``report --metric``)."""
    fingerprint: str
    target: float | None = None
    """The time-to-target threshold ``compare`` was given (``report`` uses it by default)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_file(cls, path: Path) -> CompareSpec:
        try:
            data = json.loads(path.read_text())
            fields = [k for k in cls.__dataclass_fields__ if k != "target"]
            return cls(**{k: data[k] for k in fields}, target=data.get("target"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path}: not a comparison description ({type(exc).__name__}: {exc}); "
                "was it written by an older stagetrain? Use another --out"
            ) from None


def parse_vary(vary: str | Sequence[str]) -> list[str]:
    """``"init,data"`` or a list, validated."""
    names = [v.strip() for v in vary.split(",")] if isinstance(vary, str) else list(vary)
    names = [n for n in names if n]
    for name in names:
        if name not in VARY:
            raise ConfigError(f"vary: unknown {name!r}; choose from {', '.join(VARY)}")
    if not names:
        raise ConfigError("vary: give init, data or both")
    return [v for v in VARY if v in names]


def check_target(target: float | None) -> None:
    if target is not None and not math.isfinite(target):
        raise ConfigError(f"target: must be a finite number, got {target}")


def require_report_extra() -> None:
    """Fail now, before any training, when the statistics and plots could not be made."""
    missing = []
    for module in ("scipy.stats", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module.split(".")[0])
    if missing:
        raise StageTrainError(
            f"compare needs {' and '.join(missing)} for its statistics and plots: "
            "pip install 'stagetrain[report]'"
        )


def prepare(
    config: CurriculumConfig,
    out_dir: Path,
    arms: Sequence[str],
    seeds: int,
    metric: str | None,
    *,
    vary: Sequence[str] = VARY,
    target: float | None = None,
    datasets: Mapping[str, Any] | None = None,
    models: Mapping[str, Any] | None = None,
) -> tuple[CompareSpec, dict[str, CurriculumConfig]]:
    """Derive the arms' configs and write the comparison directory's description."""
    if seeds < 1:
        raise ConfigError(f"seeds: need at least one seed, got {seeds}")
    arm_names = parse_arms(list(arms))
    vary_names = parse_vary(list(vary))
    chosen = TargetMetric.parse(metric, produced_metrics(config))
    curriculum = Curriculum(config, datasets=datasets, models=models, progress=False)
    derived = {arm: derive_arm(curriculum, arm) for arm in arm_names}
    base_data = config.data_seed if config.data_seed is not None else config.seed
    labels = [config.seed + i for i in range(seeds)]
    spec = CompareSpec(
        arms=arm_names,
        seeds=labels,
        init_seeds=[s if "init" in vary_names else config.seed for s in labels],
        data_seeds=[base_data + i if "data" in vary_names else base_data for i in range(seeds)],
        vary=vary_names,
        metric=str(chosen),
        metrics=produced_metrics(config),
        fingerprint=config.fingerprint(),
        target=target,
    )
    spec_path = out_dir / "compare.json"
    if spec_path.exists():
        old = CompareSpec.from_file(spec_path)
        if old.fingerprint != spec.fingerprint:
            raise ConfigError(
                f"{out_dir}: holds a comparison of a different curriculum; use another --out"
            )
        if old.vary != spec.vary:
            raise ConfigError(
                f"{out_dir}: its runs vary {','.join(old.vary)}, not {','.join(spec.vary)}; "
                "use another --out"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "arms").mkdir(exist_ok=True)
    for arm, arm_config in derived.items():
        arm_text = yaml.safe_dump(arm_config.to_dict(), sort_keys=False)
        atomic_write_text(out_dir / "arms" / f"{arm}.yaml", arm_text)
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(spec_path, json.dumps(spec.to_dict(), indent=1))
    return spec, derived

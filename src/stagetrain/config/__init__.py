"""The curriculum as a typed, validated config.

A :class:`CurriculumConfig` is the whole declaration: ordered stages plus the seed,
the model, evaluation sets and checkpointing. It is built the same way from YAML,
TOML or Python (:func:`load_config`, :func:`parse_config`, or the constructors), and
validated up front: every problem is reported as a :class:`~stagetrain.errors.ConfigError`
naming the field, e.g. ``stages[1].duration: duration must be positive, got '0ba'``.
"""

from stagetrain.config._autolr import AutoLRConfig
from stagetrain.config._base import BUILTIN_LOSSES, BUILTIN_METRICS, callable_name
from stagetrain.config._curriculum import CurriculumConfig
from stagetrain.config._files import config_diff, format_validation_error, load_config, parse_config
from stagetrain.config._parallel import MixedPrecisionConfig, ParallelConfig
from stagetrain.config._sources import (
    DataConfig,
    DifficultyConfig,
    ModelConfig,
    SelectConfig,
    SourceConfig,
)
from stagetrain.config._stages import CheckpointConfig, GlobalLR, NonFiniteConfig, StageConfig
from stagetrain.config._training import (
    AdvanceConfig,
    BatchConfig,
    EvalConfig,
    Handoff,
    LossTerm,
    MetricSpec,
    OptimizerConfig,
    PacingConfig,
)

__all__ = [
    "BUILTIN_LOSSES",
    "BUILTIN_METRICS",
    "AdvanceConfig",
    "AutoLRConfig",
    "BatchConfig",
    "CheckpointConfig",
    "CurriculumConfig",
    "DataConfig",
    "DifficultyConfig",
    "EvalConfig",
    "GlobalLR",
    "Handoff",
    "LossTerm",
    "MetricSpec",
    "MixedPrecisionConfig",
    "ModelConfig",
    "NonFiniteConfig",
    "OptimizerConfig",
    "PacingConfig",
    "ParallelConfig",
    "SelectConfig",
    "SourceConfig",
    "StageConfig",
    "callable_name",
    "config_diff",
    "format_validation_error",
    "load_config",
    "parse_config",
]

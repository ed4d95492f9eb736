"""stagetrain: two-stage and multi-stage curriculum training for PyTorch.

Declare stages (data or mixtures, loss, optimizer and LR policy, hand-off, duration),
train through them with :func:`fit` or your own loop, resume exactly, and compare
against honest baselines.
"""

from stagetrain.checkpoint import CheckpointStore, load_checkpoint
from stagetrain.compare import compare
from stagetrain.config import (
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    LossTerm,
    ModelConfig,
    OptimizerConfig,
    SourceConfig,
    StageConfig,
    load_config,
    parse_config,
)
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.data import TensorPairDataset
from stagetrain.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EnvError,
    RunDirError,
    StageTrainError,
    TrainingError,
)
from stagetrain.handoff import apply_freeze, apply_handoff, enter_stage
from stagetrain.ownloop import StepInfo
from stagetrain.plan import Plan, make_plan
from stagetrain.state import TrainState
from stagetrain.time import Duration, TimeContext, TimeUnit
from stagetrain.train import Callback, Engine, FitResult, RunContext, TorchEngine, fit

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CheckpointError",
    "CheckpointStore",
    "ConfigError",
    "Curriculum",
    "CurriculumConfig",
    "DataConfig",
    "DataError",
    "Duration",
    "Engine",
    "EnvError",
    "EvalConfig",
    "FitResult",
    "LossTerm",
    "ModelConfig",
    "OptimizerConfig",
    "Plan",
    "RunContext",
    "RunDirError",
    "SourceConfig",
    "Stage",
    "StageConfig",
    "StageTrainError",
    "StepInfo",
    "TensorPairDataset",
    "TimeContext",
    "TimeUnit",
    "TorchEngine",
    "TrainState",
    "TrainingError",
    "__version__",
    "apply_freeze",
    "apply_handoff",
    "compare",
    "enter_stage",
    "fit",
    "load_checkpoint",
    "load_config",
    "make_plan",
    "parse_config",
]

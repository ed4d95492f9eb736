"""Exceptions raised by stagetrain.

Every user-facing failure is one of these, with a message that names the field or
file at fault and says what was expected; the CLI prints the message on one line
instead of a traceback.
"""

from __future__ import annotations


class StageTrainError(Exception):
    """Base class of every error stagetrain raises on purpose."""


class ConfigError(StageTrainError, ValueError):
    """A curriculum config (file or Python object) is invalid."""


class CheckpointError(StageTrainError):
    """A checkpoint is missing, corrupted, unsafe, or does not match the curriculum."""


class DataError(StageTrainError):
    """A data source cannot be built or does not have the expected shape."""


class TrainingError(StageTrainError):
    """Training cannot continue (for example a non-finite loss under the 'raise' policy)."""


class RunDirError(StageTrainError):
    """A run directory cannot be used: locked by another process, holding another run,
    or not writable (the message names the path and the operating system's reason)."""


class EnvError(StageTrainError):
    """An environment variable (WORLD_SIZE, STAGETRAIN_CACHE, ...) has an invalid value."""

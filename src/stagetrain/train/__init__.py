"""The built-in training loop, split by job.

``fit.py`` decides what runs (fresh, resume, nothing) and checks it
(``preflight.py``); ``runner.py`` is the stage machine with its single stage exit;
``step.py`` the forward/backward and update of one step; ``guards.py`` the non-finite
policies; ``engine.py`` the distributed engines and their device-aware collectives;
``resume.py`` the checkpoint payload and restore; ``rundir.py`` the run-directory
policy; ``callbacks.py`` and ``progress.py`` what a run tells the outside.
"""

from stagetrain.train.callbacks import Callback, RunContext
from stagetrain.train.engine import AccelerateEngine, Engine, TorchEngine
from stagetrain.train.fit import FitResult, fit

__all__ = [
    "AccelerateEngine",
    "Callback",
    "Engine",
    "FitResult",
    "RunContext",
    "TorchEngine",
    "fit",
]

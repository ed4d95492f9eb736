"""The built-in training loop, split by job.

``fit.py`` decides what runs (fresh, resume, nothing) and checks it
(``preflight.py``); ``runner.py`` is the stage machine with its single stage exit;
``step.py`` the forward/backward and update of one step; ``guards.py`` the non-finite
policies; ``engine.py`` the distributed engines and their device-aware collectives
(``fsdp.py``: FSDP2, ``parallel: fsdp``); ``resume.py`` the checkpoint payload and
restore; ``stores.py`` where checkpoints go (single files, or the sharded ones of
``dcp.py``); ``rundir.py`` the run-directory policy; ``callbacks.py`` and
``progress.py`` what a run tells the outside.
"""

from stagetrain.train.callbacks import Callback, RunContext
from stagetrain.train.engine import AccelerateEngine, Engine, TorchEngine
from stagetrain.train.fit import FitResult, fit
from stagetrain.train.fsdp import FSDPEngine, full_state_dict

__all__ = [
    "AccelerateEngine",
    "Callback",
    "Engine",
    "FSDPEngine",
    "FitResult",
    "RunContext",
    "TorchEngine",
    "fit",
    "full_state_dict",
]

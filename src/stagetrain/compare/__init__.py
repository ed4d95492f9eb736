"""``compare``: run a curriculum against its control arms over seeds, then analyse.

Layout of a comparison directory::

    compare.json            what was asked (fingerprint, arms, seeds, data seeds, metric)
    config.yaml             the curriculum as given
    arms/<arm>.yaml         each derived arm's config (see stagetrain.arms)
    runs/<arm>/seed-<s>/    an ordinary run directory per (arm, seed)
    runs/<arm>/seed-<s>.log the run's output (a traceback when it failed)

The runs are trained by a pool of persistent worker processes
(:mod:`stagetrain.workers`) that call :func:`stagetrain.fit` in-process, so the cost of
starting Python and importing torch is paid once per worker, not once per run. A run
that raises, or whose worker dies, is recorded as failed (``seed-<s>.failed``) without
stopping the others. A finished run has ``summary.json``; an interrupted compare skips
finished runs and resumes cut ones from their checkpoints.

Seeds: run ``i`` of every arm uses ``seed + i`` for the initialisation and batch order
and ``data_seed + i`` for the data factories (``--vary init,data``, the default); with
``--vary init`` the data seed stays the config's, with ``--vary data`` the seed does.
"""

from stagetrain.compare.analysis import Analysis, ArmAnalysis, analyze, time_axis
from stagetrain.compare.driver import compare
from stagetrain.compare.pool import run_all
from stagetrain.compare.runs import RunResult, TargetMetric, produced_metrics, read_run, run_dir_of
from stagetrain.compare.spec import (
    VARY,
    CompareSpec,
    check_target,
    parse_vary,
    prepare,
    require_report_extra,
)
from stagetrain.compare.table import markdown_table, time_verdict, verdict

__all__ = [
    "VARY",
    "Analysis",
    "ArmAnalysis",
    "CompareSpec",
    "RunResult",
    "TargetMetric",
    "analyze",
    "check_target",
    "compare",
    "markdown_table",
    "parse_vary",
    "prepare",
    "produced_metrics",
    "read_run",
    "require_report_extra",
    "run_all",
    "run_dir_of",
    "time_axis",
    "time_verdict",
    "verdict",
]

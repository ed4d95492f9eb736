"""The ``stagetrain`` command's process set-up: import paths and warning lines."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_plain_format_warning = warnings.formatwarning


def set_up() -> None:
    """Put the working directory on ``sys.path`` and print stagetrain's warnings as lines.

    The console script, unlike ``python -m`` and ``torchrun -m``, leaves the working
    directory off ``sys.path``: ``factory: mymodels:build`` must import the same way
    under every launcher.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    warnings.formatwarning = format_warning


def format_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """stagetrain's own warnings as one line (not the source line that raised them); other
    libraries' in their usual form."""
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        return f"stagetrain: warning: {message}\n"
    return _plain_format_warning(message, category, filename, lineno, line)

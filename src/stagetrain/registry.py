"""Name lookups: built-in datasets, models and losses, and ``"pkg.mod:attr"`` import paths.

Built-ins are stored as import paths and imported lazily, so that ``import stagetrain``
stays cheap and a recipe's extra dependencies (scikit-learn, say) are needed only
when that recipe is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from stagetrain.errors import ConfigError

BUILTIN_SOURCES: dict[str, str] = {
    "parity": "stagetrain.recipes.parity:parity_dataset",
}
"""Built-in data sources: name -> import path of a factory ``(**args) -> Dataset``."""

BUILTIN_MODELS: dict[str, str] = {
    "mlp": "stagetrain.recipes.models:mlp",
}
"""Built-in models: name -> import path of a factory ``(**args) -> nn.Module``."""


def import_path(path: str, *, field: str) -> Any:
    """Import ``"pkg.mod:attr"`` (dots after the colon walk attributes).

    Raises:
        ConfigError: naming ``field`` when the text is malformed, the module cannot be
            imported, or the attribute does not exist.
    """
    if ":" not in path:
        raise ConfigError(f"{field}: expected an import path 'package.module:name', got {path!r}")
    module_name, _, attr_path = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{field}: cannot import module {module_name!r} ({exc})") from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"{field}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    return obj


def resolve_factory(
    *, builtin: str | None, factory: str | None, table: dict[str, str], field: str, kind: str
) -> Callable[..., Any]:
    """The callable behind a ``builtin`` name or a ``factory`` import path."""
    if builtin is not None:
        if builtin not in table:
            known = ", ".join(sorted(table))
            raise ConfigError(f"{field}: unknown built-in {kind} {builtin!r}; known: {known}")
        return import_path(table[builtin], field=field)
    assert factory is not None, "config validation guarantees builtin or factory"
    target = import_path(factory, field=field)
    if not callable(target):
        raise ConfigError(f"{field}: {factory!r} is not callable")
    return target

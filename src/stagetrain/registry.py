"""Name lookups: built-in datasets, models and losses, and ``"pkg.mod:attr"`` import paths.

Built-ins are stored as import paths and imported lazily, so that ``import stagetrain``
stays cheap and a recipe's extra dependencies (scikit-learn, say) are needed only
when that recipe is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from stagetrain.errors import ConfigError, StageTrainError

BUILTIN_SOURCES: dict[str, str] = {
    "parity": "stagetrain.recipes.parity:parity_dataset",
    "digits": "stagetrain.recipes.digits:noisy_digits",
    "shapes": "stagetrain.recipes.shapes:shapes_dataset",
    "addition": "stagetrain.recipes.addition:addition_dataset",
    "stdlib_text": "stagetrain.recipes.pystdlib:stdlib_text",
    # Real data on disk (stagetrain.sources): token files and Hugging Face datasets.
    "tokens": "stagetrain.sources.tokens:tokens_source",
    "hf": "stagetrain.sources.hf:hf_source",
    "elastic_text": "stagetrain.elastic.data:budget_items",
}
"""Built-in data sources: name -> import path of a factory ``(**args) -> Dataset``."""

BUILTIN_MODELS: dict[str, str] = {
    "mlp": "stagetrain.recipes.models:mlp",
    "addition_gru": "stagetrain.recipes.addition:addition_gru",
    "gpt": "stagetrain.recipes.gpt:gpt",
    "elastic_gpt": "stagetrain.elastic.model:elastic_gpt",
    "elastic_parent": "stagetrain.recipes.elastic:elastic_parent",
    "elastic_pruned": "stagetrain.recipes.elastic:pruned_teacher",
    "elastic_hf": "stagetrain.recipes.elastic:elastic_hf",
    "hf_causal_lm": "stagetrain.elastic.hf:hf_causal_lm",
    "hf_sliced": "stagetrain.elastic.hf:hf_sliced",
    "extracted": "stagetrain.elastic.extract:extracted",
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


def call_factory(
    factory: Callable[..., Any], args: dict[str, Any], *, error: type[Exception], what: str
) -> Any:
    """``factory(**args)``; anything it raises (other than our own errors) becomes ``error``
    with the message ``"{what} failed: Type: message"``, so the user sees which field broke."""
    try:
        return factory(**args)
    except StageTrainError as exc:
        field = what.split(": ", 1)[0]
        if str(exc).startswith(field):
            raise
        raise type(exc)(f"{field}: {exc}") from None  # name the config field that broke
    except Exception as exc:  # a user factory may raise anything
        raise error(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def build_model(cfg: Any, *, seed: int, field: str = "model") -> Any:
    """Build the ``nn.Module`` a :class:`~stagetrain.config.ModelConfig` declares.

    The factory runs with every global generator seeded by ``seed`` (and receives
    ``seed`` when it takes one), so initial weights follow the seed; ``weights`` (a
    state_dict file or ``.safetensors``) is then loaded safely.
    """
    import inspect

    import torch

    from stagetrain.seeding import seeded

    factory = resolve_factory(
        builtin=cfg.builtin, factory=cfg.factory, table=BUILTIN_MODELS, field=field, kind="model"
    )
    args = dict(cfg.args)
    try:
        takes_seed = "seed" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_seed = False
    if takes_seed and "seed" not in args:
        args["seed"] = seed
    torch.manual_seed(seed)  # the model's own draws follow the seed (kept for callers)
    with seeded(seed):
        model = call_factory(factory, args, error=ConfigError, what=f"{field}: building the model")
    if not isinstance(model, torch.nn.Module):
        raise StageTrainError(f"{field}: the factory returned {type(model).__name__}, not a Module")
    if cfg.weights is not None:
        model.load_state_dict(load_weights(cfg.weights, field=f"{field}.weights"))
    return model


def load_weights(path: str, *, field: str) -> dict[str, Any]:
    from pathlib import Path

    from stagetrain.errors import CheckpointError

    file = Path(path)
    if (file / "checkpoints" / "sharded.json").is_file():
        # A sharded run (parallel: fsdp): its newest intact checkpoint, consolidated.
        from stagetrain.train.dcp import select_sharded

        weights, _ = select_sharded(file, None)
        return dict(weights)
    if (file / "checkpoints").is_dir():  # the manifest may be lost: sidecars rebuild it
        # A run directory: the model weights of its newest intact checkpoint.
        from stagetrain.checkpoint import CheckpointStore

        payload, _ = CheckpointStore(file / "checkpoints").load_latest()
        return dict(payload["model"])
    if not file.is_file():
        raise CheckpointError(
            f"{field}: weights file {path!r} not found (expected a state_dict file, "
            "a .safetensors file, a stagetrain checkpoint or a run directory)"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(file)))
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{field}: cannot load {path!r} safely ({first})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a stagetrain checkpoint: take its model weights
    return dict(state)

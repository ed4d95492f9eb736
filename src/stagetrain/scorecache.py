"""The difficulty-score cache: scores on disk, keyed by everything they depend on.

The key of a source's scores hashes the data (its identity, length and the bytes of
spread samples), the scorer's config, the run's seed, the content of the files it
reads, the weights of an in-memory reference model and the code of a callable scorer.
An entry that is not one finite float per sample is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagetrain.batch import leaves
from stagetrain.checkpoint import atomic_write, sha256_file
from stagetrain.config import DifficultyConfig, ModelConfig
from stagetrain.data import fetch
from stagetrain.env import cache_dir
from stagetrain.registry import import_path


def default_cache_dir() -> Path:
    """``$STAGETRAIN_CACHE`` or ``~/.cache/stagetrain/scores``, checked (see
    :func:`stagetrain.env.cache_dir`: a writable directory, not ``/proc``)."""
    return cache_dir()


def dataset_fingerprint(dataset: Any, identity: str) -> str:
    """Hash of the source's identity, its length and the bytes of up to 16 spread samples."""
    digest = hashlib.sha256(identity.encode())
    n = len(dataset)
    digest.update(str(n).encode())
    probe = np.unique(np.linspace(0, n - 1, num=min(16, n)).astype(np.int64))
    for tensor in leaves(fetch(dataset, probe)):
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a model's class and weights (an in-memory reference model's identity)."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def code_fingerprint(fn: Any) -> str:
    """Hash of a function's source (or, without source, its bytecode and constants)."""
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = repr((code.co_code, code.co_consts)) if code is not None else repr(fn)
    return hashlib.sha256(text.encode()).hexdigest()


def scorer_fingerprint(
    cfg: DifficultyConfig,
    seed: int,
    models: Mapping[str, torch.nn.Module] | None = None,
) -> str:
    """Hash of everything a scorer's output depends on: its config, the seed, the content
    of the files it reads, the weights of an in-memory reference model and the code of a
    callable scorer."""
    data = cfg.model_dump(mode="json")
    data["seed"] = seed
    if isinstance(cfg.model, ModelConfig) and cfg.model.weights:
        data["weights_sha256"] = sha256_file(Path(cfg.model.weights))
    if isinstance(cfg.model, str) and models is not None:
        named = models.get(cfg.model.removeprefix("@"))
        if named is not None:
            data["model_sha256"] = module_fingerprint(named)
    if cfg.scorer == "file" and cfg.path and Path(cfg.path).is_file():
        data["file_sha256"] = sha256_file(Path(cfg.path))
    if cfg.scorer == "callable" and cfg.fn:
        data["code_sha256"] = code_fingerprint(import_path(cfg.fn, field="difficulty.fn"))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class ScoreCache:
    """Scores on disk, one ``.npy`` per (dataset, scorer) key, written atomically."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def get(self, key: str, expected: int | None = None) -> np.ndarray | None:
        """The cached scores of ``key``, or None when absent or not trustworthy.

        A damaged entry (unreadable, not one float per sample, NaN or infinite) is
        recomputed, never used.
        """
        path = self.path(key)
        if not path.exists():
            return None
        try:
            scores = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None
        if (
            scores.ndim != 1
            or scores.dtype != np.float64
            or (expected is not None and len(scores) != expected)
            or not np.all(np.isfinite(scores))
        ):
            return None
        return scores

    def put(self, key: str, scores: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, scores, allow_pickle=False)
        payload = buffer.getvalue()
        atomic_write(self.path(key), lambda f: f.write(payload))

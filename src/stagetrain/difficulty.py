"""Difficulty scores: how hard each sample is, computed once and cached on disk
(:mod:`stagetrain.scorecache`).

Scores are computed batched under ``no_grad`` with a progress bar and stored as
``<cache>/<key>.npy``, where the key hashes the dataset's fingerprint and the scorer's
config (and the bytes of any weights or scores file it reads). A second run with
the same data and scorer reads the file instead of scoring again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stagetrain.batch import leaves, to_device
from stagetrain.config import DifficultyConfig, ModelConfig, SelectConfig
from stagetrain.data import fetch
from stagetrain.errors import ConfigError, DataError
from stagetrain.modelio import ModelIO
from stagetrain.registry import build_model, import_path
from stagetrain.scorecache import (
    ScoreCache,
    dataset_fingerprint,
    scorer_fingerprint,
)


def _batches(n: int, batch_size: int, desc: str, progress: bool) -> Any:
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch")


def _per_position(values: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-sample mean of per-position ``values``, over positions not equal to ``ignore_index``."""
    keep = (targets.reshape(targets.shape[0], -1) != ignore_index).to(values.dtype)
    values = values.reshape(targets.shape[0], -1) * keep
    return values.sum(dim=1) / keep.sum(dim=1).clamp(min=1)


def _per_sample_loss(
    output: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Cross-entropy per sample (averaged over the non-ignored positions of sequences)."""
    losses = F.cross_entropy(
        output.reshape(-1, output.shape[-1]),
        targets.reshape(-1).long(),
        reduction="none",
        ignore_index=ignore_index,
    )
    return _per_position(losses, targets, ignore_index)


def _per_sample_confidence_difficulty(
    output: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """1 - probability of the true class (averaged over the non-ignored positions)."""
    probs = output.reshape(-1, output.shape[-1]).softmax(-1)
    true = probs.gather(1, targets.reshape(-1, 1).long().clamp(min=0)).squeeze(1)
    return _per_position(1 - true, targets, ignore_index)


@torch.no_grad()
def score_with_model(
    model: torch.nn.Module,
    dataset: Any,
    *,
    kind: str = "loss",
    indices: np.ndarray | None = None,
    batch_size: int = 1024,
    progress: bool = True,
    io: ModelIO | None = None,
) -> np.ndarray:
    """Per-sample loss or confidence-difficulty of ``model`` on ``dataset`` (or ``indices``).

    ``io``: how batches reach the model (any batch structure; pairs by default).
    """
    io = io or ModelIO()
    was_training = model.training
    model.eval()
    idx = np.arange(len(dataset)) if indices is None else indices
    device = next(model.parameters()).device
    per_sample = _per_sample_loss if kind == "loss" else _per_sample_confidence_difficulty
    out = np.empty(len(idx), dtype=np.float64)
    try:
        for start in _batches(len(idx), batch_size, f"scoring ({kind})", progress):
            batch = to_device(fetch(dataset, idx[start : start + batch_size], io.fmt), device)
            pred = io.predict(model, batch)
            if pred.target is None:
                raise DataError(f"scoring ({kind}): the batches have no targets")
            values = per_sample(pred.logits, pred.target, io.fmt.ignore_index)
            out[start : start + len(values)] = values.double().cpu().numpy()
    finally:
        model.train(was_training)  # the caller's model comes back in the mode it was in
    return out


def score_by_length(
    dataset: Any, *, pad_id: int | None, batch_size: int, progress: bool
) -> np.ndarray:
    """Length of each sample's input: tokens not equal to ``pad_id`` (all elements if None).

    For mapping batches with an ``attention_mask``, the number of attended positions.
    """
    out = np.empty(len(dataset), dtype=np.float64)
    for start in _batches(len(dataset), batch_size, "scoring (length)", progress):
        batch = fetch(dataset, np.arange(start, min(start + batch_size, len(dataset))))
        if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
            mask = batch["attention_mask"]
            out[start : start + len(mask)] = mask.reshape(len(mask), -1).sum(1).double().numpy()
            continue
        inputs = leaves(batch)[0]
        flat = inputs.reshape(inputs.shape[0], -1)
        lengths = (
            (flat != pad_id).sum(1)
            if pad_id is not None
            else torch.full((len(flat),), flat.shape[1])
        )
        out[start : start + len(flat)] = lengths.double().numpy()
    return out


def score_self_taught(
    dataset: Any,
    cfg: DifficultyConfig,
    model_factory: Callable[[int], torch.nn.Module],
    *,
    seed: int,
    progress: bool,
    io: ModelIO | None = None,
) -> np.ndarray:
    """Cross-fitted loss: fold k is scored by a quick model trained on the other folds.

    Cross-fitting keeps a model from scoring samples it memorised — which matters most
    for mislabelled samples, exactly the ones a curriculum should put last.
    """
    io = io or ModelIO()
    n = len(dataset)
    rng = np.random.default_rng([seed, 0x5E1F])
    folds = np.array_split(rng.permutation(n), cfg.folds)
    scores = np.empty(n, dtype=np.float64)
    for k, held_out in enumerate(folds):
        train_idx = np.concatenate([f for j, f in enumerate(folds) if j != k])
        model = model_factory(seed * 1000 + k)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        batch = min(64, len(train_idx))
        model.train()
        for step in tqdm(
            range(cfg.steps),
            desc=f"self-taught fold {k + 1}/{cfg.folds}",
            disable=not progress,
            leave=False,
        ):
            pick = np.random.default_rng([seed, k, step]).integers(0, len(train_idx), batch)
            pred = io.predict(model, fetch(dataset, train_idx[pick], io.fmt))
            if pred.target is None:
                raise DataError("self_taught scoring: the batches have no targets")
            loss = _per_sample_loss(pred.logits, pred.target, io.fmt.ignore_index).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scores[held_out] = score_with_model(
            model,
            dataset,
            kind="loss",
            indices=held_out,
            batch_size=cfg.batch_size,
            progress=False,
            io=io,
        )
    return scores


def read_scores_file(path: str | Path, expected: int, *, field: str) -> np.ndarray:
    """Scores from ``.npy`` or a text file (one number per line), validated."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{field}: scores file {str(file)!r} not found")
    try:
        if file.suffix == ".npy":
            scores = np.load(file, allow_pickle=False).astype(np.float64).reshape(-1)
        else:
            scores = np.loadtxt(file, dtype=np.float64, ndmin=1)
    except ValueError as exc:
        raise DataError(f"{field}: {file}: not one number per sample ({exc})") from None
    if len(scores) != expected:
        raise DataError(
            f"{field}: {file} has {len(scores)} scores, but the dataset has {expected} samples"
        )
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise DataError(
            f"{field}: {file} has non-finite scores (NaN or inf) at samples {bad[:5].tolist()}"
        )
    return scores


class DifficultyScorer:
    """Computes (or reads from the cache) the scores of a source under a scorer config.

    Args:
        seed: curriculum seed (self-taught training follows it).
        cache: where scores are cached.
        models: in-memory reference models, named ``"@name"`` in configs.
        default_model: the curriculum's model config (self_taught's default).
        progress: show progress bars.
    """

    def __init__(
        self,
        *,
        seed: int,
        cache: ScoreCache,
        models: Mapping[str, torch.nn.Module] | None = None,
        default_model: ModelConfig | None = None,
        progress: bool = True,
    ) -> None:
        self.seed = seed
        self.cache = cache
        self.models = dict(models or {})
        self.default_model = default_model
        self.progress = progress
        self.io = ModelIO()
        """How batches reach reference models (the curriculum sets its own convention)."""
        self.computed = 0
        """How many score arrays were computed rather than read from the cache."""

    def scores(
        self, dataset: Any, cfg: DifficultyConfig, *, identity: str, field: str
    ) -> np.ndarray:
        key = hashlib.sha256(
            (
                dataset_fingerprint(dataset, identity)
                + scorer_fingerprint(cfg, self.seed, self.models)
            ).encode()
        ).hexdigest()[:32]
        cached = self.cache.get(key, expected=len(dataset))
        if cached is not None:
            return cached
        scores = self._compute(dataset, cfg, field)
        if len(scores) != len(dataset):
            raise DataError(
                f"{field}: the scorer returned {len(scores)} scores for {len(dataset)} samples"
            )
        if not np.all(np.isfinite(scores)):
            raise DataError(f"{field}: the scorer produced NaN or infinite scores")
        self.computed += 1
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        self.cache.put(key, scores)
        return scores

    def _model(self, spec: ModelConfig | str | None, field: str) -> torch.nn.Module:
        if isinstance(spec, str):
            name = spec.removeprefix("@")
            if name not in self.models:
                raise ConfigError(f"{field}: no reference model named {name!r} was given")
            return self.models[name]
        assert spec is not None
        return build_model(spec, seed=self.seed, field=field)

    def _compute(self, dataset: Any, cfg: DifficultyConfig, field: str) -> np.ndarray:
        if cfg.scorer == "file":
            assert cfg.path is not None
            return read_scores_file(cfg.path, len(dataset), field=f"{field}.path")
        if cfg.scorer == "length":
            return score_by_length(
                dataset, pad_id=cfg.pad_id, batch_size=cfg.batch_size, progress=self.progress
            )
        if cfg.scorer in ("loss", "confidence"):
            model = self._model(cfg.model, f"{field}.model")
            return score_with_model(
                model,
                dataset,
                kind=cfg.scorer,
                batch_size=cfg.batch_size,
                progress=self.progress,
                io=self.io,
            )
        if cfg.scorer == "callable":
            assert cfg.fn is not None
            fn = import_path(cfg.fn, field=f"{field}.fn")
            out = np.empty(len(dataset), dtype=np.float64)
            with torch.no_grad():
                for start in _batches(len(dataset), cfg.batch_size, "scoring", self.progress):
                    batch = fetch(
                        dataset,
                        np.arange(start, min(start + cfg.batch_size, len(dataset))),
                        self.io.fmt,
                    )
                    # Pairs are passed as (inputs, targets); other batches whole.
                    pair = isinstance(batch, tuple | list) and len(batch) == 2
                    result = fn(*batch) if pair else fn(batch)
                    values = torch.as_tensor(result).reshape(-1)
                    out[start : start + len(values)] = values.double().cpu().numpy()
            return out
        # self_taught
        spec = cfg.model if cfg.model is not None else self.default_model
        if spec is None:
            raise ConfigError(f"{field}.model: self_taught needs a model (or a curriculum 'model')")
        if isinstance(spec, str):
            raise ConfigError(
                f"{field}.model: self_taught trains fresh models; give a model config"
            )
        return score_self_taught(
            dataset,
            cfg,
            lambda s: build_model(
                spec.model_copy(update={"weights": None}), seed=s, field=f"{field}.model"
            ),
            seed=self.seed,
            progress=self.progress,
            io=self.io,
        )


def select_indices(scores: np.ndarray, select: SelectConfig) -> np.ndarray:
    """Indices (ascending) of the samples a :class:`SelectConfig` keeps.

    ``easiest``/``hardest`` and ``quantiles`` rank by score (ties broken by index, so
    the result is deterministic); ``scores`` keeps low <= score <= high.
    """
    n = len(scores)
    order = np.argsort(scores, kind="stable")
    if select.easiest is not None:
        chosen = order[: max(1, round(select.easiest * n))]
    elif select.hardest is not None:
        chosen = order[n - max(1, round(select.hardest * n)) :]
    elif select.quantiles is not None:
        low, high = select.quantiles
        chosen = order[round(low * n) : round(high * n)]
    else:
        assert select.scores is not None
        low_s, high_s = select.scores
        chosen = np.flatnonzero((scores >= low_s) & (scores <= high_s))
    if len(chosen) == 0:
        raise DataError(f"select {select.model_dump(exclude_none=True)} keeps no sample")
    return np.sort(chosen)

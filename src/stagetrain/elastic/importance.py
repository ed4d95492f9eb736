"""Importance ranking and the permutation that makes every budget a prefix.

Width (Minitron / Nemotron Elastic), on calibration data through the masking hooks:

- embedding channels: the mean absolute output of every norm, summed over the norms;
- attention heads: the mean L2 norm of each head's attention output;
- MLP neurons: the mean absolute *pre-activation* (``neurons="pre-activation"``, as
  the paper): the output of the first MLP projection, summed over gate and up for
  SwiGLU so a gate/up pair is ranked as one neuron. ``"post-activation"`` (the down
  projection's input) is available by name, for comparison.

Depth: the normalised MSE of the logits with layers removed,
``sum((M_full - M_-S)^2) / sum(M_full^2)``. ``depth="iterative"`` (default) removes the
least important layer, re-scores the remaining ones with it removed, and repeats, so
the ranking accounts for layers that matter only together; ``"one-shot"`` scores each
layer removed alone.

The weights are then permuted so the most important channels, heads and neurons come
first — a function-preserving change through :func:`~stagetrain.elastic.family.take`
(heads within their key/value group under grouped-query attention) — after which
"keep the top c" is "keep the first c".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from stagetrain.elastic.core import ElasticHost
from stagetrain.elastic.family import Selection, descending, head_order, take
from stagetrain.elastic.masking import Recorder
from stagetrain.errors import ConfigError

DepthMethod = Literal["iterative", "one-shot"]
NeuronMethod = Literal["pre-activation", "post-activation"]


@dataclass
class Importance:
    """Scores (higher = more important) gathered on calibration data."""

    channels: torch.Tensor
    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    """The neuron scores used for ranking (per ``neurons_by``)."""
    pre_activation: list[torch.Tensor]
    post_activation: list[torch.Tensor]
    layers: torch.Tensor
    """Normalised logit MSE of each layer's removal (iterative: at the round it went)."""
    layer_order: list[int]
    """Layers from the most to the least important."""
    depth: str = "iterative"
    neurons_by: str = "pre-activation"
    batches: int = 0
    notes: list[str] = field(default_factory=list)


def _token_weights(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, dict) and batch.get("attention_mask") is not None:
        return batch["attention_mask"]
    return None


# Full-model logits of the calibration batches are kept between removal rounds up to
# this many elements (64 MiB of float64); beyond, each round recomputes them.
CACHE_LOGITS = 1 << 23


@torch.no_grad()
def _depth_errors(
    host: ElasticHost,
    batches: list[Any],
    removed: list[int],
    candidates: list[int],
    cache: dict[int, torch.Tensor],
) -> torch.Tensor:
    """Normalised logit MSE of removing ``removed + [j]`` for every candidate ``j``."""
    error = torch.zeros(len(candidates), dtype=torch.float64)
    norm = torch.zeros((), dtype=torch.float64)
    for k, batch in enumerate(batches):
        full = cache.get(k)
        if full is None:
            full = host.plain_logits(batch).double()
            if sum(t.numel() for t in cache.values()) + full.numel() <= CACHE_LOGITS:
                cache[k] = full
        norm += full.pow(2).sum()
        for i, j in enumerate(candidates):
            with host.hooks.apply(skip=(*removed, j)):
                without = host.plain_logits(batch).double()
            error[i] += (full - without).pow(2).sum()
    return error / norm


@torch.no_grad()
def score(
    host: ElasticHost,
    batches: Iterable[Any],
    *,
    depth: DepthMethod = "iterative",
    neurons: NeuronMethod = "pre-activation",
) -> Importance:
    """Importance of every channel, head, neuron and layer of ``host``'s full model."""
    if depth not in ("iterative", "one-shot"):
        raise ConfigError(f"importance.depth: 'iterative' or 'one-shot', got {depth!r}")
    if neurons not in ("pre-activation", "post-activation"):
        raise ConfigError(
            f"importance.neurons: 'pre-activation' or 'post-activation', got {neurons!r}"
        )
    batches = list(batches)
    if not batches:
        raise ConfigError("importance: no calibration batches")
    root = host.root
    was_training = root.training
    root.eval()
    layers = host.family.sizes.layers
    recorder = Recorder(layers)
    for batch in batches:
        recorder.token_weights = _token_weights(batch)
        with host.hooks.apply(recorder=recorder):
            host.plain_logits(batch)
    count = len(batches)

    def averaged(values: list[torch.Tensor | None], what: str) -> list[torch.Tensor]:
        if any(v is None for v in values):
            raise ConfigError(f"importance: the model's {what} hooks saw no activations")
        return [(v / count).float() for v in values if v is not None]

    assert recorder.channels is not None
    pre = averaged(recorder.pre, "MLP pre-activation")
    post = averaged(recorder.post, "MLP down-projection")
    heads = averaged(recorder.heads, "attention output")

    scores = torch.zeros(layers)
    cache: dict[int, torch.Tensor] = {}
    if depth == "one-shot":
        errors = _depth_errors(host, batches, [], list(range(layers)), cache)
        scores = errors.float()
        order = descending(scores).tolist()
    else:
        removed: list[int] = []
        remaining = list(range(layers))
        while remaining:
            errors = _depth_errors(host, batches, removed, remaining, cache)
            least = remaining[int(errors.argmin())]
            scores[least] = float(errors.min())
            removed.append(least)
            remaining.remove(least)
        order = removed[::-1]
    root.train(was_training)
    return Importance(
        channels=(recorder.channels / count).float(),
        heads=heads,
        neurons=pre if neurons == "pre-activation" else post,
        pre_activation=pre,
        post_activation=post,
        layers=scores,
        layer_order=order,
        depth=depth,
        neurons_by=neurons,
        batches=count,
    )


@torch.no_grad()
def permute(host: ElasticHost, importance: Importance) -> None:
    """Reorder ``host``'s weights so that the most important channels, heads and neurons
    come first (function-preserving), and record the layer ranking in ``layer_rank``."""
    family = host.family
    sizes = family.sizes
    head_orders = [head_order(h, sizes) for h in importance.heads]
    selection = Selection(
        channels=descending(importance.channels),
        layers=list(range(sizes.layers)),
        heads=[q for q, _ in head_orders],
        kv_heads=[kv for _, kv in head_orders],
        neurons=[descending(n) for n in importance.neurons],
    )
    root = host.root
    state = take(
        root.state_dict(), selection, family.rules, sizes,
        prefix=family.prefix, exclude=family.exclude,
    )  # fmt: skip
    missing, unexpected = root.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(family.exclude) for k in missing), (
        missing,
        unexpected,
    )
    rank = torch.empty(sizes.layers, dtype=torch.long)
    rank[torch.tensor(importance.layer_order)] = torch.arange(sizes.layers)
    host.layer_rank.copy_(rank)


def rank_and_permute(
    host: ElasticHost,
    batches: Iterable[Any],
    *,
    depth: DepthMethod = "iterative",
    neurons: NeuronMethod = "pre-activation",
) -> Importance:
    """Score ``host`` on ``batches`` (token-id tensors, or dicts with ``input_ids`` and
    optionally ``attention_mask``), permute it in place so that every prefix holds the
    most important components, and record the layer ranking in ``layer_rank``."""
    importance = score(host, batches, depth=depth, neurons=neurons)
    permute(host, importance)
    return importance

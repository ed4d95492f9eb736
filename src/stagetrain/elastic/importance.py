"""Importance ranking and the permutation that makes every budget a prefix.

Width (as in Minitron / Nemotron Elastic): on calibration data, the mean absolute
activation of each embedding channel (summed over the embedding output and every
LayerNorm output), the mean L2 norm of each attention head's output, and the mean
absolute activation of each MLP neuron. Depth: the normalised MSE of the logits with a
layer removed, ``sum((M_full - M_-j)^2) / sum(M_full^2)``.

The weights are then permuted so the most important channels, heads and neurons come
first: a function-preserving change (the full model's outputs are unchanged), after
which "keep the top c" is "keep the first c".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from stagetrain.elastic.model import ElasticBlock, ElasticGPT


@dataclass
class Importance:
    """Scores (higher = more important) gathered on calibration data."""

    channels: torch.Tensor
    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layers: torch.Tensor
    batches: int = 0
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def score(model: ElasticGPT, batches: Iterable[torch.Tensor]) -> Importance:
    """Importance of every channel, head, neuron and layer of a plain ``model``."""
    was_training = model.training
    model.eval()
    layers = len(model.blocks)
    channels: torch.Tensor | None = None
    heads: list[torch.Tensor] = []
    neurons: list[torch.Tensor] = []
    error = torch.zeros(layers, dtype=torch.float64)
    norm = torch.zeros((), dtype=torch.float64)
    count = 0
    for tokens in batches:
        stats: dict[str, list[torch.Tensor]] = {"ln": [], "heads": [], "neurons": []}
        logits = model(tokens, stats=stats)
        batch_channels = sum(h.abs().mean(dim=(0, 1)) for h in stats["ln"])
        assert isinstance(batch_channels, torch.Tensor)
        channels = batch_channels if channels is None else channels + batch_channels
        heads = (
            stats["heads"]
            if not heads
            else [a + b for a, b in zip(heads, stats["heads"], strict=True)]
        )
        neurons = (
            stats["neurons"]
            if not neurons
            else [a + b for a, b in zip(neurons, stats["neurons"], strict=True)]
        )
        for j in range(layers):
            without = model(tokens, skip=(j,))
            error[j] += (logits - without).double().pow(2).sum()
        norm += logits.double().pow(2).sum()
        count += 1
    if channels is None:
        raise ValueError("importance: no calibration batches")
    model.train(was_training)
    return Importance(
        channels=channels / count,
        heads=[h / count for h in heads],
        neurons=[n / count for n in neurons],
        layers=(error / norm).float(),
        batches=count,
    )


def _descending(scores: torch.Tensor) -> torch.Tensor:
    # A stable sort, so ties keep their original order (deterministic permutations).
    return torch.sort(scores, descending=True, stable=True).indices


@torch.no_grad()
def permute_channels(model: ElasticGPT, order: torch.Tensor) -> None:
    """Reorder the residual-stream channels of every tensor that touches them."""
    model.tokens.weight.copy_(model.tokens.weight[:, order])
    model.positions.weight.copy_(model.positions.weight[:, order])
    for block in model.blocks:
        assert isinstance(block, ElasticBlock)
        for norm in (block.ln1, block.ln2):
            norm.weight.copy_(norm.weight[order])
            norm.bias.copy_(norm.bias[order])
        block.qkv.weight.copy_(block.qkv.weight[:, order])
        block.fc1.weight.copy_(block.fc1.weight[:, order])
        for linear in (block.proj, block.fc2):
            linear.weight.copy_(linear.weight[order, :])
            linear.bias.copy_(linear.bias[order])
    model.ln.weight.copy_(model.ln.weight[order])
    model.ln.bias.copy_(model.ln.bias[order])
    model.head.weight.copy_(model.head.weight[:, order])


def head_rows(block: ElasticBlock, heads: torch.Tensor) -> torch.Tensor:
    """Rows of ``qkv`` (q, then k, then v) belonging to ``heads``, in that order."""
    inner = block.heads * block.head_dim
    within = (heads[:, None] * block.head_dim + torch.arange(block.head_dim)).reshape(-1)
    return torch.cat([part * inner + within for part in range(3)])


def head_columns(block: ElasticBlock, heads: torch.Tensor) -> torch.Tensor:
    """Columns of ``proj`` belonging to ``heads``, in that order."""
    return (heads[:, None] * block.head_dim + torch.arange(block.head_dim)).reshape(-1)


@torch.no_grad()
def permute_heads(block: ElasticBlock, order: torch.Tensor) -> None:
    rows = head_rows(block, order)
    block.qkv.weight.copy_(block.qkv.weight[rows])
    block.qkv.bias.copy_(block.qkv.bias[rows])
    block.proj.weight.copy_(block.proj.weight[:, head_columns(block, order)])


@torch.no_grad()
def permute_neurons(block: ElasticBlock, order: torch.Tensor) -> None:
    block.fc1.weight.copy_(block.fc1.weight[order])
    block.fc1.bias.copy_(block.fc1.bias[order])
    block.fc2.weight.copy_(block.fc2.weight[:, order])


@torch.no_grad()
def rank_and_permute(model: ElasticGPT, batches: Iterable[torch.Tensor]) -> Importance:
    """Score ``model`` on ``batches``, permute it in place so that every prefix holds the
    most important components, and record the layer ranking in ``model.layer_rank``."""
    importance = score(model, batches)
    permute_channels(model, _descending(importance.channels))
    for block, heads, neurons in zip(
        model.blocks, importance.heads, importance.neurons, strict=True
    ):
        assert isinstance(block, ElasticBlock)
        permute_heads(block, _descending(heads))
        permute_neurons(block, _descending(neurons))
    ranking = _descending(importance.layers)  # most important layer first
    rank = torch.empty_like(ranking)
    rank[ranking] = torch.arange(len(ranking))
    model.layer_rank.copy_(rank)
    return importance

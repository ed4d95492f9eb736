"""Zero-shot extraction: a really smaller model for one budget, sliced from the parent.

The router (in evaluation mode) picks the budget's sizes; the kept channels, heads and
neurons are prefixes (after :func:`~stagetrain.elastic.importance.rank_and_permute`) and
the kept layers are the most important ones, in their original order. Slicing the
tensors gives a plain :class:`~stagetrain.elastic.model.ElasticGPT` whose forward pass
equals the parent's masked forward pass for that budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stagetrain.checkpoint import atomic_write, atomic_write_text
from stagetrain.elastic.importance import head_columns, head_rows
from stagetrain.elastic.model import ElasticBlock, ElasticGPT
from stagetrain.errors import ConfigError


def extract(parent: ElasticGPT, budget: str) -> tuple[ElasticGPT, dict[str, Any]]:
    """The standalone model for ``budget`` and the factory arguments that rebuild it."""
    if parent.router is None:
        raise ConfigError("extract: the model has no budgets (it is not an elastic parent)")
    try:
        sizes = parent.router.configuration(budget)
    except KeyError as exc:
        raise ConfigError(f"extract: --budget: {exc.args[0]}") from None
    width, n_heads, ffn, depth = sizes["width"], sizes["heads"], sizes["ffn"], sizes["depth"]
    kept_layers = [i for i in range(len(parent.blocks)) if int(parent.layer_rank[i]) < depth]
    args: dict[str, Any] = dict(parent.arch, width=width, heads=n_heads, ffn=ffn, layers=depth)
    child = ElasticGPT(**args)
    heads = torch.arange(n_heads)
    with torch.no_grad():
        child.tokens.weight.copy_(parent.tokens.weight[:, :width])
        child.positions.weight.copy_(parent.positions.weight[:, :width])
        for target, index in zip(child.blocks, kept_layers, strict=True):
            source = parent.blocks[index]
            assert isinstance(source, ElasticBlock) and isinstance(target, ElasticBlock)
            for name in ("ln1", "ln2"):
                getattr(target, name).weight.copy_(getattr(source, name).weight[:width])
                getattr(target, name).bias.copy_(getattr(source, name).bias[:width])
            rows = head_rows(source, heads)
            target.qkv.weight.copy_(source.qkv.weight[rows, :width])
            target.qkv.bias.copy_(source.qkv.bias[rows])
            target.proj.weight.copy_(source.proj.weight[:width, head_columns(source, heads)])
            target.proj.bias.copy_(source.proj.bias[:width])
            target.fc1.weight.copy_(source.fc1.weight[:ffn, :width])
            target.fc1.bias.copy_(source.fc1.bias[:ffn])
            target.fc2.weight.copy_(source.fc2.weight[:width, :ffn])
            target.fc2.bias.copy_(source.fc2.bias[:width])
        child.ln.weight.copy_(parent.ln.weight[:width])
        child.ln.bias.copy_(parent.ln.bias[:width])
        child.head.weight.copy_(parent.head.weight[:, :width])
        child.head.bias.copy_(parent.head.bias)
    child.train(parent.training)
    return child, args


def save_extracted(model: ElasticGPT, args: dict[str, Any], out: str | Path) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (a model config that rebuilds it:
    ``{"builtin": "elastic_gpt", "args": ..., "weights": ...}``) into ``out``."""
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save(state)
    atomic_write(weights, lambda f: f.write(data))
    config = {"builtin": "elastic_gpt", "args": args, "weights": str(weights.resolve())}
    atomic_write_text(out / "model.json", json.dumps(config, indent=2) + "\n")
    return weights

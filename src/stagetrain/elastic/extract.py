"""Zero-shot extraction: a really smaller model for one budget, sliced from the parent.

The router (in evaluation mode) picks the budget's sizes; the kept channels, heads and
neurons are prefixes (after :func:`~stagetrain.elastic.importance.rank_and_permute`) and
the kept layers are the most important ones, in their original order. Slicing the
tensors gives a plain :class:`~stagetrain.elastic.model.ElasticGPT` whose forward pass
equals the parent's masked forward pass for that budget.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    return slice_model(parent, sizes)


def slice_model(parent: ElasticGPT, sizes: dict[str, int]) -> tuple[ElasticGPT, dict[str, Any]]:
    """A plain model keeping the first ``width`` channels, ``heads`` heads and ``ffn``
    neurons and the ``depth`` most important layers of ``parent`` (ranked and permuted)."""
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


@dataclass
class ExtractionReport:
    """What :func:`extract_run` wrote and how well it matches the parent."""

    budget: str
    sizes: dict[str, Any]
    params: int
    full_params: int
    target: float
    max_abs_diff: float
    weights: Path

    @property
    def fraction(self) -> float:
        return self.params / self.full_params

    @property
    def off_target(self) -> float:
        """Relative miss of the parameter count: ``fraction / target - 1``."""
        return self.fraction / self.target - 1

    def lines(self) -> list[str]:
        return [
            f"budget {self.budget!r}: width {self.sizes['width']}, heads {self.sizes['heads']}, "
            f"ffn {self.sizes['ffn']}, layers {self.sizes['layers']}",
            f"parameters {self.params:,} = {self.fraction:.3f} of the full {self.full_params:,} "
            f"(target {self.target:.3f}; {self.off_target:+.1%} off)",
            f"max |extracted - masked parent| on check batches: {self.max_abs_diff:.2e}",
            f"wrote {self.weights} and {self.weights.with_name('model.json')}",
        ]


def extract_run(
    run_dir: str | Path, budget: str, out: str | Path, *, check_batches: int = 4, seed: int = 0
) -> ExtractionReport:
    """Extract ``budget`` from the newest checkpoint of an elastic run, save it, and check
    it against the masked parent on random token batches."""
    from stagetrain.config import load_config
    from stagetrain.registry import build_model, load_weights

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_config(config_path)
    if config.model is None:
        raise ConfigError(f"{config_path}: model: the run declares no model")
    parent = build_model(config.model, seed=config.seed)
    if not isinstance(parent, ElasticGPT):
        raise ConfigError(f"{config_path}: model: not an ElasticGPT (cannot extract budgets)")
    parent.load_state_dict(load_weights(str(run_dir), field="run_dir"))
    parent.eval()
    child, args = extract(parent, budget)
    child.eval()
    assert parent.router is not None
    index = parent.router.index(budget)
    generator = torch.Generator().manual_seed(seed)
    diff = 0.0
    with torch.no_grad():
        for _ in range(check_batches):
            tokens = torch.randint(0, parent.vocab, (4, parent.context), generator=generator)
            masked = parent(tokens + parent.vocab * index)
            diff = max(diff, float((child(tokens) - masked).abs().max()))
    weights = save_extracted(child, args, out)
    return ExtractionReport(
        budget=budget,
        sizes=args,
        params=sum(p.numel() for p in child.parameters()),
        full_params=parent.full_params,
        target=parent.router.budgets[index].target,
        max_abs_diff=diff,
        weights=weights,
    )

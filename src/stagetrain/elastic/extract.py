"""Zero-shot extraction: a really smaller model for one budget, sliced from the parent.

The router (in evaluation mode) picks the budget's sizes; the kept channels, heads and
neurons are prefixes (after :func:`~stagetrain.elastic.importance.rank_and_permute`)
and the kept layers are the most important ones, in their original order. Slicing the
state dict through the family's rules (:func:`~stagetrain.elastic.family.take`) gives a
model of the family whose forward pass equals the parent's masked forward pass.

Two formats (``stagetrain extract --format``):

- ``stagetrain`` (default): ``model.safetensors`` and ``model.json``, a model config
  ``{"builtin", "args", "weights": "model.safetensors"}`` plus the layout (family,
  budget, kept layers and sizes, parameter counts). The weights path is relative to
  the folder, so the folder can move; :func:`load_extracted` (or ``model: {builtin:
  extracted, args: {path: DIR}}``) loads it. Every configuration can be written.
- ``hf``: a Hugging Face directory (``config.json`` of the family's own config class,
  ``model.safetensors``) that ``AutoModelForCausalLM.from_pretrained`` loads, plus the
  tokenizer files when the run has them. Only where the family's config can hold the
  shapes; otherwise a one-line error names the constraint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from stagetrain.checkpoint import atomic_write, atomic_write_text
from stagetrain.elastic.core import ElasticHost
from stagetrain.elastic.family import LayerSize, Selection, kept_heads, take
from stagetrain.errors import ConfigError

Format = Literal["stagetrain", "hf"]
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja",
)  # fmt: skip


@dataclass
class Child:
    """An extracted model and how it was cut."""

    model: nn.Module
    spec: dict[str, Any]
    """``{"builtin", "args"}`` that rebuild a blank copy of ``model``."""
    width: int
    layers: list[int]
    """Parent layers kept, in order."""
    sizes: list[LayerSize]
    config: dict[str, int] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def layout(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "layers": self.layers,
            "heads": [s.heads for s in self.sizes],
            "ffn": [s.ffn for s in self.sizes],
        }


def _router(host: ElasticHost) -> Any:
    if host.router is None or host.space is None:
        raise ConfigError("extract: the model has no budgets (it is not an elastic parent)")
    return host.router


def extract(host: ElasticHost, budget: str) -> Child:
    """The standalone model for ``budget`` (its router's evaluation-mode choice)."""
    router = _router(host)
    try:
        config = router.configuration(budget)
    except KeyError as exc:
        raise ConfigError(f"extract: --budget: {exc.args[0]}") from None
    return slice_model(host, config)


def slice_model(host: ElasticHost, config: dict[str, int]) -> Child:
    """The model keeping ``config``'s sizes (``{axis: size}``: ``width``, ``depth`` and
    ``heads``/``ffn`` or their per-layer ``heads_<l>``/``ffn_<l>``) of a ranked ``host``."""
    family = host.family
    sizes = family.sizes
    layer_rank = host.layer_rank.cpu()
    kept = [i for i in range(sizes.layers) if int(layer_rank[i]) < config["depth"]]
    per_layer = []
    for i in kept:
        heads = config.get(f"heads_{i}", config.get("heads"))
        ffn = config.get(f"ffn_{i}", config.get("ffn"))
        if heads is None or ffn is None:
            raise ConfigError(f"extract: the configuration has no heads/ffn for layer {i}")
        per_layer.append(LayerSize(int(heads), int(ffn)))
    width = int(config["width"])
    heads_kept = [kept_heads(s.heads, sizes) for s in per_layer]
    selection = Selection(
        channels=torch.arange(width),
        layers=kept,
        heads=[q for q, _ in heads_kept],
        kv_heads=[kv for _, kv in heads_kept],
        neurons=[torch.arange(s.ffn) for s in per_layer],
    )
    state = take(
        host.root.state_dict(), selection, family.rules, sizes,
        prefix=family.prefix, exclude=family.exclude,
    )  # fmt: skip
    child = family.build_child(width, per_layer)
    missing, unexpected = child.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(family.exclude) for k in missing):
        raise ConfigError(f"extract: the slices do not fit the child ({missing}, {unexpected})")
    child.train(host.root.training)
    return Child(
        model=child,
        spec=family.child_spec(width, per_layer),
        width=width,
        layers=kept,
        sizes=per_layer,
        config=dict(config),
    )


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights share storage, which safetensors refuses: save each key's own copy.
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_extracted(
    child: Child, out: str | Path, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the stagetrain format (see the module docstring) into ``out``."""
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    data = save(_state(child.model))
    atomic_write(weights, lambda f: f.write(data))
    config = {
        "format": "stagetrain",
        **child.spec,
        "weights": weights.name,
        "layout": child.layout(),
        **(metadata or {}),
    }
    atomic_write_text(out / "model.json", json.dumps(config, indent=2) + "\n")
    return weights


def save_hf(
    child: Child,
    family: Any,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face directory for ``child`` into ``out`` (see the module docstring);
    raises :class:`ConfigError` when the family's config cannot hold its shapes."""
    from transformers import AutoModelForCausalLM

    hf_config = family.hf_config(child.width, child.sizes)
    model = AutoModelForCausalLM.from_config(hf_config)
    model.load_state_dict(child.model.state_dict())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copied = copy_tokenizer(tokenizer, out) if tokenizer is not None else []
    config = {
        "format": "hf",
        "family": family.name,
        "layout": child.layout(),
        "tokenizer_files": copied,
        **(metadata or {}),
    }
    atomic_write_text(out / "model.json", json.dumps(config, indent=2) + "\n")
    return out / "model.safetensors"


def copy_tokenizer(source: str | Path, out: Path) -> list[str]:
    """Tokenizer files of ``source`` (a directory, or ``"bytes"`` for the byte-level
    tokenizer of the stdlib text recipes) written into ``out``; their names."""
    if str(source) == "bytes":
        byte_tokenizer().save_pretrained(out)
        return sorted(n for n in TOKENIZER_FILES if (out / n).exists())
    directory = Path(source)
    if not directory.is_dir():
        raise ConfigError(f"tokenizer: {str(source)!r} is not a directory (or 'bytes')")
    copied = []
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            shutil.copy2(directory / name, out / name)
            copied.append(name)
    return copied


def byte_tokenizer() -> Any:
    """A fast tokenizer whose token ids are the UTF-8 bytes of the text (ids 0-255), as
    in :mod:`stagetrain.recipes.pystdlib`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def load_extracted(path: str | Path) -> nn.Module:
    """The model an extraction wrote into ``path`` (either format), in evaluation mode."""
    from stagetrain.registry import BUILTIN_MODELS, call_factory, load_weights, resolve_factory

    folder = Path(path)
    spec_file = folder / "model.json"
    if not spec_file.is_file():
        raise ConfigError(f"{folder}: no model.json (not a folder written by stagetrain extract)")
    spec = json.loads(spec_file.read_text())
    if spec.get("format") == "hf":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    factory = resolve_factory(
        builtin=spec.get("builtin"), factory=spec.get("factory"), table=BUILTIN_MODELS,
        field=f"{spec_file}: builtin", kind="model",
    )  # fmt: skip
    model = call_factory(factory, spec.get("args", {}), error=ConfigError, what=str(spec_file))
    model.load_state_dict(load_weights(str(folder / spec["weights"]), field=str(spec_file)))
    return model.eval()


def extracted(*, path: str) -> nn.Module:
    """Factory for configs (``model: {builtin: extracted, args: {path: DIR}}``)."""
    return load_extracted(path)

"""What the elastic machinery needs to know about one model family.

A *family* describes a decoder-only transformer without owning its code:

- :class:`Sizes`: the full sizes (residual width, query and key/value heads, head size,
  MLP neurons, layers) read from the model's config;
- :class:`Layout`: the modules the masking hooks attach to (embeddings, norms, the
  attention output projection whose input holds the heads, the MLP down projection
  whose input holds the neurons, the first MLP projections whose outputs are the
  pre-activations, the decoder layers);
- :class:`Rule` s: for every parameter, which of its dimensions index residual
  channels, query heads, key/value heads, fused q/k/v heads or MLP neurons. One
  function, :func:`take`, applies a :class:`Selection` to a state dict through these
  rules: with full-length orders it is the function-preserving permutation, with
  prefixes it slices out a smaller model (extraction);
- the parameter count of a configuration, from the config (the router's cost);
- how to build a blank model of given sizes (the extracted child) and, where the
  family's own config class can hold the shapes, the Hugging Face config of it.

Heads. With grouped-query attention (fewer key/value heads than query heads) the heads
are pruned per key/value group: every group keeps its best ``h / kv_heads`` query
heads and all key/value heads stay, so the child is again a valid GQA layout. With
one key/value head per query head (multi-head attention) a head is pruned with its
key and value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from stagetrain.errors import ConfigError

Dim = Literal["channels", "q", "kv", "qkv", "neurons"] | None


@dataclass(frozen=True)
class Sizes:
    """Full sizes of a decoder-only transformer."""

    width: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int

    @property
    def grouped(self) -> bool:
        """Grouped-query attention: several query heads share one key/value head."""
        return self.kv_heads < self.heads

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class LayerSize:
    """Kept sizes of one layer of a child: query heads and MLP neurons."""

    heads: int
    ffn: int


@dataclass
class LayerSlots:
    """Hook points of one decoder layer."""

    block: nn.Module
    """The layer: gated per sample (depth)."""
    norms: list[nn.Module]
    """Norms whose output feeds attention / the MLP (statistics over kept channels)."""
    head_input: nn.Module
    """Attention output projection: its input is ``(..., heads * head_dim)``, head-major."""
    neuron_input: nn.Module
    """MLP down projection: its input is ``(..., ffn)`` (post-activation)."""
    pre_activation: list[nn.Module]
    """First MLP projections: their outputs are the neurons' pre-activations."""
    residual_outputs: list[nn.Module]
    """Modules whose output is added to the residual stream."""


@dataclass
class Layout:
    """Hook points of a whole model."""

    embeddings: list[nn.Module]
    final_norm: nn.Module
    layers: list[LayerSlots]
    norm: Literal["rms", "layer"]


@dataclass(frozen=True)
class Rule:
    """Parameters whose name matches ``pattern`` (``{l}`` = layer index) have ``dims``."""

    pattern: str
    dims: tuple[Dim, ...]
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.escape(self.pattern).replace(re.escape("{l}"), r"(?P<layer>\d+)")
        object.__setattr__(self, "_regex", re.compile(regex + r"\Z"))

    def match(self, name: str) -> re.Match[str] | None:
        return self._regex.match(name)


@dataclass
class Selection:
    """Components to take, in order: full-length orders permute, prefixes slice.

    ``layers`` are parent layer indices in the child's order; ``heads``, ``kv_heads`` and
    ``neurons`` hold one index tensor per *child* layer.
    """

    channels: torch.Tensor
    layers: list[int]
    heads: list[torch.Tensor]
    kv_heads: list[torch.Tensor]
    neurons: list[torch.Tensor]


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows (or columns) of a head-major projection that belong to ``heads``, in order."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _rows(dim: Dim, selection: Selection, layer: int | None, sizes: Sizes) -> torch.Tensor | None:
    if dim is None:
        return None
    if dim == "channels":
        return selection.channels
    assert layer is not None, f"a per-layer dimension {dim!r} outside a layer"
    if dim == "neurons":
        return selection.neurons[layer]
    if dim == "q":
        return head_rows(selection.heads[layer], sizes.head_dim)
    if dim == "kv":
        return head_rows(selection.kv_heads[layer], sizes.head_dim)
    # Fused q, k, v (multi-head attention): three blocks of heads * head_dim rows.
    rows = head_rows(selection.heads[layer], sizes.head_dim)
    inner = sizes.heads * sizes.head_dim
    return torch.cat([part * inner + rows for part in range(3)])


def take(
    state: dict[str, torch.Tensor],
    selection: Selection,
    rules: Sequence[Rule],
    sizes: Sizes,
    *,
    prefix: str = "",
    exclude: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """``state`` indexed by ``selection`` through ``rules``; layers renumbered.

    Keys outside ``prefix`` or starting with one of ``exclude`` are left out; any other
    key that no rule describes is an error (the family does not know that parameter, so
    it cannot be sliced safely).
    """
    position = {parent: child for child, parent in enumerate(selection.layers)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(prefix) or key.startswith(exclude):
            continue
        name = key[len(prefix) :]
        for rule in rules:
            found = rule.match(name)
            if found is not None:
                break
        else:
            raise ConfigError(f"elastic: parameter {key!r} is not described by the model family")
        layer: int | None = None
        if "layer" in found.groupdict():
            parent = int(found["layer"])
            if parent not in position:
                continue  # a layer the child does not keep
            layer = position[parent]
            name = rule.pattern.replace("{l}", str(layer))
        value = tensor
        for axis, dim in enumerate(rule.dims):
            rows = _rows(dim, selection, layer, sizes)
            if rows is not None:
                value = value.index_select(axis, rows.to(value.device))
        out[prefix + name] = value
    return out


def head_positions(sizes: Sizes) -> torch.Tensor:
    """Rank of every query head in the pruning order: keeping ``h`` heads keeps those of
    rank ``< h``. Grouped: rank ``j * kv_heads + g`` for head ``j`` of group ``g``, so
    every group loses heads evenly; multi-head: the head's index."""
    index = torch.arange(sizes.heads)
    if not sizes.grouped:
        return index
    return (index % sizes.group_size) * sizes.kv_heads + index // sizes.group_size


def head_order(scores: torch.Tensor, sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query head order, key/value head order)`` sorting heads by ``scores``,
    descending: within each key/value group when grouped (groups stay in place)."""
    if not sizes.grouped:
        order = descending(scores)
        return order, order
    r = sizes.group_size
    within = torch.stack([descending(group) for group in scores.view(sizes.kv_heads, r)])
    order = (torch.arange(sizes.kv_heads)[:, None] * r + within).reshape(-1)
    return order, torch.arange(sizes.kv_heads)


def kept_heads(count: int, sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query heads, key/value heads)`` a child with ``count`` heads keeps (ranked)."""
    if not sizes.grouped:
        kept = torch.arange(count)
        return kept, kept
    per_group = count // sizes.kv_heads
    r = sizes.group_size
    query = (torch.arange(sizes.kv_heads)[:, None] * r + torch.arange(per_group)).reshape(-1)
    return query, torch.arange(sizes.kv_heads)


def kv_heads_kept(count: int, sizes: Sizes) -> int:
    """Key/value heads of a layer with ``count`` query heads."""
    return sizes.kv_heads if sizes.grouped else count


def descending(scores: torch.Tensor) -> torch.Tensor:
    # A stable sort, so ties keep their original order (deterministic permutations).
    return torch.sort(scores, descending=True, stable=True).indices


def check_head_choices(choices: Sequence[int], sizes: Sizes, field: str) -> None:
    """Grouped attention prunes heads per group: every choice a multiple of the groups."""
    if sizes.grouped:
        bad = [c for c in choices if c % sizes.kv_heads]
        if bad:
            raise ConfigError(
                f"{field}: with {sizes.kv_heads} key/value heads, query heads are pruned "
                f"per key/value group, so every choice must be a multiple of "
                f"{sizes.kv_heads}; got {bad}"
            )


class Family(Protocol):
    """One model family (see the module docstring)."""

    name: str
    sizes: Sizes
    rules: tuple[Rule, ...]
    prefix: str
    """Prefix of the family's parameter names inside the module it describes."""
    exclude: tuple[str, ...]
    """State-dict keys (prefixes) that are not the model's weights (router, ranking)."""
    vocab: int
    max_length: int
    """Longest sequence the model takes (position embeddings)."""

    def layout(self, model: nn.Module) -> Layout:
        """Hook points of ``model`` (the module the family was made from)."""
        ...

    def base_params(self, width: Any) -> Any:
        """Parameters outside the layers (embeddings, final norm, output layer)."""
        ...

    def layer_params(self, width: Any, heads: Any, ffn: Any) -> Any:
        """Parameters of one layer of these sizes (ints or tensors)."""
        ...

    def build_child(self, width: int, layers: list[LayerSize]) -> nn.Module:
        """A blank model of these sizes (weights to be loaded)."""
        ...

    def child_spec(self, width: int, layers: list[LayerSize]) -> dict[str, Any]:
        """``{"builtin": ..., "args": ...}`` that rebuilds :meth:`build_child`'s model."""
        ...

    def hf_config(self, width: int, layers: list[LayerSize]) -> Any:
        """The family's own Hugging Face config for a child of these sizes; raises
        :class:`~stagetrain.errors.ConfigError` naming the constraint it cannot hold."""
        ...


def params_of(family: Family, width: Any, layers: Sequence[tuple[Any, Any, Any]]) -> Any:
    """Parameters of a configuration: ``layers`` = ``(kept, heads, ffn)`` per layer,
    ``kept`` 0/1 (ints or tensors, so the router can cost a whole grid at once)."""
    total = family.base_params(width)
    for kept, heads, ffn in layers:
        total = total + kept * family.layer_params(width, heads, ffn)
    return total


FamilyFactory = Callable[[nn.Module], Family]

"""The configuration space of an elastic model: its axes, their choices, their cost.

Axes: ``width`` (residual channels), ``depth`` (layers, the most important ones by
``layer_rank``), and ``heads`` / ``ffn`` (query heads and MLP neurons of every layer).
With ``heterogeneous=True`` every layer has its own ``heads_<l>`` and ``ffn_<l>`` axis
(same choices), so a budget may keep different sizes in different layers.

A choice ``c`` of an axis keeps the components of rank ``< c``: the first ``c``
channels or neurons (after :func:`~stagetrain.elastic.importance.rank_and_permute`
every prefix holds the most important ones), the heads of :func:`head_positions`
rank ``< c`` (per key/value group under grouped-query attention), the layers of
``layer_rank < c``.

The parameter count of a configuration comes from the family (from the model's
config): ``base(width) + sum over kept layers of layer(width, heads_l, ffn_l)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stagetrain.elastic.family import Family, check_head_choices, head_positions
from stagetrain.errors import ConfigError

KINDS = ("width", "heads", "ffn", "depth")


@dataclass(frozen=True)
class Axis:
    """One axis of the router: its name, kind, layer (per-layer axes) and choices."""

    name: str
    kind: str
    layer: int | None
    choices: tuple[int, ...]


class Space:
    """Axes, masks and parameter counts of an elastic model (see the module docstring).

    Args:
        family: the model family (sizes, parameter count).
        choices: per kind (``width``, ``heads``, ``ffn``, ``depth``) the sizes a budget may
            keep, ascending; each must end with the full size.
        heterogeneous: one ``heads`` and one ``ffn`` axis per layer.
    """

    def __init__(
        self, family: Family, choices: Mapping[str, Sequence[int]], *, heterogeneous: bool = False
    ) -> None:
        sizes = family.sizes
        full = {"width": sizes.width, "heads": sizes.heads, "ffn": sizes.ffn, "depth": sizes.layers}
        if set(choices) != set(KINDS):
            raise ConfigError(
                f"choices: needs exactly the axes {list(KINDS)}, got {sorted(choices)}"
            )
        for kind in KINDS:
            values = list(choices[kind])
            if not values or values != sorted(set(values)) or values[0] < 1:
                raise ConfigError(f"choices.{kind}: must be distinct positive sizes, ascending")
            if values[-1] != full[kind]:
                raise ConfigError(
                    f"choices.{kind}: the largest choice must be the full size {full[kind]}"
                )
        check_head_choices(choices["heads"], sizes, "choices.heads")
        self.family = family
        self.heterogeneous = heterogeneous
        self.choices = {kind: tuple(int(c) for c in choices[kind]) for kind in KINDS}
        axes = [Axis("width", "width", None, self.choices["width"])]
        if heterogeneous:
            for kind in ("heads", "ffn"):
                axes += [
                    Axis(f"{kind}_{i}", kind, i, self.choices[kind]) for i in range(sizes.layers)
                ]
        else:
            axes += [Axis(kind, kind, None, self.choices[kind]) for kind in ("heads", "ffn")]
        axes.append(Axis("depth", "depth", None, self.choices["depth"]))
        self.axes = axes
        self.head_positions = head_positions(sizes)

    @property
    def names(self) -> list[str]:
        return [axis.name for axis in self.axes]

    @property
    def full_params(self) -> int:
        """Parameters of the full model."""
        return int(self.params({axis.name: axis.choices[-1] for axis in self.axes}, None))

    def _layer_size(self, sizes: Mapping[str, Any], kind: str, layer: int) -> Any:
        return sizes[f"{kind}_{layer}"] if self.heterogeneous else sizes[kind]

    def params(self, sizes: Mapping[str, Any], layer_rank: torch.Tensor | None) -> Any:
        """Parameters of the configuration ``{axis name: size}`` (ints, or tensors that
        broadcast together: the router costs whole grids at once)."""
        family = self.family
        width, depth = sizes["width"], sizes["depth"]
        if not self.heterogeneous:
            return family.base_params(width) + depth * family.layer_params(
                width, sizes["heads"], sizes["ffn"]
            )
        rank = torch.arange(family.sizes.layers) if layer_rank is None else layer_rank.cpu()
        total = family.base_params(width)
        for layer in range(family.sizes.layers):
            kept = int(rank[layer]) < depth if isinstance(depth, int) else rank[layer] < depth
            if isinstance(kept, torch.Tensor):
                kept = kept.to(torch.get_default_dtype())
            total = total + kept * family.layer_params(
                width,
                self._layer_size(sizes, "heads", layer),
                self._layer_size(sizes, "ffn", layer),
            )
        return total

    def positions(self, axis: Axis, layer_rank: torch.Tensor) -> torch.Tensor:
        """Rank of every component of ``axis`` (kept by choice ``c`` when ``< c``)."""
        if axis.kind == "depth":
            return layer_rank
        if axis.kind == "heads":
            return self.head_positions.to(layer_rank.device)
        return torch.arange(axis.choices[-1], device=layer_rank.device)

    def keep_matrix(self, axis: Axis, layer_rank: torch.Tensor) -> torch.Tensor:
        """``(n_choices, size)``: 1 where choice ``c`` keeps component ``j``."""
        sizes = torch.tensor(axis.choices, device=layer_rank.device, dtype=torch.float32)
        positions = self.positions(axis, layer_rank).float()
        return (positions[None, :] < sizes[:, None]).float()

"""Batches of any structure: nests of tensors, and the few operations the loop needs.

A batch is whatever a data source yields, collated: a tensor, a tuple or list (an
``(inputs, targets)`` pair is the simple case), a mapping such as
``{"input_ids", "attention_mask", "labels"}``, or a dataclass — nested freely. The
loop never looks inside beyond what these functions do: move it to a device, count
and slice its samples (micro-batches, rank shards), reorder and concatenate it
(mixtures), cut or pad its sequences to a stage's ``seq_len``.

The batch dimension is the first dimension of every tensor. A *sequence* tensor is
one with at least two dimensions whose second dimension is the batch's sequence
length (the second dimension of its first integer tensor): token ids, attention
masks, labels, position ids. Float features (``[B, 50]`` bits, images) are never cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Batch = Any
"""A nest of tensors (tensor, tuple/list, mapping, dataclass) with the batch first."""


@dataclass(frozen=True)
class BatchFormat:
    """How a batch's parts are told apart and padded (the config's ``batch`` section).

    Attributes:
        pad_id: padding value of token ids.
        ignore_index: padding value of labels; losses and metrics skip it.
        label_keys: the keys of a mapping batch that hold targets.
    """

    pad_id: int = 0
    ignore_index: int = -100
    label_keys: tuple[str, ...] = ("labels",)

    def pad_value(self, path: str, *, label: bool) -> int:
        """Padding value of the leaf at ``path`` (``label``: the leaf is a target)."""
        if path.rsplit(".", 1)[-1] == "attention_mask":
            return 0
        return self.ignore_index if label else self.pad_id

    def label_paths(self, batch: Batch) -> set[str]:
        """Paths of the leaves of ``batch`` that are targets (see :func:`tree_map_with_path`).

        The last part of a top-level tuple or list of two or more parts, and the
        ``label_keys`` of a mapping or dataclass (at any depth, with everything under them).
        """
        out: set[str] = set()

        def visit(node: Any, path: str, label: bool) -> None:
            if isinstance(node, torch.Tensor):
                if label:
                    out.add(path)
            elif isinstance(node, Mapping):
                for k, v in node.items():
                    visit(v, f"{path}.{k}" if path else str(k), label or k in self.label_keys)
            elif dataclasses.is_dataclass(node) and not isinstance(node, type):
                for f in dataclasses.fields(node):
                    sub = f"{path}.{f.name}" if path else f.name
                    visit(getattr(node, f.name), sub, label or f.name in self.label_keys)
            elif isinstance(node, list | tuple):
                n = len(node)
                for i, v in enumerate(node):
                    visit(v, f"{path}[{i}]", label or (not path and n >= 2 and i == n - 1))

        visit(batch, "", False)
        return out


def tree_map(fn: Callable[[torch.Tensor], Any], batch: Batch, path: str = "") -> Batch:
    """Apply ``fn`` to every tensor of ``batch``, keeping the structure.

    ``fn`` receives the tensor; non-tensor leaves (strings, numbers) are kept as they are.
    """
    return tree_map_with_path(lambda _, t: fn(t), batch, path)


def tree_map_with_path(
    fn: Callable[[str, torch.Tensor], Any], batch: Batch, path: str = ""
) -> Batch:
    """Like :func:`tree_map`, with each tensor's path (``"labels"``, ``"[1]"``, ``"x.ids"``)."""
    if isinstance(batch, torch.Tensor):
        return fn(path, batch)
    if isinstance(batch, Mapping):
        return type(batch)(  # type: ignore[call-arg]
            {
                k: tree_map_with_path(fn, v, f"{path}.{k}" if path else str(k))
                for k, v in batch.items()
            }
        )
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        values = {
            f.name: tree_map_with_path(
                fn, getattr(batch, f.name), f"{path}.{f.name}" if path else f.name
            )
            for f in dataclasses.fields(batch)
        }
        return dataclasses.replace(batch, **values)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(
            *(tree_map_with_path(fn, v, f"{path}[{i}]") for i, v in enumerate(batch))
        )
    if isinstance(batch, list | tuple):
        return type(batch)(tree_map_with_path(fn, v, f"{path}[{i}]") for i, v in enumerate(batch))
    return batch


def leaves(batch: Batch) -> list[torch.Tensor]:
    """Every tensor of ``batch``, in a fixed order."""
    out: list[torch.Tensor] = []
    tree_map(out.append, batch)
    return out


def batch_size(batch: Batch) -> int:
    """Number of samples (the first dimension of the first tensor)."""
    tensors = leaves(batch)
    if not tensors:
        raise ValueError("a batch needs at least one tensor")
    return int(tensors[0].shape[0]) if tensors[0].dim() else 1


def to_device(batch: Batch, device: torch.device, *, non_blocking: bool = False) -> Batch:
    """``batch`` with every tensor on ``device``."""
    kind = type(batch)
    # Flat pairs and dicts of tensors (the common batches) without the general walk: this
    # runs every step, and a small model's step is a fraction of a millisecond.
    if kind is tuple and all(type(t) is torch.Tensor for t in batch):
        return tuple(t.to(device, non_blocking=non_blocking) for t in batch)
    if kind is dict and all(type(t) is torch.Tensor for t in batch.values()):
        return {k: t.to(device, non_blocking=non_blocking) for k, t in batch.items()}
    return tree_map(lambda t: t.to(device, non_blocking=non_blocking), batch)


def pin(batch: Batch) -> Batch:
    """``batch`` in page-locked memory (faster, asynchronous copies to a GPU)."""
    return tree_map(lambda t: t.pin_memory(), batch)


def select(batch: Batch, index: torch.Tensor | slice) -> Batch:
    """The samples ``index`` (a slice or an index tensor) of every tensor."""
    return tree_map(lambda t: t[index] if t.dim() else t, batch)


def split(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` cut into ``parts`` consecutive micro-batches of (nearly) equal size.

    Raises:
        ValueError: when the batch holds fewer samples than ``parts``.
    """
    n = batch_size(batch)
    if n < parts:
        raise ValueError(f"cannot split a batch of {n} samples into {parts} micro-batches")
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [select(batch, slice(bounds[i], bounds[i + 1])) for i in range(parts)]


def structure(batch: Batch) -> Any:
    """The shape of a nest without its tensors: types, keys and lengths (for comparisons)."""
    if isinstance(batch, torch.Tensor):
        return "tensor"
    if isinstance(batch, Mapping):
        return ("mapping", tuple((k, structure(v)) for k, v in batch.items()))
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = tuple(
            (f.name, structure(getattr(batch, f.name))) for f in dataclasses.fields(batch)
        )
        return (type(batch).__qualname__, fields)
    if isinstance(batch, list | tuple):
        return (type(batch).__name__, tuple(structure(v) for v in batch))
    return type(batch).__name__


def concat(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches of the same structure along the batch dimension."""
    if len(batches) == 1:
        return batches[0]
    shapes = {repr(structure(b)) for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"batches of different structure cannot be concatenated: {sorted(shapes)}")
    flat = [leaves(b) for b in batches]
    joined = iter([torch.cat([f[i] for f in flat]) for i in range(len(flat[0]))])
    return tree_map(lambda _: next(joined), batches[0])


def sequence_length(batch: Batch) -> int | None:
    """The batch's sequence length: dim 1 of its first integer tensor of >= 2 dims."""
    flat = type(batch) is tuple and all(type(t) is torch.Tensor for t in batch)
    # A flat pair (the common case, checked every step) is read without a tree walk.
    tensors: Sequence[torch.Tensor] = batch if flat else leaves(batch)
    for tensor in tensors:
        if tensor.dim() >= 2 and not torch.is_floating_point(tensor):
            return int(tensor.shape[1])
    return None


def fit_length(
    batch: Batch, length: int | None, *, fmt: BatchFormat | None = None, pad: bool = True
) -> Batch:
    """Cut (and, with ``pad``, pad) every sequence tensor of ``batch`` to ``length``.

    Args:
        batch: the batch.
        length: the target length; ``None`` leaves the batch as it is.
        fmt: padding values (labels get ``ignore_index``, attention masks 0, the rest
            ``pad_id``); the defaults when not given.
        pad: pad shorter sequences up to ``length`` (else only cut longer ones).
    """
    if length is None:
        return batch
    current = sequence_length(batch)
    if current is None or (current <= length and not pad) or current == length:
        return batch
    fmt = fmt or BatchFormat()
    labels = fmt.label_paths(batch)

    def fit(path: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() < 2 or tensor.shape[1] != current:
            return tensor
        if current > length:
            return tensor[:, :length]
        value = fmt.pad_value(path, label=path in labels)
        padding = tensor.new_full((tensor.shape[0], length - current, *tensor.shape[2:]), value)
        return torch.cat([tensor, padding], dim=1)

    return tree_map_with_path(fit, batch)

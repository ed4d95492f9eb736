"""Collation: dataset items of any structure into one batch, padding what varies in length.

Items may be ``(input, target)`` pairs, tuples, mappings (``{"input_ids": ...,
"labels": ...}``) or dataclasses, with tensors, NumPy arrays, numbers or lists of
numbers as leaves. Leaves of equal shape are stacked; 1-D-or-more leaves whose first
dimension varies (documents of different lengths) are right-padded to the longest:

=================================== =================================
leaf                                padded with
=================================== =================================
a label (``labels``; a pair's target) ``ignore_index`` (default -100)
``attention_mask``                    0
anything else (token ids)             ``pad_id`` (default 0)
=================================== =================================

A mapping item with ``input_ids`` and no ``attention_mask`` gets one (1 for real
tokens, 0 for padding), so that a model called with ``model(**batch)`` ignores the
padding and every batch of a source has the same keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from stagetrain.batch import Batch, BatchFormat
from stagetrain.errors import DataError


def _as_tensor(value: Any, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as exc:
        kind = type(value).__name__
        raise DataError(
            f"item field {path or 'value'!r}: cannot turn {kind} into a tensor ({exc})"
        ) from None


def _stack(values: list[Any], path: str, fmt: BatchFormat, label: bool) -> torch.Tensor:
    tensors = [_as_tensor(v, path) for v in values]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) == 1:
        return torch.stack(tensors)
    if any(t.dim() == 0 for t in tensors) or len({t.shape[1:] for t in tensors}) != 1:
        raise DataError(
            f"item field {path or 'value'!r}: shapes differ beyond the first dimension "
            f"({sorted(shapes)[:3]}); only the sequence length may vary between items"
        )
    longest = max(t.shape[0] for t in tensors)
    value = fmt.pad_value(path, label=label)
    out = tensors[0].new_full((len(tensors), longest, *tensors[0].shape[1:]), value)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def _collate(items: Sequence[Any], path: str, fmt: BatchFormat, label: bool = False) -> Any:
    first = items[0]
    if isinstance(first, Mapping):
        keys = list(first)
        if any(list(item) != keys for item in items):
            raise DataError(f"items {path or ''} have different keys: {keys} and others")
        out = {
            k: _collate(
                [item[k] for item in items],
                f"{path}.{k}" if path else str(k),
                fmt,
                label or k in fmt.label_keys,
            )
            for k in keys
        }
        if "input_ids" in out and "attention_mask" not in out and not path:
            lengths = torch.tensor([len(item["input_ids"]) for item in items])
            width = out["input_ids"].shape[1] if out["input_ids"].dim() > 1 else 1
            out["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return out
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = {
            f.name: _collate(
                [getattr(item, f.name) for item in items],
                f"{path}.{f.name}" if path else f.name,
                fmt,
                label or f.name in fmt.label_keys,
            )
            for f in dataclasses.fields(first)
        }
        return type(first)(**fields)
    if isinstance(first, tuple | list) and not _is_number_list(first):
        n = len(first)
        if any(len(item) != n for item in items):
            raise DataError(f"items {path or ''} have different lengths")
        # The last part of a top-level pair or tuple is its target (see modelio).
        return tuple(
            _collate(
                [item[i] for item in items],
                f"{path}[{i}]",
                fmt,
                label or (not path and n >= 2 and i == n - 1),
            )
            for i in range(n)
        )
    return _stack(list(items), path, fmt, label)


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], int | float | bool))


def collate(items: Sequence[Any], fmt: BatchFormat | None = None) -> Batch:
    """One batch from ``items`` (see the module docstring for the padding rules).

    Raises:
        DataError: naming the field when items do not fit together.
    """
    if not items:
        raise DataError("cannot collate an empty list of items")
    return _collate(list(items), "", fmt or BatchFormat())

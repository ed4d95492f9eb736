"""How a batch reaches the model, and how the model's output reaches the losses.

Conventions (no glue code needed for the common cases):

================================ ======================================= ==============
batch                            the model is called as                   targets
================================ ======================================= ==============
``(inputs, targets)``            ``model(inputs)``                        ``targets``
``(a, b, ..., targets)``         ``model(a, b, ...)``                     ``targets``
a mapping / dataclass            ``model(**batch)`` without label keys    ``batch["labels"]``
a tensor                         ``model(batch)``                         none
anything, with ``forward:``      ``forward(model, batch)``                as above
================================ ======================================= ==============

Label keys (``batch.label_keys``, default ``["labels"]``) are passed to the model too
when the stage's loss is the model's own (``loss: model``) or when
``batch.pass_labels`` says so.

Outputs may be a tensor (the logits), a tuple (logits first), or an object or mapping
with ``logits`` and optionally ``loss`` (a Hugging Face ``ModelOutput``).

*Causal-LM labels.* Hugging Face causal LMs take ``labels == input_ids`` and shift
them inside. With ``batch.shift_labels`` (default: on for mapping batches when the
model's class is a ``...ForCausalLM`` / ``...LMHeadModel``), stagetrain's losses and
metrics compare ``logits[:, :-1]`` with ``labels[:, 1:]`` the same way, so that
``cross_entropy`` and ``loss: model`` agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from stagetrain.batch import Batch, BatchFormat

ForwardFn = Callable[[torch.nn.Module, Batch], Any]


@dataclass(frozen=True)
class Prediction:
    """A model's output aligned with its targets, as losses and metrics see it.

    Attributes:
        logits: the output tensor (``[..., C]`` logits, or values for regression).
        target: the targets, aligned with ``logits`` (shifted for causal LMs), or None.
        model_loss: the loss the model computed itself, when it did.
        outputs: the raw output of the model.
        batch: the batch it was computed on.
    """

    logits: torch.Tensor
    target: torch.Tensor | None
    model_loss: torch.Tensor | None
    outputs: Any
    batch: Batch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A Hugging Face causal language model (its labels are the unshifted input ids)."""
    name = type(unwrap(model)).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def _fields(batch: Any) -> dict[str, Any] | None:
    kind = type(batch)
    if kind is tuple or kind is list or kind is torch.Tensor:
        return None  # the common cases first: this runs several times a step
    if kind is dict:
        return batch
    if isinstance(batch, Mapping):
        return dict(batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return None


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a tuple's first part, ``.logits``/``["logits"]``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, tuple | list) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(outputs).__name__}: return a "
        "tensor, a tuple with the logits first, or an object with a 'logits' field, or give "
        "the config a 'batch.forward' function"
    )


def loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss a model computed itself (``.loss`` / ``["loss"]``), if any."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


@dataclass(frozen=True)
class ModelIO:
    """The call convention of one stage (or evaluation) — see the module docstring.

    Attributes:
        fmt: label keys and padding values.
        pass_labels: give label keys to the model (True when the loss is the model's own).
        shift_labels: ``None`` decides per model (causal LMs with mapping batches).
        forward: a user function ``(model, batch) -> outputs`` replacing the convention.
    """

    fmt: BatchFormat = field(default_factory=BatchFormat)
    pass_labels: bool = False
    shift_labels: bool | None = None
    forward: ForwardFn | None = None

    def call(self, model: torch.nn.Module, batch: Batch) -> Any:
        """Run ``model`` on ``batch`` by the convention."""
        if self.forward is not None:
            return self.forward(model, batch)
        fields = _fields(batch)
        if fields is not None:
            if not self.pass_labels:
                fields = {k: v for k, v in fields.items() if k not in self.fmt.label_keys}
            return model(**fields)
        if isinstance(batch, tuple | list):
            if len(batch) == 1:
                return model(batch[0])
            return model(*batch[:-1])
        return model(batch)

    def target(self, batch: Batch) -> torch.Tensor | None:
        """The targets of ``batch`` (before any causal shift)."""
        fields = _fields(batch)
        if fields is not None:
            for key in self.fmt.label_keys:
                if key in fields:
                    return fields[key]
            return None
        if isinstance(batch, tuple | list) and len(batch) >= 2:
            return batch[-1]
        return None

    def shifts(self, model: torch.nn.Module, batch: Batch) -> bool:
        """Whether targets are causal-LM labels to be shifted against the logits."""
        if self.shift_labels is not None:
            return self.shift_labels
        return _fields(batch) is not None and is_causal_lm(model)

    def predict(self, model: torch.nn.Module, batch: Batch) -> Prediction:
        """Call the model and align its output with the batch's targets."""
        return self.align(self.call(model, batch), batch, model)

    def predict_teacher(
        self, teacher: torch.nn.Module, batch: Batch, student: torch.nn.Module
    ) -> Prediction:
        """The teacher on the student's ``batch``, its logits aligned as the student's are:
        shifted only when the student's are, so a distillation term compares the same
        positions whichever wrapper each model has (a plain ``LlamaForCausalLM`` teacher
        of a wrapped student, or the other way round)."""
        return self.align(self.call(teacher, batch), batch, student)

    def align(self, outputs: Any, batch: Batch, model: torch.nn.Module) -> Prediction:
        """A :class:`Prediction` from a model's ``outputs`` on ``batch``."""
        logits = logits_of(outputs)
        target = self.target(batch)
        if target is not None and self.shifts(model, batch):
            logits, target = logits[:, :-1], target[:, 1:]
        return Prediction(logits, target, loss_of(outputs), outputs, batch)


def count_tokens(batch: Batch, io: ModelIO) -> torch.Tensor | None:
    """Real (non-padding) tokens of a token batch, on its device; None for non-token data.

    From ``attention_mask`` when present, else the targets that are not ``ignore_index``.
    """
    fields = _fields(batch)
    if fields is not None and isinstance(fields.get("attention_mask"), torch.Tensor):
        return fields["attention_mask"].sum()
    target = io.target(batch)
    if target is None or target.dim() < 2 or torch.is_floating_point(target):
        return None
    return (target != io.fmt.ignore_index).sum()

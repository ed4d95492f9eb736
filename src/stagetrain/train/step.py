"""One optimizer step: forward and backward over micro-batches, then the update.

Micro-batches of a step run under the engine's ``no_sync`` except the last (one
gradient all-reduce per step), under autocast when ``precision`` asks for it, with
the fp16 gradient scaler, and with the teacher's output when a loss term needs it.
Nothing here reads a value back to the host: losses, term values, real-token counts
and the gradient norm stay tensors on the device until a logging interval.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stagetrain.batch import Batch, batch_size, sequence_length, to_device
from stagetrain.curriculum import Stage
from stagetrain.modelio import count_tokens
from stagetrain.train.engine import Engine, grad_norm

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def make_scaler(precision: str, device: torch.device) -> Any:
    """A gradient scaler for fp16 (``torch.amp`` on torch >= 2.3, ``torch.cuda.amp`` before)."""
    if precision != "fp16":
        return None
    scaler_class = getattr(torch.amp, "GradScaler", None)
    if scaler_class is not None:
        return scaler_class(device.type)
    return torch.cuda.amp.GradScaler(enabled=device.type == "cuda")  # pragma: no cover


@dataclass
class StepResult:
    """What one step computed, as device tensors (read back only at logging intervals)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    tokens: torch.Tensor | None
    """Real (non-padding) tokens of this rank's batch, when the batch holds tokens."""
    padded: int = 0
    """Token positions of this rank's batch, padding included (from the shapes)."""


class StepRunner:
    """Runs forward/backward and the optimizer step of every step of a run.

    Args:
        engine: backward, no_sync, clipping.
        device: where batches go.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 with a scaler).
        teacher: the frozen teacher, for terms that need its output.
    """

    def __init__(
        self,
        engine: Engine,
        device: torch.device,
        precision: str,
        teacher: torch.nn.Module | None,
    ) -> None:
        self.engine = engine
        self.device = device
        self.autocast_dtype = PRECISIONS[precision]
        self.scaler = make_scaler(precision, device)
        self.teacher = teacher

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(
        self, stage: Stage, model: torch.nn.Module, micro_batches: Sequence[Batch]
    ) -> StepResult:
        """Forward and backward over the step's micro-batches; returns the mean loss."""
        parts = len(micro_batches)
        plain = parts == 1 and self.autocast_dtype is None and self.scaler is None
        if plain and not stage.loss.needs_teacher:
            # The common case, kept free of per-step Python overhead.
            batch = to_device(micro_batches[0], self.device, non_blocking=True)
            loss, terms = stage.loss(stage.io.predict(model, batch), model=model)
            self.engine.backward(loss)
            return StepResult(
                loss.detach(), terms, count_tokens(batch, stage.io), _positions(batch)
            )
        total: torch.Tensor | None = None
        term_totals: dict[str, torch.Tensor] = {}
        tokens: torch.Tensor | None = None
        padded = 0
        for i, micro in enumerate(micro_batches):
            batch = to_device(micro, self.device, non_blocking=True)
            last = i == parts - 1
            sync = contextlib.nullcontext() if last else self.engine.no_sync(model)
            with sync:
                with self._autocast():
                    pred = stage.io.predict(model, batch)
                    teacher_pred = None
                    if stage.loss.needs_teacher:
                        assert self.teacher is not None
                        with torch.no_grad():
                            teacher_pred = stage.io.predict_teacher(self.teacher, batch, model)
                    loss, terms = stage.loss(pred, teacher=teacher_pred, model=model)
                    loss = loss / parts
                if self.scaler is not None:
                    self.engine.backward(self.scaler.scale(loss))
                else:
                    self.engine.backward(loss)
            detached = loss.detach()
            total = detached if total is None else total + detached
            for name, value in terms.items():
                value = value.detach() / parts
                term_totals[name] = value if name not in term_totals else term_totals[name] + value
            count = count_tokens(batch, stage.io)
            if count is not None:
                tokens = count if tokens is None else tokens + count
            padded += _positions(batch)
        assert total is not None
        return StepResult(total, term_totals, tokens, padded)

    def update(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        *,
        grad_clip: float | None,
        want_norm: bool,
    ) -> torch.Tensor | None:
        """Unscale (fp16), clip, step and zero the gradients; returns the gradient norm
        (before clipping) when clipping or ``want_norm`` computed it."""
        norm = None
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip is not None:
            norm = self.engine.clip_grad_norm(model, grad_clip)
        elif want_norm:
            norm = grad_norm(model)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def discard(self, optimizer: Any) -> None:
        """Drop this step's gradients without an update (a skipped non-finite step)."""
        optimizer.zero_grad(set_to_none=True)


def _positions(batch: Batch) -> int:
    """Token positions of a batch (samples x sequence length), 0 for non-token data."""
    length = sequence_length(batch)
    return 0 if length is None else length * batch_size(batch)

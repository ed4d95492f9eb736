"""How a search trains and scores: the backend protocol, the single-process backend, and
the cache of finished units."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from stagetrain.batch import Batch, batch_size, to_device

if TYPE_CHECKING:
    from stagetrain.curriculum import Stage


# --- checks before training -----------------------------------------------------------------


class SearchBackend(Protocol):
    """How the search trains and evaluates (the driver's engine), see :class:`LocalBackend`.

    Every rank calls the same methods in the same order: ``train_step`` and ``eval_sum``
    may run collectives (DDP's gradient all-reduce), ``all_sum``, ``agree`` and
    ``broadcast`` are collectives.
    """

    rank: int
    world_size: int

    def train_step(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Forward, backward and one optimizer step at the LR already set; this rank's
        mean loss."""
        ...

    def eval_sum(self, batch: Batch) -> torch.Tensor:
        """The stage's loss on ``batch`` (no gradients, eval mode) times its sample count."""
        ...

    def all_sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over ranks."""
        ...

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        ...

    def extra_state(self) -> dict[str, Any]:
        """Driver state the search changes besides the weights and optimizer (a loss scale)."""
        ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...


class LocalBackend:
    """A :class:`SearchBackend` for one process: plain forward, backward and step.

    Args:
        stage: the stage searched (its calling convention, loss and ``grad_clip``).
        model: the model, on ``device``.
        optimizer: its optimizer for the stage (after the stage's hand-off).
        teacher: the frozen teacher, for ``kl_distill`` terms.
        device: where batches go (default: the model's device).
    """

    rank = 0
    world_size = 1

    def __init__(
        self,
        stage: Stage,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        teacher: torch.nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.stage, self.model, self.optimizer, self.teacher = stage, model, optimizer, teacher
        first = next(iter(model.parameters()), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu")
        )  # fmt: skip
        assert stage.config.optimizer is not None
        self.grad_clip = stage.config.optimizer.grad_clip

    def _loss(self, batch: Batch) -> torch.Tensor:
        stage = self.stage
        pred = stage.io.predict(self.model, batch)
        teacher_pred = None
        if stage.loss.needs_teacher:
            assert self.teacher is not None, "a kl_distill term needs the teacher"
            with torch.no_grad():
                teacher_pred = stage.io.predict(self.teacher, batch)
        return stage.loss(pred, teacher=teacher_pred, model=self.model)[0]

    def train_step(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        self.model.train()
        total = torch.zeros((), device=self.device)
        for micro in micro_batches:
            loss = self._loss(to_device(micro, self.device)) / len(micro_batches)
            loss.backward()
            total = total + loss.detach()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def eval_sum(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        try:
            with torch.no_grad():
                batch = to_device(batch, self.device)
                return self._loss(batch).detach().double() * batch_size(batch)
        finally:
            self.model.train()

    def all_sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return values

    def agree(self, flag: bool) -> bool:
        return flag

    def broadcast(self, obj: Any) -> Any:
        return obj

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


class SearchCache(Protocol):
    """Finished units of a search (JSON-able values by key), so a resumed search skips them.

    Only rank 0's :meth:`load` is used (it is broadcast); every rank calls :meth:`put`.
    """

    def load(self) -> dict[str, Any]:
        """The units finished so far."""
        ...

    def put(self, key: str, value: Any) -> None: ...


class _NoCache:
    def load(self) -> dict[str, Any]:
        return {}

    def put(self, key: str, value: Any) -> None:
        pass


# --- results ---------------------------------------------------------------------------------

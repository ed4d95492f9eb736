"""Stage losses: one or several named, weighted terms.

A loss term is a function ``(output, target, **args) -> scalar tensor``. The built-ins
are ``cross_entropy`` (classification or next-token logits), ``mse`` and
``kl_distill`` (forward KL to a teacher's temperature-softened logits); any other is
an import path ``"pkg.mod:fn"`` with the same signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stagetrain.config import LossTerm
from stagetrain.errors import ConfigError
from stagetrain.registry import import_path

LossFn = Callable[..., torch.Tensor]


def cross_entropy(output: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Cross-entropy of logits ``[..., C]`` against integer targets ``[...]``."""
    if output.dim() == 2:
        return F.cross_entropy(output, target, **kwargs)
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1), **kwargs)


def mse(output: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Mean squared error (the target is cast to the output's dtype)."""
    return F.mse_loss(output, target.to(output.dtype).reshape(output.shape), **kwargs)


def kl_distill(
    output: torch.Tensor,
    target: torch.Tensor,
    *,
    teacher_output: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL(teacher || student) on logits softened by ``temperature``.

    ``KL = T^2 * sum_c p_t(c) * (log p_t(c) - log p_s(c))``, averaged over positions;
    the ``T^2`` keeps gradient magnitudes comparable across temperatures (Hinton 2015).
    """
    vocab = output.shape[-1]
    student = F.log_softmax(output.reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_output.reshape(-1, vocab).detach() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


BUILTIN_LOSS_FNS: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
    "kl_distill": kl_distill,
}


@dataclass(frozen=True)
class StageLoss:
    """The weighted sum of a stage's loss terms.

    Calling it returns the total and each term (as tensors; nothing is read back to
    the host here, so the training step never waits on the device).
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    fns: tuple[LossFn, ...]
    args: tuple[dict[str, Any], ...]
    needs_teacher: bool
    wants_model: tuple[bool, ...] = ()
    """Per term: the function takes a ``model`` keyword (auxiliary losses the model
    computed in its forward pass, such as a router's cost)."""

    @classmethod
    def build(cls, terms: Sequence[LossTerm], *, field: str, has_teacher: bool) -> StageLoss:
        fns: list[LossFn] = []
        for i, term in enumerate(terms):
            fn = BUILTIN_LOSS_FNS.get(term.name)
            if fn is None:
                fn = import_path(term.name, field=f"{field}[{i}].name")
                if not callable(fn):
                    raise ConfigError(f"{field}[{i}].name: {term.name!r} is not callable")
            fns.append(fn)
        needs_teacher = any(t.name == "kl_distill" for t in terms)
        if needs_teacher and not has_teacher:
            raise ConfigError(
                f"{field}: kl_distill needs a teacher model; pass fit(..., teacher=model)"
            )
        return cls(
            names=tuple(t.name for t in terms),
            weights=tuple(t.weight for t in terms),
            fns=tuple(fns),
            args=tuple(dict(t.args) for t in terms),
            needs_teacher=needs_teacher,
            wants_model=tuple(_takes_model(fn) for fn in fns),
        )

    def __call__(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        teacher_output: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        simple = len(self.fns) == 1 and self.weights[0] == 1.0 and not self.needs_teacher
        if simple and not any(self.wants_model):
            value = self.fns[0](output, target, **self.args[0])  # no extra ops on the hot path
            return value, {self.names[0]: value}
        terms: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for name, weight, fn, args, wants_model in zip(
            self.names, self.weights, self.fns, self.args, self.wants_model, strict=True
        ):
            if fn is kl_distill:
                value = fn(output, target, teacher_output=teacher_output, **args)
            elif wants_model:
                if model is None:
                    raise ConfigError(f"loss term {name!r} needs the model; call with model=")
                value = fn(output, target, model=getattr(model, "module", model), **args)
            else:
                value = fn(output, target, **args)
            terms[name] = value
            total = weight * value if total is None else total + weight * value
        assert total is not None
        return total, terms


def _takes_model(fn: Any) -> bool:
    try:
        return "model" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False

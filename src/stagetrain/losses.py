"""Stage losses: one or several named, weighted terms.

A loss term is a function ``(output, target, **args) -> scalar tensor`` where
``output`` is the model's logits (or values) and ``target`` the batch's targets,
aligned (see :mod:`stagetrain.modelio`). A term may also ask, by naming the keyword in
its signature, for ``teacher_output`` (the teacher's logits on the same batch),
``model`` (the unwrapped model, for auxiliary losses it computed) or ``batch``.

============== ==============================================================
name           what it computes
============== ==============================================================
cross_entropy  softmax cross-entropy of logits ``[..., C]`` against class ids;
               ``ignore_index`` (default -100) and ``label_smoothing``
bce_with_logits binary cross-entropy of logits against 0/1 targets (one logit per
               sample, or one per label); targets equal to ``ignore_index`` skipped
hinge          ``mean(max(0, margin - y f))`` with ``y`` in {-1, +1} (0/1 targets are
               mapped to -1/+1); multi-class hinge for ``C > 1`` logits
nll            negative log-likelihood of log-probabilities
mse, l1        mean squared / absolute error (targets cast to the output dtype)
smooth_l1      Huber-like loss with ``beta``
kl_distill     forward KL to the teacher's ``temperature``-softened logits
model          the loss the model computed itself (``outputs.loss``)
============== ==============================================================

Anything else is an import path ``"pkg.mod:fn"`` or, in Python, a callable.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stagetrain.config import BUILTIN_LOSSES, LossTerm
from stagetrain.errors import ConfigError, TrainingError
from stagetrain.modelio import Prediction, logits_of, loss_of, unwrap
from stagetrain.registry import import_path

LossFn = Callable[..., torch.Tensor]


def _flat(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if output.dim() == 2 and target.dim() == 1:
        return output, target
    return output.reshape(-1, output.shape[-1]), target.reshape(-1)


def cross_entropy(
    output: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    **kwargs: Any,
) -> torch.Tensor:
    """Cross-entropy of logits ``[..., C]`` against integer targets ``[...]``."""
    if output.shape[-1] == 1 and output.dim() == target.dim() + 1:
        raise ConfigError(
            "cross_entropy: the model outputs one logit per sample (a binary classifier); "
            "use the loss 'bce_with_logits' or 'hinge'"
        )
    logits, labels = _flat(output, target)
    return F.cross_entropy(
        logits, labels.long(), ignore_index=ignore_index, label_smoothing=label_smoothing, **kwargs
    )


def _binary_view(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of the same shape (one logit per sample squeezed to match)."""
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    if output.shape != target.shape:
        raise ConfigError(
            f"binary loss: output shape {tuple(output.shape)} does not match target shape "
            f"{tuple(target.shape)}"
        )
    return output, target


def bce_with_logits(
    output: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, **kwargs: Any
) -> torch.Tensor:
    """Binary cross-entropy on logits; targets in {0, 1} (entries = ``ignore_index`` skipped)."""
    logits, labels = _binary_view(output, target)
    keep = labels != ignore_index
    losses = F.binary_cross_entropy_with_logits(
        logits, labels.to(logits.dtype).clamp(0, 1), reduction="none", **kwargs
    )
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def hinge(
    output: torch.Tensor, target: torch.Tensor, *, margin: float = 1.0, ignore_index: int = -100
) -> torch.Tensor:
    """Hinge loss. Binary (one logit): ``mean(relu(margin - y f))`` with ``y = ±1``.

    Targets in {0, 1} are read as {-1, +1}; targets already in {-1, +1} are kept. With
    ``C > 1`` logits: the multi-class hinge of Crammer & Singer style margins
    (``torch.nn.functional.multi_margin_loss``).
    """
    if output.dim() == target.dim() + 1 and output.shape[-1] > 1:
        logits, labels = _flat(output, target)
        keep = labels != ignore_index
        return F.multi_margin_loss(logits[keep], labels[keep].long(), margin=margin)
    logits, labels = _binary_view(output, target)
    keep = labels != ignore_index
    signs = labels.to(logits.dtype)
    signs = torch.where(signs > 0, 1.0, -1.0).to(logits.dtype)
    losses = F.relu(margin - signs * logits)
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def nll(
    output: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, **kwargs: Any
) -> torch.Tensor:
    """Negative log-likelihood of log-probabilities ``[..., C]``."""
    log_probs, labels = _flat(output, target)
    return F.nll_loss(log_probs, labels.long(), ignore_index=ignore_index, **kwargs)


def mse(output: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Mean squared error (the target is cast to the output's dtype)."""
    return F.mse_loss(output, target.to(output.dtype).reshape(output.shape), **kwargs)


def l1(output: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Mean absolute error."""
    return F.l1_loss(output, target.to(output.dtype).reshape(output.shape), **kwargs)


def smooth_l1(
    output: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0, **kwargs: Any
) -> torch.Tensor:
    """Smooth L1: squared below ``beta``, absolute above."""
    return F.smooth_l1_loss(
        output, target.to(output.dtype).reshape(output.shape), beta=beta, **kwargs
    )


def kl_distill(
    output: torch.Tensor,
    target: torch.Tensor | None,
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


def model_loss(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Placeholder for the term ``model``: the value is the model's own ``outputs.loss``."""
    raise AssertionError("StageLoss reads the model's own loss directly")  # pragma: no cover


BUILTIN_LOSS_FNS: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "bce_with_logits": bce_with_logits,
    "hinge": hinge,
    "nll": nll,
    "mse": mse,
    "l1": l1,
    "smooth_l1": smooth_l1,
    "kl_distill": kl_distill,
    "model": model_loss,
}
assert tuple(BUILTIN_LOSS_FNS) == BUILTIN_LOSSES, "config.BUILTIN_LOSSES lists these names"


def resolve_loss(name: str | LossFn, *, field: str) -> LossFn:
    """The function of a loss name, import path or callable."""
    if callable(name):
        return name
    fn = BUILTIN_LOSS_FNS.get(name)
    if fn is not None:
        return fn
    target = import_path(name, field=field)
    if not callable(target):
        raise ConfigError(f"{field}: {name!r} is not callable")
    return target


def _keywords(fn: Any) -> frozenset[str]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return frozenset()
    return frozenset(k for k in ("teacher_output", "model", "batch") if k in params)


@dataclass(frozen=True)
class _Term:
    name: str
    weight: float
    fn: LossFn
    args: dict[str, Any]
    wants: frozenset[str]
    is_model: bool


@dataclass(frozen=True)
class StageLoss:
    """The weighted sum of a stage's loss terms.

    Calling it returns the total and each term (as tensors; nothing is read back to
    the host here, so the training step never waits on the device).
    """

    terms: tuple[_Term, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @property
    def needs_teacher(self) -> bool:
        return any("teacher_output" in t.wants for t in self.terms)

    @property
    def uses_model_loss(self) -> bool:
        """A term is the model's own loss (so the model must be given the labels)."""
        return any(t.is_model for t in self.terms)

    @classmethod
    def build(cls, terms: Sequence[LossTerm], *, field: str, has_teacher: bool) -> StageLoss:
        """Resolve every term's function; ``field`` names the config field in errors."""
        built = []
        for i, term in enumerate(terms):
            fn = resolve_loss(term.name, field=f"{field}[{i}].name")
            built.append(
                _Term(
                    name=term.label,
                    weight=term.weight,
                    fn=fn,
                    args=dict(term.args),
                    wants=_keywords(fn),
                    is_model=fn is model_loss,
                )
            )
        loss = cls(tuple(built))
        if loss.needs_teacher and not has_teacher:
            needing = ", ".join(t.name for t in built if "teacher_output" in t.wants)
            raise ConfigError(
                f"{field}: {needing} needs a teacher model; declare 'teacher' in the config "
                "or pass fit(..., teacher=model)"
            )
        return loss

    def __call__(
        self,
        pred: Prediction | Any,
        target: torch.Tensor | None = None,
        teacher: Prediction | Any = None,
        model: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and each term.

        Args:
            pred: the model's :class:`~stagetrain.modelio.Prediction`, or its raw output
                (logits, a tuple or a ``ModelOutput``) with ``target``.
            target: the targets, when ``pred`` is a raw output.
            teacher: the teacher's prediction or raw output, for terms that need it.
            model: for terms that read the model (auxiliary losses).
        """
        if not isinstance(pred, Prediction):
            pred = Prediction(logits_of(pred), target, loss_of(pred), pred, None)
        if teacher is not None and not isinstance(teacher, Prediction):
            teacher = Prediction(logits_of(teacher), None, None, teacher, None)
        if len(self.terms) == 1 and not self.terms[0].wants and self.terms[0].weight == 1.0:
            term = self.terms[0]  # the common case: no extra ops on the hot path
            value = (
                self._model_loss(pred)
                if term.is_model
                else term.fn(pred.logits, pred.target, **term.args)
            )
            return value, {term.name: value}
        values: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for term in self.terms:
            if term.is_model:
                value = self._model_loss(pred)
            else:
                extra: dict[str, Any] = {}
                if "teacher_output" in term.wants:
                    if teacher is None:
                        raise TrainingError(f"loss term {term.name!r} needs the teacher's output")
                    extra["teacher_output"] = teacher.logits
                if "model" in term.wants:
                    if model is None:
                        raise ConfigError(
                            f"loss term {term.name!r} needs the model; call with model="
                        )
                    extra["model"] = unwrap(model)
                if "batch" in term.wants:
                    extra["batch"] = pred.batch
                value = term.fn(pred.logits, pred.target, **term.args, **extra)
            values[term.name] = value
            total = term.weight * value if total is None else total + term.weight * value
        assert total is not None
        return total, values

    @staticmethod
    def _model_loss(pred: Prediction) -> torch.Tensor:
        if pred.model_loss is None:
            raise TrainingError(
                "loss 'model': the model's output has no 'loss'; give the batch its labels "
                "(a 'labels' key) or use a loss such as cross_entropy"
            )
        return pred.model_loss

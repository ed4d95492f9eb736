"""Elastic Hugging Face decoder models: Llama (``LlamaForCausalLM``) and GPT-2
(``GPT2LMHeadModel``).

:class:`ElasticModel` wraps the user's model without copying its code: forward hooks
(:mod:`~stagetrain.elastic.masking`) apply the masks of each sample's budget, which
arrives beside the inputs::

    model = ElasticModel(llama, budgets=[...], choices={...})
    logits = model(input_ids=ids, budget=torch.tensor([0, 2, 1, 2])).logits

A dict batch ``{"input_ids", "labels", "budget"}`` called as ``model(**batch)``
therefore trains each sample at its budget; ``budget`` omitted = the full model.
:class:`CausalLM` is the plain counterpart (a teacher, a model to pretrain): it takes
the same batches and ignores ``budget``, so a teacher fed the student's batch computes
the full model on the real token ids.

Both keep the Hugging Face model at ``.model`` (state-dict keys ``model.<hf name>``), so
a :class:`CausalLM` run's weights load into an :class:`ElasticModel`. ``output="logits"``
returns the logits tensor instead of the model's output object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from stagetrain.elastic.core import budget_index, build_router, route
from stagetrain.elastic.family import Family
from stagetrain.elastic.gpt2 import GPT2Family, build_gpt2
from stagetrain.elastic.llama import LlamaFamily, build_llama
from stagetrain.elastic.masking import MaskHooks
from stagetrain.errors import ConfigError

Output = Literal["model", "logits"]

FAMILIES: dict[str, Callable[[nn.Module], Family]] = {
    "LlamaForCausalLM": LlamaFamily,
    "GPT2LMHeadModel": GPT2Family,
}
"""Supported model classes (by class name) and their families."""


def family_for(model: nn.Module) -> Family:
    """The family of a Hugging Face model; a clear error for an unsupported class."""
    name = type(model).__name__
    if name not in FAMILIES:
        raise ConfigError(
            f"elastic: {name} is not supported; supported model classes: {sorted(FAMILIES)}"
        )
    return FAMILIES[name](model)


def _output(result: Any, output: Output) -> Any:
    return result.logits if output == "logits" else result


def _check_output(output: str) -> None:
    if output not in ("model", "logits"):
        raise ConfigError(f"output: 'model' or 'logits', got {output!r}")


class CausalLM(nn.Module):
    """A plain Hugging Face causal LM that ignores ``budget=`` (see the module docstring)."""

    def __init__(self, model: nn.Module, *, output: Output = "model") -> None:
        super().__init__()
        _check_output(output)
        self.model = model
        self.output = output

    def forward(self, input_ids: Any = None, *args: Any, budget: Any = None, **kwargs: Any) -> Any:
        return _output(self.model(input_ids, *args, **kwargs), self.output)


class ElasticModel(nn.Module):
    """A Hugging Face decoder model with nested budgets (see the module docstring).

    Args:
        model: a ``LlamaForCausalLM`` or ``GPT2LMHeadModel``.
        budgets: ``[{"name": ..., "target": fraction of the full model's parameters}]``;
            budget index ``b`` is ``budgets[b]``.
        choices: per axis (``width``, ``heads``, ``ffn``, ``depth``) the sizes a budget may
            keep, ascending, each ending with the full size; with grouped-query attention
            every ``heads`` choice is a multiple of the key/value heads.
        router: keyword arguments of :class:`~stagetrain.elastic.router.BudgetRouter`.
        heterogeneous: every layer has its own heads and MLP width.
        output: ``"model"`` (the Hugging Face output) or ``"logits"``.
    """

    layer_rank: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        budgets: Sequence[Mapping[str, Any]] | None = None,
        choices: Mapping[str, Sequence[int]] | None = None,
        router: Mapping[str, Any] | None = None,
        heterogeneous: bool = False,
        output: Output = "model",
    ) -> None:
        super().__init__()
        _check_output(output)
        self.model = model
        self.output = output
        self.family = family_for(model)
        self.register_buffer("layer_rank", torch.arange(self.family.sizes.layers))
        self.hooks = MaskHooks(self.family.layout(model), self.family.sizes)
        self.space, self.router = build_router(self.family, budgets, choices, router, heterogeneous)
        self.router_loss: torch.Tensor | None = None

    @property
    def root(self) -> nn.Module:
        return self.model

    @property
    def full_params(self) -> int:
        """Parameters of the full model, from its config."""
        if self.space is not None:
            return self.space.full_params
        sizes = self.family.sizes
        return int(
            self.family.base_params(sizes.width)
            + sizes.layers * self.family.layer_params(sizes.width, sizes.heads, sizes.ffn)
        )

    def forward(self, input_ids: Any = None, *args: Any, budget: Any = None, **kwargs: Any) -> Any:
        """The wrapped model's forward pass, each sample at its ``budget`` (per-sample
        indices, one index, or one budget name; ``None`` = the full model)."""
        if budget is None:
            self.router_loss = None
            with self.hooks.apply(None):
                return _output(self.model(input_ids, *args, **kwargs), self.output)
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if reference is None:
            raise ConfigError("budget=: needs input_ids (or inputs_embeds) to size the batch")
        index = budget_index(self.router, budget, reference.shape[0], reference.device)
        if self.training and _checkpointing(self.model):
            raise ConfigError(
                "budget=: gradient checkpointing is not supported with budgets (its "
                "recomputation runs outside the forward pass's masks); disable it"
            )
        with self.hooks.apply(route(self, index)):
            return _output(self.model(input_ids, *args, **kwargs), self.output)

    def plain_logits(self, batch: Any) -> torch.Tensor:
        with self.hooks.apply(None):
            return self.model(**_hf_inputs(batch)).logits

    def budget_logits(self, batch: Any, budget: int) -> torch.Tensor:
        out = self(**_hf_inputs(batch), budget=budget)
        return out if isinstance(out, torch.Tensor) else out.logits


def _checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed it; the old name warns.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _hf_inputs(batch: Any) -> dict[str, Any]:
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if isinstance(batch, tuple | list):
        return {"input_ids": batch[0]}
    return {"input_ids": batch}


# --- building models from configs ---------------------------------------------------


def hf_model(config: Mapping[str, Any] | None = None, pretrained: str | None = None) -> nn.Module:
    """A Hugging Face causal LM from a config dict (``model_type`` plus its fields,
    randomly initialised) or from a local ``pretrained`` directory (nothing is
    downloaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (config is None) == (pretrained is None):
        raise ConfigError("model.args: give exactly one of 'config' or 'pretrained'")
    if pretrained is not None:
        if not Path(pretrained).is_dir():
            raise ConfigError(f"model.args.pretrained: {pretrained!r} is not a local directory")
        return AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True)
    assert config is not None
    fields = dict(config)
    if "model_type" not in fields:
        raise ConfigError("model.args.config: needs 'model_type' (e.g. llama, gpt2)")
    try:
        hf_config = AutoConfig.for_model(**fields)
    except ValueError as exc:
        raise ConfigError(f"model.args.config: {exc}") from None
    return AutoModelForCausalLM.from_config(hf_config)


def load_into(model: nn.Module, weights: str, *, field: str) -> None:
    """Load ``weights`` (file or stagetrain run directory) into a Hugging Face ``model``:
    either its own state dict or that of a :class:`CausalLM` / :class:`ElasticModel`
    around it (keys ``model.<hf name>``; router and ranking entries are ignored)."""
    from stagetrain.registry import load_weights

    state = load_weights(weights, field=field)
    own = model.state_dict()
    wrapped = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if set(wrapped) >= set(own):
        state = {k: v for k, v in wrapped.items() if k in own}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{field}: the weights do not fit the model ({first})") from None


def hf_causal_lm(
    *,
    config: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    weights: str | None = None,
    output: Output = "model",
) -> CausalLM:
    """Factory for configs (``model: {builtin: hf_causal_lm, args: {config: {...}}}``): a
    plain Hugging Face causal LM (a model to pretrain, or a teacher)."""
    model = hf_model(config, pretrained)
    if weights is not None:
        load_into(model, weights, field="model.args.weights")
    return CausalLM(model, output=output)


def hf_sliced(
    *, config: dict[str, Any], layers: list[list[int]], head_dim: int | None = None
) -> nn.Module:
    """A blank extracted child (``model.json`` of ``stagetrain extract``): the family's
    model of ``config`` with per-layer sizes ``layers``."""
    model_type = config.get("model_type")
    if model_type == "llama":
        return build_llama(config, layers)
    if model_type == "gpt2":
        if head_dim is None:
            raise ConfigError("hf_sliced: a GPT-2 child needs head_dim")
        return build_gpt2(config, layers, head_dim=head_dim)
    raise ConfigError(f"hf_sliced: unsupported model_type {model_type!r} (llama, gpt2)")

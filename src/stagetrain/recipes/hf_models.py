"""``transformers`` causal language models built from a config (never downloaded).

:func:`causal_lm` builds any ``AutoModelForCausalLM`` architecture from a model type and
its config fields; :func:`gpt2_lm` is the GPT-2 shorthand the LLM recipe uses. The model
is returned as it is: stagetrain calls it with a token batch and reads ``.logits`` from
its ``ModelOutput``. ``logits_only`` wraps it in :class:`LogitsOnly` (``inputs ->
logits`` tensor) for code that wants a plain tensor; ``stagetrain export --format hf``
finds the ``transformers`` model inside the wrapper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LogitsOnly(nn.Module):
    """``model(input_ids=inputs).logits``: a causal LM seen as ``inputs -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids).logits
        return logits


def causal_lm(*, model_type: str, logits_only: bool = False, **config: Any) -> nn.Module:
    """A freshly initialised ``AutoModelForCausalLM`` of ``model_type`` (``gpt2``, ``llama``...)
    with ``config`` fields (``vocab_size``, sizes...); the KV cache is off (training)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.for_model(model_type, **{"use_cache": False, **config})
    model = AutoModelForCausalLM.from_config(model_config)
    return LogitsOnly(model) if logits_only else model


def gpt2_lm(
    *,
    vocab_size: int,
    n_positions: int = 256,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    dropout: float = 0.0,
    eos_token_id: int | None = None,
    logits_only: bool = False,
) -> nn.Module:
    """A small GPT-2 (tied input and output embeddings) for CPU-sized recipes.

    ``eos_token_id`` (also the BOS id, as in GPT-2) is the tokenizer's end-of-text id;
    GPT-2's own 50256 would lie outside a small vocabulary, so the default is none.
    """
    return causal_lm(
        model_type="gpt2",
        logits_only=logits_only,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )

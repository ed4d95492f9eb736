"""Pre-flight checks of a curriculum's data against its model, before step 0."""

from __future__ import annotations

from typing import Any

import torch

from stagetrain.sources.tokens import check_token_ids


def model_vocab_size(model: torch.nn.Module) -> int | None:
    """Ids the model's input embedding accepts: ``get_input_embeddings()`` of the model or
    of a ``transformers`` model inside it, else the first ``nn.Embedding``; None when the
    model embeds no tokens."""
    for _, module in model.named_modules():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter):
            embedding = getter()
            if isinstance(embedding, torch.nn.Embedding):
                return int(embedding.num_embeddings)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            return int(module.num_embeddings)
    return None


def check_vocab(curriculum: Any, model: torch.nn.Module, *, sample: int = 256) -> int | None:
    """Check every training and evaluation source of ``curriculum`` against the model's
    vocabulary (see :func:`~stagetrain.sources.tokens.check_token_ids`); returns the
    vocabulary size checked against, or None when the model embeds no tokens.

    Raises:
        DataError: naming the source's config field (``stages[1].data.sources[0]``,
            ``evals[val].data``) and the file when a token id does not fit.
    """
    vocab = model_vocab_size(model)
    if vocab is None:
        return None
    seen: set[int] = set()
    for stage in curriculum.stages:
        own = len(stage.config.data.sources)
        for k, dataset in enumerate(stage.data.datasets[:own]):
            if id(dataset) not in seen:  # replay repeats earlier stages' datasets
                seen.add(id(dataset))
                check_token_ids(dataset, vocab, field=f"stages[{stage.index}].data.sources[{k}]",
                                sample=sample)  # fmt: skip
        for ev in curriculum.evals_for(stage):
            dataset = curriculum.eval_dataset(ev)
            if id(dataset) not in seen:
                seen.add(id(dataset))
                check_token_ids(dataset, vocab, field=f"evals[{ev.name}].data", sample=sample)
    return vocab

"""Nested elastic models trained with a budget curriculum (Nemotron Elastic).

Supported model families: Hugging Face ``LlamaForCausalLM`` and ``GPT2LMHeadModel``
(through :class:`ElasticModel`), and the built-in :class:`ElasticGPT`.

- :mod:`~stagetrain.elastic.family`: what the machinery needs to know about a family
  (:mod:`~stagetrain.elastic.llama`, :mod:`~stagetrain.elastic.gpt2`, ``GPTFamily``);
- :mod:`~stagetrain.elastic.masking`: per-sample masks through forward hooks;
- :mod:`~stagetrain.elastic.space` and :mod:`~stagetrain.elastic.router`: the axes, the
  parameter cost, the per-axis Gumbel-softmax routers and the projection onto targets
  (:mod:`~stagetrain.elastic.projection`);
- :mod:`~stagetrain.elastic.importance`: importance ranking and the nesting permutation;
- :mod:`~stagetrain.elastic.hf` and :mod:`~stagetrain.elastic.model`: the elastic models;
- :mod:`~stagetrain.elastic.data`: budgets assigned by mixtures, carried beside the tokens;
- :mod:`~stagetrain.elastic.losses`: the router loss term;
- :mod:`~stagetrain.elastic.budgets`: budget checks against their targets;
- :mod:`~stagetrain.elastic.extract` and :mod:`~stagetrain.elastic.export`: zero-shot
  extraction, the stagetrain and Hugging Face formats, ``stagetrain extract``
  (:func:`extract_run`; :func:`load_elastic_run` reads a trained run's parent back).
"""

from stagetrain.elastic.budgets import BudgetCheck, BudgetError, BudgetStatus, check_budgets
from stagetrain.elastic.export import ExtractionReport, extract_run, load_elastic_run
from stagetrain.elastic.extract import (
    extract,
    load_extracted,
    save_extracted,
    save_hf,
    slice_model,
)
from stagetrain.elastic.hf import CausalLM, ElasticModel
from stagetrain.elastic.importance import Importance, rank_and_permute, score
from stagetrain.elastic.model import ElasticGPT, param_count
from stagetrain.elastic.router import BudgetRouter, BudgetSpec

__all__ = [
    "BudgetCheck",
    "BudgetError",
    "BudgetRouter",
    "BudgetSpec",
    "BudgetStatus",
    "CausalLM",
    "ElasticGPT",
    "ElasticModel",
    "ExtractionReport",
    "Importance",
    "check_budgets",
    "extract",
    "extract_run",
    "load_elastic_run",
    "load_extracted",
    "param_count",
    "rank_and_permute",
    "save_extracted",
    "save_hf",
    "score",
    "slice_model",
]

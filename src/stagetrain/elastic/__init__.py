"""Nested elastic models trained with a budget curriculum (Nemotron Elastic, in miniature).

- :mod:`~stagetrain.elastic.model`: :class:`ElasticGPT`, maskable in width, heads, MLP
  neurons and depth, per sample;
- :mod:`~stagetrain.elastic.router`: per-axis Gumbel-softmax routers and the parameter cost;
- :mod:`~stagetrain.elastic.importance`: importance ranking and the nesting permutation;
- :mod:`~stagetrain.elastic.data`: budgets carried in token ids, assigned by mixtures;
- :mod:`~stagetrain.elastic.losses`: the router loss term;
- :mod:`~stagetrain.elastic.extract`: zero-shot extraction of a standalone submodel.
"""

from stagetrain.elastic.extract import extract, save_extracted
from stagetrain.elastic.importance import rank_and_permute
from stagetrain.elastic.model import ElasticGPT
from stagetrain.elastic.router import BudgetRouter, BudgetSpec, param_count

__all__ = [
    "BudgetRouter",
    "BudgetSpec",
    "ElasticGPT",
    "extract",
    "param_count",
    "rank_and_permute",
    "save_extracted",
]

"""Budgets honoured: checks against targets, projection onto the nearest configuration
within tolerance, the sampled router loss for grids too large to enumerate."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from stagetrain import ConfigError
from stagetrain.elastic import ElasticModel, check_budgets
from stagetrain.elastic.budgets import BudgetError, require_on_target

pytest.importorskip("transformers")  # the hf extra: absent where the dependency floors run
from transformers import LlamaConfig, LlamaForCausalLM

BUDGETS = [
    {"name": "full", "target": 1.0},
    {"name": "mid", "target": 0.7},
    {"name": "small", "target": 0.45},
]
CHOICES = {"width": [32, 40, 48, 56, 64], "heads": [2, 4], "ffn": [32, 64, 96, 128],
           "depth": [1, 2, 3, 4]}  # fmt: skip


def model(seed: int = 0, **router: object) -> ElasticModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return ElasticModel(
        LlamaForCausalLM(config), budgets=BUDGETS, choices=CHOICES, router={"hidden": 16, **router}
    )


def train_router(elastic: ElasticModel, steps: int, lr: float = 1e-2) -> None:
    """The router trained on its cost term alone (no task loss)."""
    assert elastic.router is not None
    router = elastic.router
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    budgets = torch.arange(len(BUDGETS)).repeat(8)
    for _ in range(steps):
        _, loss = router(budgets, training=True, layer_rank=elastic.layer_rank)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def brute_force_nearest(
    elastic: ElasticModel, start: list[int], cap: list[int], target: float, tolerance: float
) -> tuple[int, float]:
    """(L1 distance, |miss|) of the best configuration by enumerating the grid."""
    assert elastic.router is not None
    axes = elastic.router.axes
    best = None
    for index in itertools.product(*(range(c + 1) for c in cap)):
        config = {a.name: a.choices[i] for a, i in zip(axes, index, strict=True)}
        miss = abs(elastic.router.params_of(config) / target - 1)
        if miss <= tolerance:
            key = (sum(abs(i - s) for i, s in zip(index, start, strict=True)), miss)
            best = key if best is None or key < best else best
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(3))
def test_projection_pins_the_nearest_nested_configuration_within_tolerance(seed: int) -> None:
    elastic = model(seed)
    assert elastic.router is not None
    router = elastic.router
    before = router.choice_indices()
    statuses = check_budgets(elastic, 0.03)
    assert not all(s.ok for s in statuses)  # an untrained router misses
    router.project(0.03)
    after = router.choice_indices()
    full = elastic.full_params
    for b, status in enumerate(check_budgets(elastic, 0.03)):
        assert status.ok and status.pinned, status.line()
        if BUDGETS[b]["target"] < 1:
            # The nearest (fewest steps from the router's own choice), within the cap
            # of the next larger budget's pin.
            cap = after[b - 1].tolist()
            start = torch.minimum(before[b], after[b - 1]).tolist()
            distance, miss = brute_force_nearest(
                elastic, start, cap, BUDGETS[b]["target"] * full, 0.03
            )
            got = sum(abs(i - s) for i, s in zip(after[b].tolist(), start, strict=True))
            assert got == distance
            assert abs(status.off_target) == pytest.approx(miss)
    assert torch.all(after[2] <= after[1]) and torch.all(after[1] <= after[0])  # nested
    # Pinned choices hold in training too, and cost nothing to learn.
    selection, loss = router(torch.arange(3), training=True, layer_rank=elastic.layer_rank)
    for position, axis in enumerate(router.axes):
        assert torch.equal(selection[axis.name].argmax(-1), after[:, position])
    assert float(loss.detach()) < 0.031  # the pinned configurations' own miss


def test_router_project_option_pins_at_the_end_of_the_anneal() -> None:
    elastic = model(1, anneal_forwards=5, project=0.03)
    assert elastic.router is not None
    train_router(elastic, 4)
    assert bool((elastic.router.pinned < 0).all())
    train_router(elastic, 2)
    assert bool((elastic.router.pinned >= 0).all())
    assert all(s.ok for s in check_budgets(elastic, 0.03))


def test_off_target_is_refused_with_a_way_out() -> None:
    elastic = model(0)
    status = next(s for s in check_budgets(elastic, 0.01) if not s.ok)
    with pytest.raises(BudgetError, match=rf"budget '{status.name}' is .* off its parameter"):
        require_on_target(status)
    with pytest.raises(ConfigError, match="no configuration nested"):
        elastic.router.project(1e-9)  # type: ignore[union-attr]


def test_sampled_cost_estimates_the_exact_expectation() -> None:
    exact = model(2, cost="exact")
    sampled = model(2, cost="sampled", samples=20_000)
    assert exact.router is not None and sampled.router is not None
    with torch.no_grad():
        for a, b in zip(exact.router.nets.values(), sampled.router.nets.values(), strict=True):
            a[2].weight.normal_(0, 1.0)
            b[2].weight.copy_(a[2].weight)
    want = exact.router.expected_error()
    got = sampled.router.expected_error()
    assert want[1:].min() > 0.05  # far from converged
    assert torch.allclose(got, want, atol=0.01), (got, want)
    # The score-function gradient points the same way as the exact one.
    g_exact = torch.autograd.grad(want.sum(), exact.router.nets["width"][2].weight)[0]
    g_sampled = torch.autograd.grad(got.sum(), sampled.router.nets["width"][2].weight)[0]
    cosine = torch.nn.functional.cosine_similarity(g_exact.flatten(), g_sampled.flatten(), dim=0)
    assert cosine > 0.9


def test_heterogeneous_router_reaches_its_targets() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    elastic = ElasticModel(
        LlamaForCausalLM(config), budgets=BUDGETS, choices=CHOICES, heterogeneous=True,
        router={"hidden": 16, "anneal_forwards": 200, "samples": 256},
    )  # fmt: skip
    assert elastic.router is not None
    assert not elastic.router.exact  # 5 * 2^4 * 4^4 * 4 = 81,920 configurations
    train_router(elastic, 250)
    for status in check_budgets(elastic, 0.05):
        assert status.ok, status.line()


def test_budget_check_callback_writes_every_budget(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from stagetrain.elastic import BudgetCheck

    elastic = model(0)
    BudgetCheck(0.05).on_fit_end(SimpleNamespace(model=elastic, run_dir=tmp_path))
    written = json.loads((tmp_path / "budgets.json").read_text())
    assert [b["name"] for b in written] == ["full", "mid", "small"]
    want = {s.name: s.ok for s in check_budgets(elastic, 0.05)}
    assert {b["name"]: b["ok"] for b in written} == want

"""Nemotron Elastic recipes: elastic parents built from trained teachers.

Two parents, one machinery (:mod:`stagetrain.elastic`):

- :func:`elastic_parent`: the built-in :class:`~stagetrain.elastic.model.ElasticGPT`
  teacher (``examples/elastic_teacher.yaml``), ranked and given a router
  (``examples/elastic.yaml``);
- :func:`elastic_hf`: a Hugging Face model (a small ``LlamaConfig`` in
  ``examples/elastic_llama*.yaml``) wrapped in
  :class:`~stagetrain.elastic.hf.ElasticModel`, ranked and given a router.

Both rank channels, heads, neurons and layers on calibration windows of the stdlib
training split and permute the weights so every budget is a prefix; at the full budget
the parent computes exactly what the teacher computes.

:func:`train_nested` drives a nested curriculum from our own loop
(:meth:`~stagetrain.curriculum.Curriculum.steps`), the budget of each sample taken from
the mixture source it was drawn from, exactly as the ``elastic_text`` dict items carry
it. It exists until :func:`stagetrain.fit` passes dict batches to the model; then
``stagetrain run examples/elastic_llama.yaml`` is the same run. :func:`main`
(``python -m stagetrain.recipes.elastic CONFIG --out DIR``) runs it from the shell.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stagetrain.elastic.extract import slice_model
from stagetrain.elastic.hf import ElasticModel, hf_model, load_into
from stagetrain.elastic.importance import rank_and_permute
from stagetrain.elastic.model import ElasticGPT
from stagetrain.errors import ConfigError
from stagetrain.recipes.pystdlib import stdlib_text
from stagetrain.registry import load_weights


def calibration_batches(
    *, batches: int = 8, batch_size: int = 16, seq_len: int = 256, seed: int = 0
) -> list[torch.Tensor]:
    """Token windows of the training split for importance ranking (fixed by ``seed``)."""
    data = stdlib_text(split="train", context=seq_len)
    rng = np.random.default_rng([seed, 20251120])
    picks = rng.choice(len(data), size=(batches, batch_size), replace=False)
    return [data.get_batch(p)[0] for p in picks]


def ranked_teacher(
    teacher: dict[str, Any],
    weights: str | None,
    calibration: dict[str, Any] | None,
    importance: dict[str, Any] | None = None,
) -> ElasticGPT:
    """The teacher with its trained weights, ranked and permuted (every prefix nested)."""
    plain = ElasticGPT(**teacher)
    if weights is not None:
        plain.load_state_dict(load_weights(weights, field="model.args.weights"))
    rank_and_permute(plain, calibration_batches(**(calibration or {})), **(importance or {}))
    return plain


def elastic_parent(
    *,
    teacher: dict[str, Any],
    weights: str | None,
    budgets: list[dict[str, Any]],
    choices: dict[str, list[int]],
    router: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    importance: dict[str, Any] | None = None,
    heterogeneous: bool = False,
) -> ElasticGPT:
    """The elastic ElasticGPT parent: the teacher's weights, ranked and permuted, plus
    a router.

    Args:
        teacher: the teacher's :class:`ElasticGPT` architecture arguments.
        weights: the teacher's trained weights (file or run directory); ``None`` ranks a
            freshly initialised model (for tests only).
        budgets, choices, router, heterogeneous: as in :class:`ElasticGPT`.
        calibration: arguments of :func:`calibration_batches`.
        importance: ``depth`` (``iterative`` or ``one-shot``) and ``neurons``
            (``pre-activation`` or ``post-activation``) of the ranking.
    """
    plain = ranked_teacher(teacher, weights, calibration, importance)
    parent = ElasticGPT(
        **teacher, budgets=budgets, choices=choices, router=router, heterogeneous=heterogeneous
    )
    missing, unexpected = parent.load_state_dict(plain.state_dict(), strict=False)
    if unexpected or any(not key.startswith("router.") for key in missing):
        raise ConfigError(f"elastic_parent: teacher weights do not fit ({missing}, {unexpected})")
    return parent


def pruned_teacher(
    *,
    teacher: dict[str, Any],
    weights: str | None,
    sizes: dict[str, int],
    calibration: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The teacher pruned once to fixed ``sizes`` (``width``, ``heads``, ``ffn``, ``depth``)
    by the same importance ranking: the starting point of distilling one budget on its
    own (Minitron-style), the control for training all budgets nested at once."""
    plain = ranked_teacher(teacher, weights, calibration)
    missing = {"width", "heads", "ffn", "depth"} - set(sizes)
    if missing:
        raise ConfigError(f"pruned_teacher: sizes needs {sorted(missing)}")
    return slice_model(plain, sizes).model


def elastic_hf(
    *,
    budgets: list[dict[str, Any]],
    choices: dict[str, list[int]],
    config: dict[str, Any] | None = None,
    pretrained: str | None = None,
    weights: str | None = None,
    router: dict[str, Any] | None = None,
    heterogeneous: bool = False,
    calibration: dict[str, Any] | None = None,
    importance: dict[str, Any] | None = None,
    output: str = "model",
    tokenizer: str | None = None,
) -> ElasticModel:
    """An elastic Hugging Face parent for configs (``model: {builtin: elastic_hf, ...}``).

    Args:
        budgets, choices, router, heterogeneous, output: as in
            :class:`~stagetrain.elastic.hf.ElasticModel`.
        config: the model's config fields (with ``model_type``, e.g. ``llama``), for a
            model built from scratch; or
        pretrained: a local Hugging Face directory.
        weights: trained weights to load (file or run directory, e.g. the teacher run of
            a :func:`~stagetrain.elastic.hf.hf_causal_lm` model).
        calibration: arguments of :func:`calibration_batches` (stdlib text windows).
        importance: ``depth`` / ``neurons`` methods of the ranking.
        tokenizer: a directory of tokenizer files, or ``"bytes"`` (the stdlib byte
            tokenizer), copied by ``stagetrain extract --format hf``; not used here.
    """
    del tokenizer  # read from the run's config by stagetrain extract
    model = hf_model(config, pretrained)
    if weights is not None:
        load_into(model, weights, field="model.args.weights")
    elastic = ElasticModel(
        model, budgets=budgets, choices=choices, router=router, heterogeneous=heterogeneous,
        output=output,  # type: ignore[arg-type]
    )  # fmt: skip
    rank_and_permute(elastic, calibration_batches(**(calibration or {})), **(importance or {}))
    return elastic


# --- the interim own loop -------------------------------------------------------------


def pair_sources(config: dict[str, Any]) -> tuple[dict[str, Any], list[list[int]]]:
    """``config`` with every ``elastic_text`` source of the stages replaced by the pair
    source it wraps, and per stage the budget index of each of its sources."""
    config = copy.deepcopy(config)
    budgets: list[list[int]] = []
    for index, stage in enumerate(config["stages"]):
        data = stage["data"]
        sources = data.get("sources", [data])
        own = []
        for k, source in enumerate(sources):
            if source.get("builtin") != "elastic_text":
                raise ConfigError(
                    f"stages[{index}].data.sources[{k}]: train_nested needs elastic_text sources"
                )
            args = source.get("args", {})
            source["builtin"] = args.get("source", "stdlib_text")
            source["args"] = dict(args.get("args", {}))
            own.append(int(args["budget"]))
        budgets.append(own)
    return config, budgets


@dataclass
class NestedRun:
    """What :func:`train_nested` trained, and its per-step log."""

    model: ElasticModel | ElasticGPT
    teacher: torch.nn.Module
    curriculum: Any
    losses: list[dict[str, float]] = field(default_factory=list)


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def train_nested(
    config: dict[str, Any],
    *,
    log_every: int = 0,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> NestedRun:
    """Train an elastic config with ``elastic_text`` sources from our own loop (see the
    module docstring): per step the stage's batch, each sample's budget, the teacher's
    logits on the same tokens (no budget), the stage's loss terms, the stage's LR."""
    from stagetrain.config import parse_config
    from stagetrain.curriculum import Curriculum
    from stagetrain.handoff import build_optimizer

    pairs, budgets = pair_sources(config)
    curriculum = Curriculum(parse_config(pairs), progress=False)
    model = curriculum.build_model()
    teacher = curriculum.build_teacher()
    if teacher is None:
        raise ConfigError("train_nested: the config declares no teacher")
    model.train()
    run = NestedRun(model=model, teacher=teacher, curriculum=curriculum)  # type: ignore[arg-type]
    optimizer: torch.optim.Optimizer | None = None
    for step in curriculum.steps():
        stage = step.stage
        if optimizer is None or (step.is_stage_start and stage.config.handoff == "reset"):
            assert stage.config.optimizer is not None
            optimizer = build_optimizer(model.named_parameters(), stage.config.optimizer)
        indices = stage.indices(step.stage_step)
        source = np.searchsorted(stage.data.offsets, indices, side="right") - 1
        budget = torch.as_tensor(np.asarray(budgets[stage.index])[source], dtype=torch.long)
        inputs, labels = step.batch()
        step.set_lr(optimizer)
        output = _logits(model(input_ids=inputs, budget=budget))
        with torch.no_grad():
            teacher_output = _logits(teacher(input_ids=inputs))
        loss, terms = stage.loss(output, labels, teacher_output, model=model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step.step % log_every == 0 or step.step == curriculum.total_steps - 1):
            record = {"step": float(step.step), "loss": float(loss.detach())}
            record.update({k: float(v.detach()) for k, v in terms.items()})
            run.losses.append(record)
            if on_log is not None:
                on_log(record)
    model.eval()
    return run


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    *,
    budget: Any = None,
    context: int = 256,
    samples: int = 64,
    batch_size: int = 16,
) -> float:
    """Mean next-byte cross-entropy on the first ``samples`` windows of the stdlib
    validation split, at ``budget`` (``None``: a plain model's forward)."""
    data = stdlib_text(split="val", context=context)
    total, count = 0.0, 0
    for start in range(0, min(samples, len(data)), batch_size):
        inputs, targets = data.get_batch(np.arange(start, min(start + batch_size, samples)))
        kwargs = {} if budget is None else {"budget": budget}
        logits = _logits(model(input_ids=inputs, **kwargs))
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += targets.numel()
    value = total / count
    if not math.isfinite(value):
        raise ConfigError(f"validation_loss: non-finite loss at budget {budget!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m stagetrain.recipes.elastic CONFIG --out DIR``: the nested run of an
    elastic config with ``elastic_text`` sources through :func:`train_nested`, then every
    budget checked, extracted as a Hugging Face directory under ``DIR/<budget>``, loaded
    back with ``transformers`` and evaluated. Until ``stagetrain run`` passes dict batches."""
    import argparse
    from pathlib import Path

    import yaml
    from transformers import AutoModelForCausalLM

    from stagetrain.elastic.budgets import check_budgets, require_on_target
    from stagetrain.elastic.extract import extract, save_hf

    parser = argparse.ArgumentParser(prog="python -m stagetrain.recipes.elastic")
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    run = train_nested(config, log_every=25, on_log=lambda r: print(r, flush=True))
    parent: Any = run.model
    tokenizer = config["model"].get("args", {}).get("tokenizer")
    for status in check_budgets(parent):
        print(status.line())
        require_on_target(status)
        loss = validation_loss(parent, budget=status.name, context=args.context)
        if status.target >= 1.0:
            print(f"{status.name}: validation loss {loss:.4f} (the parent at full size)")
            continue
        out = args.out / status.name
        save_hf(extract(parent, status.name), parent.family, out, tokenizer=tokenizer)
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        reloaded = validation_loss(loaded, context=args.context)
        print(f"{status.name}: validation loss {loss:.4f} masked, {reloaded:.4f} loaded from {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Hugging Face Trainer adapter against our own loop: gradient accumulation, label
conventions in training and evaluation, batch-size arguments, teacher and model-read
loss terms, stage labels on logs, resume."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers_frameworks import (
    Fetches,
    assert_same_weights,
    build,
    fetches,
    our_loop,
    tiny_gpt2,
    two_stage,
)

from stagetrain import Curriculum
from stagetrain.errors import ConfigError

transformers = pytest.importorskip("transformers")
from stagetrain.integrations.hf import CurriculumTrainer  # noqa: E402

__all__ = ["fetches"]  # the fixture, imported for pytest


def arguments(output_dir: Path, grad_accum: int = 1, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "output_dir": str(output_dir), "per_device_train_batch_size": 8 // grad_accum,
        "gradient_accumulation_steps": grad_accum, "save_strategy": "no", "logging_steps": 4,
        "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True,
    }  # fmt: skip
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def trainer_for(
    curriculum: Curriculum,
    output_dir: Path,
    grad_accum: int = 1,
    *,
    model: torch.nn.Module | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    return CurriculumTrainer(
        model=model if model is not None else tiny_gpt2(),
        args=arguments(output_dir, grad_accum, **overrides),
        curriculum=curriculum,
        **(trainer_kwargs or {}),
    )


class AtStep(transformers.TrainerCallback):  # type: ignore[misc]
    """Copies of a parameter after each optimizer step, and every group's LR before it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.values: dict[int, torch.Tensor] = {}
        self.lrs: list[list[tuple[float, float]]] = []

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any
    ) -> None:
        self.lrs.append([(g["lr"], g.get("lr_factor", 1.0)) for g in optimizer.param_groups])

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        self.values[state.global_step] = dict(model.named_parameters())[self.name].detach().clone()


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_grad_accum_matches_our_loop(tmp_path: Path, fetches: Fetches, grad_accum: int) -> None:
    """Trainer ``gradient_accumulation_steps`` = our ``grad_accum``: the same micro-batches
    in every optimizer step, and bitwise the same weights (param groups with an LR
    multiplier and no-decay, warmup, a ``reset`` hand-off, ``freeze``, gradient clipping)."""
    config = two_stage(grad_accum)
    expected, ours = our_loop(tiny_gpt2(), config, tmp_path / "ours", fetches)
    assert len(ours) == 12 * grad_accum
    curriculum = build(config)
    trainer = trainer_for(curriculum, tmp_path / "hf", grad_accum)
    watch = AtStep("transformer.wpe.weight")
    trainer.add_callback(watch)
    trainer.train()
    assert trainer.state.global_step == 12
    assert fetches.per_step(grad_accum) == [
        ours[i : i + grad_accum] for i in range(0, len(ours), grad_accum)
    ]
    for step, micro in enumerate(fetches.per_step(grad_accum)):
        assert {stage for stage, _ in micro} == {curriculum.state_at(step).stage_index}
    assert_same_weights(expected, trainer.model)
    # frozen in stage 'long' (steps 6-11), trained in 'short'
    assert torch.equal(watch.values[6], watch.values[12])
    assert not torch.equal(watch.values[1], watch.values[6])
    for step, groups in enumerate(watch.lrs):  # every group's LR at every step
        lr = curriculum.stage_at(step).lr(step - curriculum.stage_at(step).planned_start, step)
        assert groups == [(lr * factor, factor) for _, factor in groups]
        assert {factor for _, factor in groups} == {0.5, 1.0}


def test_a_plain_torch_module_trains_like_our_loop(tmp_path: Path, fetches: Fetches) -> None:
    """Not a transformers model: pair batches reach it as ``model(inputs)``."""
    from helpers_frameworks import OUR_NAMES

    config = two_stage(2, OUR_NAMES)
    curriculum = build(config)
    expected, ours = our_loop(curriculum.build_model(), config, tmp_path / "ours", fetches)
    trainer = trainer_for(curriculum, tmp_path / "hf", 2, model=curriculum.build_model())
    trainer.train()
    assert fetches.seen == ours
    assert_same_weights(expected, trainer.model)


def rows(count: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def test_dict_batches_with_causal_lm_labels_train_like_our_loop(
    tmp_path: Path, fetches: Fetches
) -> None:
    """Rows ``{"input_ids", "labels": input_ids}`` (the transformers convention): the labels
    are shifted against the logits (cross_entropy) or by the model (``loss: model``),
    exactly as in our loop, with gradient accumulation."""
    ids = rows(64, 16, seed=1)
    data = {"rows": [{"input_ids": r, "labels": r.clone()} for r in ids]}
    config = two_stage(2)
    for stage in config["stages"]:
        stage["data"] = "@rows"
        stage.pop("seq_len")
    config["stages"][1]["loss"] = "model"
    expected, ours = our_loop(tiny_gpt2(), config, tmp_path / "ours", fetches, datasets=data)
    trainer = trainer_for(build(config, datasets=data), tmp_path / "hf", 2)
    trainer.train()
    assert fetches.seen == ours
    assert_same_weights(expected, trainer.model)


def evaluated(tmp_path: Path, ids: Any) -> tuple[Any, float]:
    """A trainer on the two-stage config with causal-LM eval rows (labels = input_ids),
    and the ``eval_loss`` its ``evaluate()`` reports."""
    trainer = trainer_for(
        build(two_stage()),
        tmp_path,
        per_device_eval_batch_size=4,
        trainer_kwargs={"eval_dataset": [{"input_ids": r, "labels": r.clone()} for r in ids]},
    )
    return trainer, trainer.evaluate()["eval_loss"]


def test_evaluate_shifts_causal_lm_labels(tmp_path: Path) -> None:
    """``Trainer.evaluate`` on standard causal-LM rows (labels = input_ids) reports the
    shifted loss, checked against a hand computation (and the model's own loss)."""
    ids = rows(4, 16, seed=2)
    trainer, reported = evaluated(tmp_path, ids)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        own = model(input_ids=ids, labels=ids).loss.item()
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)).item()
    assert reported == pytest.approx(by_hand, rel=1e-6)
    assert reported == pytest.approx(own, rel=1e-6)


def test_evaluate_pads_rows_of_different_lengths(tmp_path: Path) -> None:
    """Variable-length eval rows crashed ``evaluate()`` in the Trainer's default collator
    (``stack expects each tensor to be equal size``; found by a user): they are padded as
    in training, and the padding is not in the loss (one batch: its token mean)."""
    lengths = [5, 9, 16, 12]
    ids = [rows(1, n, seed=10 + n)[0] for n in lengths]
    trainer, reported = evaluated(tmp_path, ids)
    model = trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in ids:
            logits = model(input_ids=r[None]).logits[0]
            total += F.cross_entropy(logits[:-1], r[1:], reduction="sum").item()
            count += len(r) - 1
    assert reported == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(
    ("grad_accum", "per_device"), [(1, 4), (2, 8), (1, 16)], ids=["smaller", "times-ga", "larger"]
)
def test_batch_size_arguments_must_match_the_curriculum(
    tmp_path: Path, grad_accum: int, per_device: int
) -> None:
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size.*batch_size 8"):
        trainer_for(
            build(two_stage()), tmp_path, grad_accum, per_device_train_batch_size=per_device
        )


def test_a_stage_of_another_batch_size_is_warned_about_and_trains_like_our_loop(
    tmp_path: Path, fetches: Fetches
) -> None:
    config = two_stage(2)
    config["stages"][1]["batch_size"] = 4
    expected, ours = our_loop(tiny_gpt2(), config, tmp_path / "ours", fetches)
    with pytest.warns(UserWarning, match=r"stages\[1\].batch_size: 4 samples per step"):
        trainer = trainer_for(build(config), tmp_path / "hf", 2)
    trainer.train()
    assert fetches.seen == ours
    assert_same_weights(expected, trainer.model)


def router_cost(
    output: torch.Tensor, target: torch.Tensor, *, model: torch.nn.Module
) -> torch.Tensor:
    """A loss term that reads the model (like a mixture-of-experts router cost)."""
    return model.transformer.wte.weight.pow(2).mean()  # type: ignore[union-attr]


def test_teacher_and_model_terms_match_our_loop(tmp_path: Path, fetches: Fetches) -> None:
    """``kl_distill`` gets the teacher's prediction and a term reading the model gets the
    model, under the Trainer as in our loop (with gradient accumulation)."""
    config = two_stage(2)
    config["stages"][0]["loss"] = [
        "cross_entropy",
        {"name": "kl_distill", "weight": 0.5, "args": {"temperature": 2.0}},
        {"name": router_cost, "weight": 0.1},
    ]
    expected, ours = our_loop(tiny_gpt2(), config, tmp_path / "ours", fetches, teacher=tiny_gpt2(7))
    trainer = trainer_for(
        build(config, has_teacher=True),
        tmp_path / "hf",
        2,
        trainer_kwargs={"teacher": tiny_gpt2(7)},
    )
    trainer.train()
    assert fetches.seen == ours
    assert_same_weights(expected, trainer.model)


def test_a_teacher_term_without_a_teacher_is_refused(tmp_path: Path) -> None:
    config = two_stage()
    config["stages"][0]["loss"] = ["cross_entropy", "kl_distill"]
    with pytest.raises(ConfigError, match="teacher"):
        trainer_for(build(config, has_teacher=True), tmp_path)


def train_windows(log_history: list[dict[str, Any]]) -> list[tuple[range, dict[str, Any]]]:
    windows, previous = [], 0
    for entry in log_history:
        if "loss" in entry:
            windows.append((range(previous, entry["step"]), entry))
            previous = entry["step"]
    return windows


def test_logs_carry_the_stage_of_the_steps_they_average(tmp_path: Path) -> None:
    """The Trainer logs at step N the mean over the steps since its last log: each record
    is labelled with their stage, and a stage's last step always closes a record (so no
    average mixes two stages)."""
    curriculum = build(two_stage())
    ids = rows(4, 16, seed=3)
    trainer = trainer_for(
        curriculum, tmp_path, logging_steps=4, eval_strategy="steps", eval_steps=6,
        trainer_kwargs={"eval_dataset": [{"input_ids": r, "labels": r.clone()} for r in ids]},
    )  # fmt: skip
    trainer.train()
    evals = [(e["step"], e["stage"]) for e in trainer.state.log_history if "eval_loss" in e]
    assert evals == [(6, "short"), (12, "long")]  # the stage whose steps were just trained
    windows = train_windows(trainer.state.log_history)
    assert [w.stop for w, _ in windows] == [4, 6, 8, 12]
    for steps, entry in windows:
        assert {curriculum.state_at(s).stage_index for s in steps} == {entry["stage_index"]}
        assert entry["stage"] == curriculum.stages[entry["stage_index"]].name
        assert entry["learning_rate"] == pytest.approx(
            curriculum.stage_at(steps[-1]).lr(
                steps[-1] - curriculum.stage_at(steps[-1]).planned_start
            )
        )


@pytest.mark.parametrize(("grad_accum", "at"), [(1, 8), (2, 6), (4, 4)])
def test_resume_is_exact_and_keeps_the_whole_timeline(
    tmp_path: Path, fetches: Fetches, grad_accum: int, at: int
) -> None:
    """Resumed mid-stage (its freeze re-applied), at a stage boundary (its reset applied
    after the resume) or before it: only the remaining micro-batches are fetched, the
    weights are bitwise those of the uninterrupted run, and the stage timeline lists
    the stages before the resume point too."""
    config = two_stage(grad_accum)
    full = trainer_for(
        build(config), tmp_path / "full", grad_accum, save_strategy="steps", save_steps=2
    )
    full.train()
    uninterrupted = list(fetches.seen)
    fetches.clear()
    resumed = trainer_for(build(config), tmp_path / "resumed", grad_accum)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{at}"))
    assert fetches.seen == uninterrupted[at * grad_accum :]
    assert_same_weights(dict(full.model.state_dict()), resumed.model)
    assert resumed.curriculum_callback.timeline == [(0, "short"), (6, "long")]


def test_refusals(tmp_path: Path) -> None:
    curriculum = build(two_stage())
    with pytest.raises(ConfigError, match="max_steps"):
        trainer_for(curriculum, tmp_path, max_steps=5)
    with pytest.raises(ConfigError, match="auto_find_batch_size"):
        trainer_for(curriculum, tmp_path, auto_find_batch_size=True)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ConfigError, match="learning rate"):
        trainer_for(
            curriculum, tmp_path, model=model, trainer_kwargs={"optimizers": (optimizer, schedule)}
        )
    config = two_stage(2)
    with pytest.raises(
        ConfigError, match=r"stages\[0\].grad_accum: 2.*gradient_accumulation_steps 1"
    ):
        trainer_for(build(config), tmp_path, 1, per_device_train_batch_size=8)
    config = two_stage()
    config["stages"][1]["optimizer"] = {"name": "sgd", "lr": 0.1}
    with pytest.raises(ConfigError, match=r"stages\[1\].optimizer"):
        trainer_for(build(config), tmp_path)
    config = two_stage()
    config["stages"][1]["optimizer"]["lr_multipliers"] = {}  # other param groups
    with pytest.raises(ConfigError, match=r"stages\[1\].optimizer.*param group"):
        trainer_for(build(config), tmp_path)


def test_ignored_training_arguments_are_named(tmp_path: Path) -> None:
    """With the curriculum's optimizer, the Trainer's optimizer and LR arguments do not
    apply: a changed one is named in a warning, never silently dropped."""
    with pytest.warns(UserWarning, match=r"learning_rate.*stages\[0\].optimizer"):
        trainer_for(build(two_stage()), tmp_path, learning_rate=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer_for(build(two_stage()), tmp_path)  # defaults: nothing to warn about
    config = two_stage()
    config["evals"] = [{"name": "val", "data": {**config["stages"][0]["data"], "name": "val"}}]
    with pytest.warns(UserWarning, match=r"evals: the Trainer does not run .*\(val\)"):
        trainer_for(build(config), tmp_path)


def test_the_trainers_own_optimizer(tmp_path: Path, fetches: Fetches) -> None:
    """``curriculum_optimizer=False``: ``args.optim`` and its weight decay are the Trainer's;
    the LR is still the curriculum's at every step and ``reset`` clears the state."""
    curriculum = build(two_stage())
    trainer = trainer_for(
        curriculum, tmp_path, trainer_kwargs={"curriculum_optimizer": False}, optim="sgd",
        max_grad_norm=0.0,
    )  # fmt: skip
    watch = AtStep("transformer.wte.weight")
    trainer.add_callback(watch)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    for step, groups in enumerate(watch.lrs):
        lr = curriculum.stage_at(step).lr(step - curriculum.stage_at(step).planned_start, step)
        assert groups == [(lr, 1.0)] * len(groups)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_our_loop(tmp_path: Path) -> None:
    """Under torchrun (2 gloo processes, DDP) with gradient accumulation: each rank fetches
    the same micro-batches as in our loop, and the weights are the same."""
    import json

    from helpers_frameworks import run_ddp

    run_ddp("fit", tmp_path)
    run_ddp("hf", tmp_path)
    for rank in range(2):
        ours = json.loads((tmp_path / f"fit-rank{rank}.json").read_text())
        assert json.loads((tmp_path / f"hf-rank{rank}.json").read_text()) == ours
        assert len(ours) == 12 * 2 and all(len(indices) == 2 for _, indices in ours)
    expected = torch.load(tmp_path / "fit.pt", weights_only=True)
    got = torch.load(tmp_path / "hf.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name

"""The PyTorch Lightning adapter against our own loop: accumulate_grad_batches, the LR of
every param group at every step (lr_multipliers), reset, freeze, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_frameworks import (
    OUR_NAMES,
    Fetches,
    assert_same_weights,
    build,
    fetches,
    our_loop,
    two_stage,
)

from stagetrain import Curriculum
from stagetrain.errors import ConfigError

L = pytest.importorskip("lightning")
from stagetrain.integrations.lightning import (  # noqa: E402
    CurriculumCallback,
    CurriculumDataModule,
    CurriculumModule,
    curriculum_optimizer,
    stage_loss,
)

__all__ = ["fetches"]  # the fixture, imported for pytest


class Own(L.LightningModule):  # type: ignore[misc]
    """A user's module: the curriculum's loss and (unless ``own_optimizer``) its optimizer."""

    def __init__(self, curriculum: Curriculum, own_optimizer: bool = False) -> None:
        super().__init__()
        self.curriculum = curriculum
        self.model = curriculum.build_model()
        self.own_optimizer = own_optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return stage_loss(self.curriculum, self.global_step, self.model, batch)

    def configure_optimizers(self) -> Any:
        if self.own_optimizer:
            return torch.optim.AdamW(self.model.parameters(), lr=1.0, weight_decay=0.0)
        return curriculum_optimizer(self.curriculum, self.model)


class Watch(L.Callback):  # type: ignore[misc]
    """Before every optimizer step: each group's (lr, lr_factor), the optimizer state's size;
    after it: a copy of one parameter and its requires_grad."""

    def __init__(self, name: str = "model.positions.weight") -> None:
        self.name = name
        self.lrs: list[list[tuple[float, float]]] = []
        self.state_sizes: list[int] = []
        self.values: dict[int, torch.Tensor] = {}
        self.trainable: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append([(g["lr"], g.get("lr_factor", 1.0)) for g in optimizer.param_groups])
        self.state_sizes.append(len(optimizer.state))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        param = dict(pl_module.named_parameters())[self.name]
        self.values[trainer.global_step] = param.detach().clone()
        self.trainable[trainer.global_step] = param.requires_grad


def run(
    curriculum: Curriculum,
    root: Path,
    grad_accum: int = 1,
    *,
    module: Any = None,
    callbacks: tuple[Any, ...] = (),
    every: int | None = None,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[Any, CurriculumCallback]:
    callback = CurriculumCallback(curriculum)
    extra = list(callbacks)
    if every is not None:
        extra.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}"
            )
        )
    values: dict[str, Any] = {
        "max_steps": curriculum.total_steps, "accumulate_grad_batches": grad_accum,
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
        "enable_model_summary": False, "enable_checkpointing": every is not None,
        "default_root_dir": root,
    }  # fmt: skip
    values.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[callback, *extra], **values)
    module = (
        module if module is not None else CurriculumModule(curriculum.build_model(), curriculum)
    )
    trainer.fit(module, datamodule=CurriculumDataModule(curriculum), ckpt_path=ckpt_path)
    return module, callback


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_accumulate_grad_batches_matches_our_loop(
    tmp_path: Path, fetches: Fetches, grad_accum: int
) -> None:
    """``accumulate_grad_batches`` = our ``grad_accum``: the same micro-batches in every
    optimizer step and bitwise the same weights; every param group's LR is the
    curriculum's times its ``lr_multipliers`` factor at every step."""
    config = two_stage(grad_accum, OUR_NAMES)
    curriculum = build(config)
    expected, ours = our_loop(curriculum.build_model(), config, tmp_path / "ours", fetches)
    watch = Watch()
    module, callback = run(curriculum, tmp_path / "pl", grad_accum, callbacks=(watch,))
    assert fetches.per_step(grad_accum) == [
        ours[i : i + grad_accum] for i in range(0, len(ours), grad_accum)
    ]
    for step, micro in enumerate(fetches.per_step(grad_accum)):
        assert {stage for stage, _ in micro} == {curriculum.state_at(step).stage_index}
    assert_same_weights(expected, module, prefix="model.")
    assert len(watch.lrs) == 12
    for step, groups in enumerate(watch.lrs):
        stage = curriculum.stage_at(step)
        lr = stage.lr(step - stage.planned_start, step)
        assert groups == [(lr * factor, factor) for _, factor in groups]
        assert {factor for _, factor in groups} == {0.5, 1.0}
    assert callback.timeline == [(0, "short"), (6, "long")]


def router_cost(
    output: torch.Tensor, target: torch.Tensor, *, model: torch.nn.Module
) -> torch.Tensor:
    """A loss term that reads the model (like a mixture-of-experts router cost)."""
    return model.tokens.weight.pow(2).mean()  # type: ignore[union-attr]


def test_teacher_and_model_terms_match_our_loop(tmp_path: Path, fetches: Fetches) -> None:
    config = two_stage(2, OUR_NAMES)
    config["stages"][0]["loss"] = [
        "cross_entropy",
        {"name": "kl_distill", "weight": 0.5, "args": {"temperature": 2.0}},
        {"name": router_cost, "weight": 0.1},
    ]
    config["teacher"] = {**config["model"], "args": {**config["model"]["args"], "width": 16}}
    curriculum = build(config)
    expected, ours = our_loop(curriculum.build_model(), config, tmp_path / "ours", fetches)
    module, _ = run(curriculum, tmp_path / "pl", 2)  # CurriculumModule builds the teacher
    assert fetches.seen == ours
    assert_same_weights(expected, module, prefix="model.")
    assert module.teacher is not None and not module.teacher.training


def test_freezing_under_ddp_needs_find_unused_parameters() -> None:
    from types import SimpleNamespace

    curriculum = build(two_stage(1, OUR_NAMES))
    trainer = SimpleNamespace(
        max_steps=curriculum.total_steps, callbacks=[], accumulate_grad_batches=1, world_size=2,
        strategy=SimpleNamespace(_ddp_kwargs={}),
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=False),
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"stages\[1\].freeze.*ddp_find_unused_parameters_true"):
        CurriculumCallback(curriculum).on_fit_start(trainer, None)  # type: ignore[arg-type]
    trainer.strategy._ddp_kwargs = {"find_unused_parameters": True}
    CurriculumCallback(curriculum).on_fit_start(trainer, None)  # type: ignore[arg-type]
    trainer._accelerator_connector.use_distributed_sampler = True
    with pytest.raises(ConfigError, match="use_distributed_sampler=False"):
        CurriculumCallback(curriculum).on_fit_start(trainer, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("handoff", "own_optimizer"),
    [("reset", False), ("reset", True), ("rewarm", False)],
    ids=["reset-curriculum-optimizer", "reset-own-optimizer", "rewarm"],
)
def test_reset_clears_the_optimizer_state_at_the_stage_start(
    tmp_path: Path, handoff: str, own_optimizer: bool
) -> None:
    config = two_stage(1, OUR_NAMES)
    config["stages"][1]["handoff"] = handoff
    curriculum = build(config)
    watch = Watch()
    run(curriculum, tmp_path, module=Own(curriculum, own_optimizer), callbacks=(watch,))
    full = watch.state_sizes[5]
    assert watch.state_sizes[0] == 0 and full > 0
    assert watch.state_sizes[6] == (0 if handoff == "reset" else full)
    if own_optimizer:  # not built by the curriculum: no lr_multipliers, the curriculum's LR
        stage = curriculum.stages[1]
        assert watch.lrs[7] == [(stage.lr(1, 7), 1.0)]


def test_freeze_keeps_the_parameters_of_a_stage(tmp_path: Path) -> None:
    curriculum = build(two_stage(1, OUR_NAMES))
    watch = Watch()
    run(curriculum, tmp_path, module=Own(curriculum), callbacks=(watch,))
    assert all(watch.trainable[s] for s in range(1, 7)) and not any(
        watch.trainable[s] for s in range(7, 13)
    )
    assert not torch.equal(watch.values[1], watch.values[6])
    assert torch.equal(watch.values[6], watch.values[12])


@pytest.mark.parametrize(("grad_accum", "at"), [(1, 8), (2, 6), (4, 4)])
def test_resume_is_exact_and_keeps_the_whole_timeline(
    tmp_path: Path, fetches: Fetches, grad_accum: int, at: int
) -> None:
    config = two_stage(grad_accum, OUR_NAMES)
    full, _ = run(build(config), tmp_path / "full", grad_accum, every=2)
    uninterrupted = list(fetches.seen)
    fetches.clear()
    resumed, callback = run(
        build(config), tmp_path / "resumed", grad_accum,
        ckpt_path=str(tmp_path / "full" / f"step={at}.ckpt"),
    )  # fmt: skip
    assert fetches.seen == uninterrupted[at * grad_accum :]
    assert_same_weights(dict(full.state_dict()), resumed)
    assert callback.timeline == [(0, "short"), (6, "long")]


def test_refusals(tmp_path: Path) -> None:
    curriculum = build(two_stage(1, OUR_NAMES))
    with pytest.raises(ConfigError, match="max_steps"):
        run(curriculum, tmp_path, max_steps=5)

    class Scheduled(Own):
        def configure_optimizers(self) -> Any:
            optimizer = curriculum_optimizer(self.curriculum, self.model)
            return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)]

    with pytest.raises(ConfigError, match="learning rate"):
        run(curriculum, tmp_path, module=Scheduled(curriculum))
    with pytest.raises(ConfigError, match=r"stages\[0\].grad_accum: 2.*accumulate_grad_batches 1"):
        run(build(two_stage(2, OUR_NAMES)), tmp_path, 1)
    config = two_stage(1, OUR_NAMES)
    config["stages"][1]["optimizer"] = {"name": "sgd", "lr": 0.1}
    with pytest.raises(ConfigError, match=r"stages\[1\].optimizer"):
        run(build(config), tmp_path)
    with pytest.raises(ConfigError, match="cannot make 16 micro-batches"):
        run(curriculum, tmp_path, 16)  # 8 samples cannot make 16 micro-batches


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_our_loop(tmp_path: Path) -> None:
    """Under torchrun (2 gloo processes, DDP) with accumulate_grad_batches=2 and a stage
    that freezes: each rank fetches the same micro-batches as in our loop, and the weights
    are the same."""
    import json

    from helpers_frameworks import run_ddp

    run_ddp("fit-ours", tmp_path)
    run_ddp("lightning", tmp_path)
    for rank in range(2):
        ours = json.loads((tmp_path / f"fit-ours-rank{rank}.json").read_text())
        assert json.loads((tmp_path / f"lightning-rank{rank}.json").read_text()) == ours
        assert len(ours) == 12 * 2 and all(len(indices) == 2 for _, indices in ours)
    expected = torch.load(tmp_path / "fit-ours.pt", weights_only=True)
    got = torch.load(tmp_path / "lightning.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name

"""The same curriculum in our loop, in the Hugging Face Trainer and in Lightning:
same stage timeline, same sample order, exact resume in each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from stagetrain import Curriculum, fit, parse_config
from stagetrain.logs import read_records
from stagetrain.stepdata import CurriculumDataset

CONTEXT = 32


def config_dict() -> dict[str, Any]:
    text = {"builtin": "stdlib_text", "args": {"split": "train", "context": CONTEXT, "limit": 3000}}
    return {
        "name": "integrations",
        "seed": 0,
        "batch_size": 8,
        "log_every": 5,
        "checkpoint": {"every": "10ba", "keep": 5},
        "model": {"builtin": "gpt", "args": {"context": CONTEXT, "width": 32, "layers": 1, "heads": 2}},
        "stages": [
            {"name": "short", "duration": "12ba", "seq_len": 16, "data": {**text, "name": "text"},
             "optimizer": {"name": "adamw", "lr": 1e-3, "warmup": "3ba"}},
            {"name": "long", "duration": "18ba", "seq_len": CONTEXT, "handoff": "rewarm", "data": {**text, "name": "text"}},
        ],
    }  # fmt: skip


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, int]]]:
    """Every step's (stage, index) list as the framework's DataLoader fetches it."""
    seen: list[list[tuple[int, int]]] = []
    original = CurriculumDataset.__getitems__

    def recording(self: CurriculumDataset, keys: Any) -> Any:
        seen.append([(keys.stage, int(i)) for i in keys.indices])
        return original(self, keys)

    monkeypatch.setattr(CurriculumDataset, "__getitems__", recording)
    return seen


def our_order(curriculum: Curriculum) -> list[list[tuple[int, int]]]:
    return [
        [(s.stage.index, int(i)) for i in s.stage.indices(s.stage_step)] for s in curriculum.steps()
    ]


def test_our_loop_timeline(tmp_path: Path) -> None:
    curriculum = Curriculum(parse_config(config_dict()))
    fit(curriculum.build_model(), curriculum, run_dir=tmp_path, progress=False, tensorboard=False)
    starts = [
        (r["step"], r["stage"])
        for r in read_records(tmp_path / "metrics.jsonl")
        if r["type"] == "stage_start"
    ]
    assert starts == [(0, "short"), (12, "long")]


def hf_trainer(curriculum: Curriculum, output_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    from stagetrain.integrations.hf import CurriculumTrainer

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), save_strategy="steps", save_steps=10,
        logging_steps=5, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    return CurriculumTrainer(model=model, args=args, curriculum=curriculum)


def test_hf_trainer_same_order_timeline_and_lr(tmp_path: Path, recorded: list[Any]) -> None:
    curriculum = Curriculum(parse_config(config_dict()))
    trainer = hf_trainer(curriculum, tmp_path)
    lrs: list[float] = []

    class LR(__import__("transformers").TrainerCallback):
        def on_step_end(
            self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any
        ) -> None:
            pass

        def on_step_begin(
            self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any
        ) -> None:
            lrs.append(trainer.lr_scheduler.get_last_lr()[0])

    trainer.add_callback(LR())
    trainer.train()
    assert trainer.state.global_step == 30
    assert recorded == our_order(curriculum)
    assert trainer.curriculum_callback.timeline == [(0, "short"), (12, "long")]
    expected = [s.lr for s in curriculum.steps()]
    assert lrs == pytest.approx(expected)  # warmup in stage 1, rewarm in stage 2
    assert any("stage_index" in entry for entry in trainer.state.log_history)


def test_hf_trainer_resume_is_exact(tmp_path: Path, recorded: list[Any]) -> None:
    curriculum = Curriculum(parse_config(config_dict()))
    full = hf_trainer(curriculum, tmp_path / "full")
    full.train()
    recorded.clear()
    resumed = hf_trainer(curriculum, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-20"))
    assert recorded == our_order(curriculum)[20:]  # only the remaining steps' data was fetched
    for (name, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def lightning_run(
    curriculum: Curriculum, root: Path, ckpt_path: str | None = None
) -> tuple[Any, Any]:
    L = pytest.importorskip("lightning")
    from stagetrain.integrations.lightning import CurriculumCallback, CurriculumDataModule

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.curriculum = curriculum
            self.model = curriculum.build_model()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            return self.curriculum.stage_at(self.global_step).loss(self.model(inputs), targets)[0]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.0)

    callback = CurriculumCallback(curriculum)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=root, every_n_train_steps=10, save_top_k=-1, filename="{step}"
    )
    trainer = L.Trainer(max_steps=curriculum.total_steps, accelerator="cpu", devices=1, logger=False,
                        callbacks=[callback, checkpoints], enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = Module()
    trainer.fit(module, datamodule=CurriculumDataModule(curriculum), ckpt_path=ckpt_path)
    return module, callback


def test_lightning_same_order_and_timeline(tmp_path: Path, recorded: list[Any]) -> None:
    curriculum = Curriculum(parse_config(config_dict()))
    _, callback = lightning_run(curriculum, tmp_path)
    assert recorded == our_order(curriculum)
    assert callback.timeline == [(0, "short"), (12, "long")]


def test_lightning_resume_is_exact(tmp_path: Path, recorded: list[Any]) -> None:
    curriculum = Curriculum(parse_config(config_dict()))
    full, _ = lightning_run(curriculum, tmp_path / "full")
    recorded.clear()
    resumed, _ = lightning_run(
        curriculum, tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "step=20.ckpt")
    )
    assert recorded == our_order(curriculum)[20:]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "package"), [("hf_trainer.py", "transformers"), ("lightning_module.py", "lightning")]
)
def test_examples_run(tmp_path: Path, script: str, package: str) -> None:
    import subprocess
    import sys

    pytest.importorskip(package)
    example = Path(__file__).parent.parent / "examples" / script
    out = subprocess.run(
        [sys.executable, str(example), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stage timeline: [(0, 'short'), (40, 'long')]" in out.stdout


@pytest.mark.slow
def test_gpt2_documents_example_runs(tmp_path: Path) -> None:
    import math
    import subprocess
    import sys

    pytest.importorskip("transformers")
    example = Path(__file__).parent.parent / "examples" / "gpt2_documents.py"
    out = subprocess.run(
        [sys.executable, str(example), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("validation:"))
    values = eval(line.partition(":")[2])  # the example prints a dict literal
    assert math.exp(values["loss"]) < 256 and 0 < values["token_accuracy"] < 1

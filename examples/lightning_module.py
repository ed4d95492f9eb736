"""A two-stage curriculum (short then long context) inside PyTorch Lightning.

Each optimizer step draws the curriculum's batch of 8 samples, cut into 2 micro-batches
of 4 (``accumulate_grad_batches=2``). The optimizer comes from the curriculum (weight
decay off for biases and norms, half the LR for the token embeddings); the callback sets
the learning rate of every step and applies the hand-off (here ``reset``: a fresh
optimizer state and a new warmup for the long stage) and ``freeze``.

Run: python examples/lightning_module.py [OUTPUT_DIR]   (needs: pip install 'stagetrain[lightning]')
"""

import sys

import lightning as L
import torch

import stagetrain
from stagetrain.integrations.lightning import (
    CurriculumCallback,
    CurriculumDataModule,
    curriculum_optimizer,
    stage_loss,
)

text = {"builtin": "stdlib_text", "name": "stdlib", "args": {"split": "train", "context": 64}}
curriculum = stagetrain.Curriculum(
    stagetrain.parse_config(
        {
            "batch_size": 8,
            "model": {
                "builtin": "gpt",
                "args": {"context": 64, "width": 64, "layers": 2, "heads": 2},
            },
            "stages": [
                {
                    "name": "short",
                    "duration": "40ba",
                    "seq_len": 16,
                    "data": text,
                    "optimizer": {
                        "lr": 1e-3,
                        "warmup": "5ba",
                        "weight_decay": 0.1,
                        "lr_multipliers": {"tokens.*": 0.5},
                    },
                },
                {
                    "name": "long",
                    "duration": "40ba",
                    "seq_len": 64,
                    "data": text,
                    "handoff": "reset",
                    "freeze": ["tokens.*"],  # names of self.model's parameters
                },
            ],
        }
    )
)


class CharLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.curriculum = curriculum
        self.model = curriculum.build_model()

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        loss = stage_loss(self.curriculum, self.global_step, self.model, batch)  # this step's stage
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return curriculum_optimizer(self.curriculum, self.model)  # the callback sets the LR


callback = CurriculumCallback(curriculum)
trainer = L.Trainer(
    max_steps=curriculum.total_steps, accumulate_grad_batches=2, accelerator="cpu",
    logger=False, enable_progress_bar=False,
    default_root_dir=sys.argv[1] if len(sys.argv) > 1 else "runs/lightning", callbacks=[callback],
)  # fmt: skip
module = CharLM()
trainer.fit(module, datamodule=CurriculumDataModule(curriculum))  # resume: ckpt_path=...
print("stage timeline:", callback.timeline)
print("final loss:", round(float(trainer.callback_metrics["loss"]), 3))

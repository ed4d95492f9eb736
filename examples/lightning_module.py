"""A two-stage curriculum (short then long context) inside PyTorch Lightning.

Run: python examples/lightning_module.py [OUTPUT_DIR]   (needs: pip install 'stagetrain[lightning]')
"""

import sys

import lightning as L
import torch

import stagetrain
from stagetrain.integrations.lightning import CurriculumCallback, CurriculumDataModule

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
                    "optimizer": {"lr": 1e-3, "warmup": "5ba"},
                },
                {
                    "name": "long",
                    "duration": "40ba",
                    "seq_len": 64,
                    "data": text,
                    "handoff": "rewarm",
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
        inputs, targets = batch
        stage = self.curriculum.stage_at(self.global_step)  # this step's stage and its loss
        loss = stage.loss(self.model(inputs), targets)[0]
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters())  # the callback sets the LR every step


callback = CurriculumCallback(curriculum)
trainer = L.Trainer(
    max_steps=curriculum.total_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
    default_root_dir=sys.argv[1] if len(sys.argv) > 1 else "runs/lightning", callbacks=[callback],
)  # fmt: skip
trainer.fit(CharLM(), datamodule=CurriculumDataModule(curriculum))  # resume: ckpt_path=...
print("stage timeline:", callback.timeline)

"""Run under torchrun by tests/test_hf_trainer.py and tests/test_lightning_adapter.py: the
same curriculum in our loop or in a framework, on 2 gloo processes; writes each rank's
fetched micro-batches and rank 0's final weights to OUT.

Usage: torchrun --nproc_per_node=2 frameworks_ddp_script.py {fit,hf,fit-ours,lightning} OUT
"""

import json
import os
import sys

import torch
from helpers_frameworks import OUR_NAMES, Fetches, build, two_stage

from stagetrain import fit
from stagetrain.stepdata import CurriculumDataset

mode, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
record = Fetches()
original = CurriculumDataset.__getitems__


def recording(self: CurriculumDataset, keys: object) -> object:
    record.seen.append((keys.stage, [int(i) for i in keys.indices]))  # type: ignore[attr-defined]
    return original(self, keys)  # type: ignore[arg-type]


CurriculumDataset.__getitems__ = recording  # type: ignore[method-assign]
if mode in ("fit", "hf"):
    from helpers_frameworks import tiny_gpt2

    config = two_stage(2)
    if mode == "fit":
        model = tiny_gpt2()
        fit(model, build(config), run_dir=f"{out}/fit", progress=False, tensorboard=False)
    else:
        import transformers

        from stagetrain.integrations.hf import CurriculumTrainer

        args = transformers.TrainingArguments(
            output_dir=f"{out}/hf", per_device_train_batch_size=2, gradient_accumulation_steps=2,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        trainer = CurriculumTrainer(model=tiny_gpt2(), args=args, curriculum=build(config))
        trainer.train()
        model = trainer.model
    weights = model.state_dict()
else:
    config = two_stage(2, OUR_NAMES)
    curriculum = build(config)
    model = curriculum.build_model()
    if mode == "fit-ours":
        fit(model, curriculum, run_dir=f"{out}/fit", progress=False, tensorboard=False)
        weights = model.state_dict()
    else:
        import lightning as L

        from stagetrain.integrations.lightning import (
            CurriculumCallback,
            CurriculumDataModule,
            CurriculumModule,
        )

        trainer = L.Trainer(
            max_steps=curriculum.total_steps, accumulate_grad_batches=2, accelerator="cpu",
            devices=2, strategy="ddp_find_unused_parameters_true", use_distributed_sampler=False,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[CurriculumCallback(curriculum)],
        )  # fmt: skip
        module = CurriculumModule(model, curriculum)
        trainer.fit(module, datamodule=CurriculumDataModule(curriculum))
        weights = module.model.state_dict()
with open(f"{out}/{mode}-rank{rank}.json", "w") as f:
    json.dump(record.seen, f)
if rank == 0:
    torch.save({k: v.detach().cpu() for k, v in weights.items()}, f"{out}/{mode}.pt")

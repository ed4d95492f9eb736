"""A two-stage curriculum (short then long context) inside the Hugging Face Trainer.

Run: python examples/hf_trainer.py [OUTPUT_DIR]   (needs: pip install 'stagetrain[hf]')
"""

import sys

import transformers

import stagetrain
from stagetrain.integrations.hf import CurriculumTrainer

text = {"builtin": "stdlib_text", "name": "stdlib", "args": {"split": "train", "context": 64}}
curriculum = stagetrain.Curriculum(
    stagetrain.parse_config(
        {
            "batch_size": 8,
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
config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)
trainer = CurriculumTrainer(
    model=transformers.GPT2LMHeadModel(config),  # built from a config: nothing is downloaded
    args=transformers.TrainingArguments(
        output_dir=sys.argv[1] if len(sys.argv) > 1 else "runs/hf",
        learning_rate=1e-3,
        save_steps=40,
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    ),
    curriculum=curriculum,
)
trainer.train()  # resume later with trainer.train(resume_from_checkpoint=".../checkpoint-40")
print("stage timeline:", trainer.curriculum_callback.timeline)
print("final loss:", trainer.state.log_history[-2]["loss"])

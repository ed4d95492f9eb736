"""A two-stage curriculum (short then long context) inside the Hugging Face Trainer.

Each optimizer step draws the curriculum's batch of 8 samples, cut into 2 micro-batches
of 4 (``gradient_accumulation_steps=2``); the optimizer (weight decay off for biases and
norms, a lower LR for the embeddings), the learning rate, the hand-off and the loss come
from the curriculum. ``evaluate`` takes standard causal-LM rows (labels = input_ids).

Run: python examples/hf_trainer.py [OUTPUT_DIR]   (needs: pip install 'stagetrain[hf]')
"""

import sys

import transformers

import stagetrain
from stagetrain.integrations.hf import CurriculumTrainer
from stagetrain.recipes.pystdlib import stdlib_text

text = {"builtin": "stdlib_text", "name": "stdlib", "args": {"split": "train", "context": 64}}
optimizer = {
    "lr": 1e-3,
    "warmup": "5ba",
    "weight_decay": 0.1,  # biases and norm weights do not decay (no_decay's default)
    "lr_multipliers": {"transformer.wte.*": 0.5},
}
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
                    "optimizer": optimizer,
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
# Held-out windows as the rows a transformers user has: labels = input_ids (shifted inside).
windows = stdlib_text(split="val", context=64, limit=32)
eval_rows = [{"input_ids": x, "labels": x.clone()} for x, _ in (windows[i] for i in range(32))]

config = transformers.GPT2Config(
    vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
)
trainer = CurriculumTrainer(
    model=transformers.GPT2LMHeadModel(config),  # built from a config: nothing is downloaded
    args=transformers.TrainingArguments(
        output_dir=sys.argv[1] if len(sys.argv) > 1 else "runs/hf",
        per_device_train_batch_size=4,  # x gradient_accumulation_steps 2 = the batch_size 8
        gradient_accumulation_steps=2,
        save_steps=40,
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    ),
    curriculum=curriculum,
    eval_dataset=eval_rows,
)
trainer.train()  # resume later with trainer.train(resume_from_checkpoint=".../checkpoint-40")
print("stage timeline:", trainer.curriculum_callback.timeline)
losses = [
    (e["step"], e["stage"], round(e["loss"], 3)) for e in trainer.state.log_history if "loss" in e
]
print("(step, stage, mean loss of the steps since the last record):", losses)
print("eval loss:", round(trainer.evaluate()["eval_loss"], 3))

"""A Hugging Face GPT-2 on dict rows of variable-length documents, no glue code.

Rows are what a ``datasets`` table or a tokenizer gives: ``{"input_ids": [...],
"labels": [...]}`` of any length. stagetrain pads them per batch (labels with -100),
adds the attention mask, calls ``model(**batch)``, trains on the model's own loss
(``loss: model``) and evaluates pad-aware perplexity and token accuracy. Stage 1 sees
the first 32 tokens of each document, stage 2 whole documents (up to 128).

Run: python examples/gpt2_documents.py [RUN_DIR]   (needs: pip install 'stagetrain[hf]')
"""

import sys
import sysconfig
import zlib
from pathlib import Path

import transformers

import stagetrain


def documents(split: str, count: int) -> list[dict[str, list[int]]]:
    """Docstrings of the standard library as byte-level documents (any text would do)."""
    rows: list[dict[str, list[int]]] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if (zlib.crc32(path.name.encode()) % 10 == 0) != (split == "val"):
            continue
        text = path.read_text(errors="replace")
        for chunk in text.split('"""')[1::2]:  # the text between triple quotes
            ids = list(chunk.strip().encode()[:128])
            if len(ids) >= 16:
                rows.append({"input_ids": ids, "labels": ids})
        if len(rows) >= count:
            break
    return rows[:count]


config = stagetrain.parse_config(
    {
        "name": "gpt2-documents",
        "batch_size": 16,
        "log_every": 20,
        "eval_every": "40ba",
        "evals": [
            {"name": "val", "data": "@val", "metrics": ["loss", "perplexity", "token_accuracy"]}
        ],
        "stages": [
            {"name": "short", "duration": "60ba", "seq_len": 32, "data": "@train", "loss": "model",
             "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.1, "warmup": "10ba"}},
            {"name": "long", "duration": "60ba", "seq_len": 128, "data": "@train",
             "handoff": "rewarm"},
        ],
    }
)  # fmt: skip
datasets = {"train": documents("train", 2000), "val": documents("val", 128)}
gpt2 = transformers.GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=2)
result = stagetrain.fit(
    transformers.GPT2LMHeadModel(gpt2),  # built from a config: nothing is downloaded
    stagetrain.Curriculum(config, datasets=datasets),
    run_dir=sys.argv[1] if len(sys.argv) > 1 else "runs/gpt2-documents",
)
print("validation:", {k: round(v, 4) for k, v in result.metrics["val"].items()})

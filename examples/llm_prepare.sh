#!/usr/bin/env bash
# Token files for examples/llm_two_stage.yaml (and the quick variant), from text that is
# on every Python installation (see stagetrain/recipes/llm_corpus.py):
#   bash examples/llm_prepare.sh            # -> data/llm/       (full corpus)
#   bash examples/llm_prepare.sh --quick    # -> data/llm-quick/ (every 8th file, for CI)
# Reruns skip token files that are up to date (their sidecars match the inputs).
set -euo pipefail
PYTHON=${PYTHON:-python}
OUT=data/llm
EVERY=1
if [[ "${1:-}" == "--quick" ]]; then
  OUT=data/llm-quick
  EVERY=8
fi
WORKERS=${WORKERS:-2}
"$PYTHON" -m stagetrain.recipes.llm_corpus "$OUT" --vocab-size 2048 --every "$EVERY"
for part in code-train code-val docs-train docs-val; do
  "$PYTHON" -m stagetrain.cli prepare "$OUT/$part.jsonl" --text-field text \
    --tokenizer "$OUT/tokenizer.json" --out "$OUT/$part.bin" --workers "$WORKERS" --no-progress
done

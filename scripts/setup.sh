#!/usr/bin/env bash
# Create .venv and install stagetrain with its dev extras. torch==2.13.0 comes first:
# on this project's machines it is a CPU wheel on disk, and installing it first keeps
# pip from pulling a multi-GB CUDA build to satisfy `torch>=2.2`. Any failed install
# fails the script (CI must not go green with an extra missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# Keras 3 defaults to the TensorFlow backend, which this venv does not hold (setup_tf.sh makes
# its own); the torch backend is the one the tests and examples use.
export KERAS_BACKEND=${KERAS_BACKEND:-torch}
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0 || .venv/bin/pip install -q "torch>=2.2"
fi
.venv/bin/pip install -q -e ".[dev]"
# Every extra the tests use must import: a missing one is an error here, not a skip later.
.venv/bin/python - <<'PY'
import importlib

for name in ("torch", "stagetrain", "scipy", "matplotlib", "tensorboard", "sklearn",
             "transformers", "accelerate", "lightning", "safetensors", "hypothesis",
             "datasets", "tokenizers", "keras", "torchmetrics", "psutil"):
    importlib.import_module(name)
import stagetrain, torch

print("stagetrain", stagetrain.__version__, "| torch", torch.__version__)
PY

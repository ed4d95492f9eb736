#!/usr/bin/env bash
# Create .venv and install stagetrain with its dev extras. torch==2.13.0 comes first:
# on this project's machines it is a CPU wheel on disk, and installing it first keeps
# pip from pulling a multi-GB CUDA build to satisfy `torch>=2.2`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0 2>/dev/null || .venv/bin/pip install -q "torch>=2.2"
fi
.venv/bin/pip install -q -e ".[dev]" 2>&1 | grep -v -E "^WARNING: Location|^\s*$" || true
.venv/bin/python -c "import stagetrain, torch; print('stagetrain', stagetrain.__version__, '| torch', torch.__version__)"

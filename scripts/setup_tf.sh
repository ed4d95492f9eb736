#!/usr/bin/env bash
# A second environment, .venv-tf, for the Keras adapter's TensorFlow-backend tests
# (tests/test_keras.py runs the same curriculum there and compares it with the torch
# backend). TensorFlow never goes into the main .venv. About 2 minutes of installs plus a
# ~270 MB download on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-tf/bin/python ]; then
  "$PY" -m venv .venv-tf
fi
.venv-tf/bin/pip install -q torch==2.13.0
.venv-tf/bin/pip install -q tensorflow-cpu "keras>=3.0"
.venv-tf/bin/pip install -q -e .
.venv-tf/bin/python -c "import tensorflow, keras; print('tensorflow', tensorflow.__version__, '| keras', keras.__version__)"

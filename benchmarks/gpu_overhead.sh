#!/usr/bin/env bash
# The loop-overhead benchmark on a GPU, with models large enough to keep it busy.
# For a lent GPU machine: one short script (about 5 minutes on an H200).
#   bash benchmarks/gpu_overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv
.venv/bin/python benchmarks/loop_overhead.py --device cuda --sizes 2048x1024,8192x4096 \
    --out benchmarks/results/loop_overhead_gpu.json
